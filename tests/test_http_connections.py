"""HTTP/1.1 connections against a real edge, on both event loops and with Tornado
reading the requests: keep-alive, pipelining, split bodies, half-close, CORS, and a
WebSocket after other requests on one connection."""

import json
import socket
import uuid

import pytest

from .cluster import Cluster
from .http import request


@pytest.fixture(scope="module", params=["uvloop", "asyncio", "slow"])
def cluster(request, tmp_path_factory):
    """The edge on either event loop, and with Tornado reading every request."""
    args = ["--no-fast-path"] if request.param == "slow" else ["--loop", request.param]
    with Cluster(tmp_path_factory.mktemp("fast"), long_poll_timeout_s=3.0,
                 edge_args=args) as running:
        yield running


def fresh() -> str:
    return f"/fast/{uuid.uuid4().hex}"


class Conn:
    """A raw keep-alive connection that reads whole responses (Content-Length framed)."""

    def __init__(self, cluster, rcvbuf=None, timeout_s=10.0):
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout_s)
        self.sock.connect(("127.0.0.1", cluster.http_port))
        self.data = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        more = self.sock.recv(65536)
        self.data += more
        return bool(more)

    def response(self):
        """(status, headers, body) of the next response; None at end of stream."""
        while b"\r\n\r\n" not in self.data:
            if not self._fill():
                assert self.data == b"", f"connection closed inside a response: {self.data!r}"
                return None
        head, _, self.data = self.data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", 0))
        while len(self.data) < length:
            assert self._fill(), "connection closed inside a body"
        body, self.data = self.data[:length], self.data[length:]
        return int(lines[0].split(" ")[1]), headers, body

    def at_eof(self) -> bool:
        return self.data == b"" and not self._fill()

    def close(self) -> None:
        self.sock.close()


