#!/usr/bin/env python3
"""The cost floor of an HTTP request in Python: servers that do no pub/sub work at all.

    python bench/floor.py tornado --port 8097 --pidfile /tmp/floor.pid
    python bench/floor.py asyncio --port 8097 --pidfile /tmp/floor.pid
    python bench/floor.py zmq --port 8097 --pidfile /tmp/floor.pid [--uvloop]
    python bench/floor.py zmq-batch --port 8097 --pidfile /tmp/floor.pid [--uvloop]

Every request is answered at once: ``PUT`` with ``202`` and an empty body, anything
else with ``204``. ``tornado`` answers through Tornado's ``HTTPServer`` and a bare
``HTTPServerConnectionDelegate`` (the interface the edge's fast path uses, so no
``RequestHandler``); ``asyncio`` parses HTTP/1.1 itself on a raw ``asyncio.Protocol``.
Driving either with ``lpbench.py publish --proto firehose`` measures the server CPU
a request costs before any work of ours: the floor under the edge's figures.

``zmq`` is the floor of our architecture's publish: the ``asyncio`` server, but
every ``PUT`` goes as one msgpack request over a DEALER to a child process
(``echo``: a ROUTER that counts a sequence per channel and replies) and is
answered when the reply is back. No storage, no validation, no fan-out: one
HTTP request and one ZeroMQ round trip between two processes. lpbench counts the
child's CPU too (it is a descendant of the pid in the pidfile).

``zmq-batch`` is ``zmq`` with the link used as firehose-zmq uses it now: a loop
turn's requests go as one ZeroMQ message (a msgpack array of requests), and the
child answers everything one read gave it as one message too.

The process stops by itself after ``--lifetime`` seconds.
"""

import argparse
import asyncio
import itertools
import os
import subprocess
import sys

import msgpack
import zmq

from tornado import httputil
from tornado.httpserver import HTTPServer

_ACCEPTED = httputil.ResponseStartLine("HTTP/1.1", 202, "Accepted")
_NO_CONTENT = httputil.ResponseStartLine("HTTP/1.1", 204, "No Content")


class _Answer(httputil.HTTPMessageDelegate):
    def __init__(self, request_conn):
        self._conn = request_conn
        self._put = False

    def headers_received(self, start_line, headers):
        self._put = start_line.method == "PUT"

    def finish(self):
        if self._put:
            self._conn.write_headers(_ACCEPTED, httputil.HTTPHeaders({"Content-Length": "0"}))
        else:
            self._conn.write_headers(_NO_CONTENT, httputil.HTTPHeaders())
        self._conn.finish()


class _Delegate(httputil.HTTPServerConnectionDelegate):
    def start_request(self, server_conn, request_conn):
        return _Answer(request_conn)


