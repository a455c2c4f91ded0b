"""Stream clients for the tests: Tornado's WebSocket client, a raw WebSocket that can
stop reading, a blocking Server-Sent Events reader, and the edge's counters."""

import asyncio
import base64
import http.client
import json
import os
import socket
import struct
import time
from urllib.parse import urlsplit

from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from .http import request

FRAME_TIMEOUT_S = 10.0


def ws_url(cluster, path: str) -> str:
    return cluster.url(path).replace("http://", "ws://", 1)


async def ws_connect(cluster, path: str, headers=None):
    req = HTTPRequest(ws_url(cluster, path), headers=headers or {}, connect_timeout=10,
                      request_timeout=10)
    return await websocket_connect(req)


async def ws_send(ws, frame) -> None:
    await ws.write_message(frame if isinstance(frame, (str, bytes)) else json.dumps(frame),
                           binary=isinstance(frame, bytes))


async def ws_recv(ws, timeout_s: float = FRAME_TIMEOUT_S):
    """The next frame, parsed; None when the socket closed."""
    text = await asyncio.wait_for(ws.read_message(), timeout_s)
    return None if text is None else json.loads(text)


async def ws_ping(ws) -> None:
    """Send a ping and expect the very next frame to be the pong."""
    await ws_send(ws, {"ping": "PING"})
    assert await ws_recv(ws) == {"pong": "PONG"}


def global_counter(cluster, name: str) -> int:
    """The sum of a global counter over every metrics bucket of the edge."""
    report = json.loads(request(cluster.url("/metrics@firehose")).body)
    return sum(bucket["global"].get(name, 0) for bucket in report)


class RawWebSocket:
    """A WebSocket client on a plain socket: it reads only when asked to."""

    def __init__(self, cluster, path: str, rcvbuf: int = 0):
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(FRAME_TIMEOUT_S)
        self.sock.connect(("127.0.0.1", cluster.http_port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError
        self.buffer += chunk

    def send_text(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        assert len(payload) < 126
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)

    def read_frame(self):
        """``(opcode, payload)`` of the next server frame; raises EOFError at the end."""
        while len(self.buffer) < 2:
            self._fill()
        length = self.buffer[1] & 0x7F
        offset = 2
        if length == 126:
            offset = 4
        elif length == 127:
            offset = 10
        while len(self.buffer) < offset:
            self._fill()
        if length == 126:
            length = struct.unpack(">H", self.buffer[2:4])[0]
        elif length == 127:
            length = struct.unpack(">Q", self.buffer[2:10])[0]
        while len(self.buffer) < offset + length:
            self._fill()
        opcode = self.buffer[0] & 0x0F
        payload = self.buffer[offset:offset + length]
        self.buffer = self.buffer[offset + length:]
        return opcode, payload

    def read_until_close(self, deadline_s: float = 30.0):
        """Read every frame up to the close frame; returns (frames, close code)."""
        frames = []
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            opcode, payload = self.read_frame()
            if opcode == 0x8:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
                return frames, code
            frames.append((opcode, payload))
        raise AssertionError("no close frame within the deadline")

    def close(self) -> None:
        self.sock.close()


class EventStreamReader:
    """A blocking Server-Sent Events client (http.client decodes the chunked body)."""

    def __init__(self, url: str, headers=None, timeout_s: float = FRAME_TIMEOUT_S):
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.conn.request("GET", path, headers={"Accept": "text/event-stream", **(headers or {})})
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.headers = {k.lower(): v for k, v in self.response.getheaders()}
        self.buffer = b""

    def _read_line(self) -> str:
        while b"\n" not in self.buffer:
            chunk = self.response.read1(65536)
            if not chunk:
                raise EOFError("the event stream ended")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode("utf-8")

    def read_block(self) -> list:
        """The lines of the next block (an event, a comment, a retry), without the blank."""
        lines = []
        while True:
            line = self._read_line()
            if line == "":
                if lines:
                    return lines
                continue
            lines.append(line)

    def read_event(self) -> dict:
        """The next event, skipping comments and retry blocks: ``{"id":..., "data":...}``."""
        deadline = time.monotonic() + FRAME_TIMEOUT_S
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"no event within {FRAME_TIMEOUT_S} s")
            lines = self.read_block()
            fields = [line.split(": ", 1) if ": " in line else [line.rstrip(":"), ""]
                      for line in lines if not line.startswith(":")]
            names = {name for name, _ in fields}
            if "data" not in names:
                continue
            event = {"id": None, "data": []}
            for name, value in fields:
                if name == "id":
                    event["id"] = value
                elif name == "data":
                    event["data"].append(value)
            event["data"] = "\n".join(event["data"])
            return event

    def close(self) -> None:
        self.conn.close()