def put(channel: str, body: bytes, extra: str = "") -> bytes:
    return (f"PUT {channel} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


def get(channel: str, seq: int, extra: str = "") -> bytes:
    return f"GET {channel}?last_message_sequence={seq} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def test_pipelined_requests_are_answered_in_order(cluster):
    channel = fresh()
    conn = Conn(cluster)
    try:
        conn.send(put(channel, b"one") + put(channel, b"two") + get(channel, 1) + get(channel, 0))
        answers = [conn.response() for _ in range(4)]
    finally:
        conn.close()
    assert [a[0] for a in answers] == [202, 202, 200, 200]
    assert [a[1]["x-firehose-sequence"] for a in answers[:2]] == ["1", "2"]
    assert json.loads(answers[2][2]) == {"message": "two", "last_sequence": 2}
    assert json.loads(answers[3][2])["last_sequence"] == 2


def test_requests_of_every_kind_on_one_connection(cluster):
    """A publish, a CORS preflight, a publish and a long-poll on one connection: all
    answered, in order."""
    channel = fresh()
    conn = Conn(cluster)
    try:
        conn.send(put(channel, b"a")
                  + f"OPTIONS {channel} HTTP/1.1\r\nHost: x\r\nOrigin: http://o.example\r\n"
                    "\r\n".encode()
                  + put(channel, b"b") + get(channel, 1))
        answers = [conn.response() for _ in range(4)]
    finally:
        conn.close()
    assert [a[0] for a in answers] == [202, 204, 202, 200]
    assert "GET" in answers[1][1]["access-control-allow-methods"]
    assert answers[2][1]["x-firehose-sequence"] == "2"
    assert json.loads(answers[3][2]) == {"message": "b", "last_sequence": 2}


def test_big_answer_read_slowly_then_the_next_request(cluster):
    """A big answer the client is slow to read is written whole before the request
    that follows it is answered."""
    channel = fresh()
    payload = b"x" * (3 * 1024 * 1024)
    assert request(cluster.url(channel), "PUT", payload).status == 202
    conn = Conn(cluster, rcvbuf=4096)
    try:
        conn.send(get(channel, 0) + f"OPTIONS {channel} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        first, second = conn.response(), conn.response()
    finally:
        conn.close()
    assert first[0] == 200 and json.loads(first[2])["message"] == payload.decode()
    assert second[0] == 204


def test_body_in_pieces(cluster):
    channel = fresh()
    conn = Conn(cluster)
    try:
        whole = put(channel, b"split body")
        for i in range(len(whole)):
            conn.send(whole[i:i + 1])
        status, headers, _ = conn.response()
    finally:
        conn.close()
    assert status == 202
    assert json.loads(request(cluster.url(channel)).body)["message"] == "split body"


def test_connection_close_is_honoured(cluster):
    channel = fresh()
    conn = Conn(cluster)
    try:
        conn.send(put(channel, b"m", "Connection: close\r\n"))
        assert conn.response()[0] == 202
        assert conn.at_eof()
    finally:
        conn.close()


def test_half_closed_publisher_gets_its_answer(cluster):
    if "--no-fast-path" in cluster.edge_args:
        pytest.skip("Tornado's IOStream takes a half-close for a close")
    channel = fresh()
    conn = Conn(cluster)
    try:
        conn.send(put(channel, b"last words"))
        conn.sock.shutdown(socket.SHUT_WR)
        assert conn.response()[0] == 202
        assert conn.at_eof()
    finally:
        conn.close()
    assert json.loads(request(cluster.url(channel)).body)["message"] == "last words"


def test_cors_on_the_fast_path(cluster):
    channel = fresh()
    conn = Conn(cluster)
    try:
        conn.send(put(channel, b"m", "Origin: http://page.example\r\n")
                  + get(channel, 0, "Origin: http://page.example\r\n")
                  + get(channel, 0, "Origin: http://bad\x0b.example\r\n"))
        published, polled, odd = conn.response(), conn.response(), conn.response()
    finally:
        conn.close()
    for answer in (published, polled):
        assert answer[1]["access-control-allow-origin"] == "http://page.example"
        assert answer[1]["vary"] == "Origin"
    assert odd[0] == 400  # a control character in a field: Tornado refuses the request


def test_endless_head_is_cut_off(cluster):
    """A head that never ends is not buffered without bound: the connection is closed."""
    conn = Conn(cluster)
    try:
        conn.send(f"GET {fresh()} HTTP/1.1\r\nHost: x\r\nX-Big: ".encode())
        try:
            for _ in range(64):
                conn.send(b"y" * 16384)
            answer = conn.response()
        except (ConnectionResetError, BrokenPipeError):
            answer = None
    finally:
        conn.close()
    assert answer is None or answer[0] in (400, 431)
    assert request(cluster.url(fresh()), "PUT", b"still serving").status == 202


def test_waiting_poll_then_upgrade_to_event_stream(cluster):
    """A long-poll answered on the fast path, then an event stream on the same connection."""
    channel = fresh()
    assert request(cluster.url(channel), "PUT", b"first").status == 202
    conn = Conn(cluster)
    try:
        conn.send(get(channel, 0) + f"GET {channel} HTTP/1.1\r\nHost: x\r\n"
                                    "Accept: text/event-stream\r\n\r\n".encode())
        status, _, body = conn.response()
        assert status == 200 and json.loads(body)["message"] == "first"
        while b"data: first" not in conn.data:
            assert conn._fill()
        assert conn.data.startswith(b"HTTP/1.1 200")
        assert b"text/event-stream" in conn.data
    finally:
        conn.close()


def _masked_text(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    assert len(payload) < 126
    return bytes((0x81, 0x80 | len(payload))) + mask + bytes(
        b ^ mask[i % 4] for i, b in enumerate(payload))


def _server_frame(conn: Conn):
    """(opcode, payload) of the next unmasked server frame (short frames only)."""
    while len(conn.data) < 2 or len(conn.data) < 2 + (conn.data[1] & 0x7F):
        assert conn._fill(), "closed before a whole frame"
    opcode, length = conn.data[0] & 0x0F, conn.data[1] & 0x7F
    assert length < 126
    payload, conn.data = conn.data[2:2 + length], conn.data[2 + length:]
    return opcode, payload


def test_websocket_upgrade_after_a_publish_on_the_same_connection(cluster):
    """A publish, then an upgrade on the same connection: the socket replays and
    streams, answers a JSON ping, and echoes the client's close code."""
    channel = fresh()
    conn = Conn(cluster)
    try:
        conn.send(put(channel, b"before")
                  + f"GET {channel} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
        assert conn.response()[0] == 202
        while b"\r\n\r\n" not in conn.data:
            assert conn._fill()
        head, _, conn.data = conn.data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
        conn.send(_masked_text(b'{"message_sequence":0}') + _masked_text(b'{"ping":"PING"}'))
        assert _server_frame(conn) == (0x1, b'{"message":"before","last_sequence":1}')
        assert _server_frame(conn) == (0x1, b'{"pong":"PONG"}')
        assert request(cluster.url(channel), "PUT", b"after").status == 202
        assert _server_frame(conn) == (0x1, b'{"message":"after","last_sequence":2}')
        conn.send(b"\x88\x82\x00\x00\x00\x00\x0f\xa1")  # close 4001, mask of zeros
        assert _server_frame(conn) == (0x8, b"\x0f\xa1")
        assert conn.at_eof()
    finally:
        conn.close()


def test_unmasked_client_frame_closes_with_1002(cluster):
    conn = Conn(cluster)
    try:
        conn.send(f"GET {fresh()} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
        while b"\r\n\r\n" not in conn.data:
            assert conn._fill()
        conn.data = conn.data.partition(b"\r\n\r\n")[2]
        conn.send(b"\x81\x02hi")
        opcode, payload = _server_frame(conn)
        assert opcode == 0x8 and payload[:2] == b"\x03\xea"  # 1002
        assert conn.at_eof()
    finally:
        conn.close()