class _RawHTTP(asyncio.Protocol):
    """Keep-alive HTTP/1.1 with Content-Length bodies: just enough for lpbench."""

    def connection_made(self, transport):
        self._transport = transport
        self._buffer = b""

    def data_received(self, data):
        self._buffer += data
        while True:
            head_end = self._buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self._buffer[:head_end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            end = head_end + 4 + length
            if len(self._buffer) < end:
                return
            body = self._buffer[head_end + 4:end]
            self._buffer = self._buffer[end:]
            self.answer(head, body)

    def answer(self, head: bytes, body: bytes) -> None:
        if head.startswith(b"PUT "):
            self._transport.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
        else:
            self._transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")


class _ZmqHop(_RawHTTP):
    """``_RawHTTP`` whose PUTs are answered after a round trip to the echo process."""

    hop = None  # the _Hop shared by every connection

    def answer(self, head: bytes, body: bytes) -> None:
        if head.startswith(b"PUT "):
            self.hop.publish(head.split(b" ", 2)[1], body, self._transport)
        else:
            self._transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")


class _Hop:
    """The DEALER to the echo process and the transports waiting for its replies."""

    def __init__(self, loop, endpoint: str, batch: bool = False):
        self._batch = batch
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.connect(endpoint)
        self._ids = itertools.count()
        self._waiting: dict = {}
        self._outgoing: list = []
        self._loop = loop
        loop.add_reader(self._sock.FD, self._drain)

    def publish(self, channel: bytes, data: bytes, transport) -> None:
        request_id = next(self._ids)
        self._waiting[request_id] = transport
        if not self._outgoing:
            self._loop.call_soon(self._send)
        self._outgoing.append({"id": request_id, "op": "publish", "channel": channel,
                               "data": data})

    def _send(self) -> None:
        """A loop turn's requests go together, as the edge's backend sends them: ZeroMQ's
        I/O thread is woken once for them."""
        outgoing, self._outgoing = self._outgoing, []
        if self._batch:
            self._sock.send(msgpack.packb(outgoing), zmq.NOBLOCK)
        else:
            for request in outgoing:
                self._sock.send(msgpack.packb(request), zmq.NOBLOCK)
        self._drain()  # a send may take the FD's edge

    def _drain(self) -> None:
        while self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            replies = msgpack.unpackb(self._sock.recv(zmq.NOBLOCK))
            for reply in replies if self._batch else (replies,):
                transport = self._waiting.pop(reply["id"])
                transport.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n"
                                b"X-Firehose-Sequence: %d\r\n\r\n" % reply["seq"])


def _number(sequences: dict, request: dict) -> dict:
    seq = sequences[request["channel"]] = sequences.get(request["channel"], 0) + 1
    return {"id": request["id"], "ok": True, "seq": seq}


def echo(batch: bool) -> int:
    """The child of ``zmq``: a ROUTER that numbers each channel's publishes. It ends
    when its parent does. With ``batch`` it reads every request waiting and answers
    each peer's in one message."""
    parent = os.getppid()
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(port, flush=True)
    sequences: dict = {}
    while os.getppid() == parent:
        if not sock.poll(500):
            continue
        if not batch:
            peer, body = sock.recv_multipart()
            sock.send_multipart([peer, msgpack.packb(_number(sequences, msgpack.unpackb(body)))])
            continue
        replies: dict = {}
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            peer, body = sock.recv_multipart(zmq.NOBLOCK)
            replies.setdefault(peer, []).extend(
                _number(sequences, request) for request in msgpack.unpackb(body))
        for peer, answers in replies.items():
            sock.send_multipart([peer, msgpack.packb(answers)])
    return 0


async def serve(kind: str, port: int, lifetime_s: float) -> None:
    loop = asyncio.get_running_loop()
    child = None
    if kind == "tornado":
        server = HTTPServer(_Delegate())
        server.listen(port, "127.0.0.1")
    elif kind in ("zmq", "zmq-batch"):
        batch = kind == "zmq-batch"
        child = subprocess.Popen([sys.executable, __file__, "echo-batch" if batch else "echo",
                                  "--port", "0"], stdout=subprocess.PIPE)
        echo_port = int(child.stdout.readline())
        _ZmqHop.hop = _Hop(loop, f"tcp://127.0.0.1:{echo_port}", batch)
        server = await loop.create_server(_ZmqHop, "127.0.0.1", port)
    else:
        server = await loop.create_server(_RawHTTP, "127.0.0.1", port)
    try:
        await asyncio.sleep(lifetime_s)
    finally:
        server.close()
        if child is not None:
            child.kill()
            child.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["tornado", "asyncio", "zmq", "zmq-batch", "echo",
                                           "echo-batch"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pidfile", help="write this process's pid here")
    parser.add_argument("--lifetime", type=float, default=120.0, help="seconds, then exit")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (as the edge does)")
    args = parser.parse_args(argv)
    if args.kind in ("echo", "echo-batch"):
        return echo(args.kind == "echo-batch")
    if args.pidfile:
        with open(args.pidfile, "w") as f:
            f.write(str(os.getpid()))
    if args.uvloop:
        import uvloop
        uvloop.run(serve(args.kind, args.port, args.lifetime))
    else:
        asyncio.run(serve(args.kind, args.port, args.lifetime))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
