#!/usr/bin/env python3
"""The cost floor of an HTTP request in Python: servers that do no pub/sub work at all.

    python bench/floor.py tornado --port 8097 --pidfile /tmp/floor.pid
    python bench/floor.py asyncio --port 8097 --pidfile /tmp/floor.pid

Every request is answered at once: ``PUT`` with ``202`` and an empty body, anything
else with ``204``. ``tornado`` answers through Tornado's ``HTTPServer`` and a bare
``HTTPServerConnectionDelegate`` (the interface the edge's fast path uses, so no
``RequestHandler``); ``asyncio`` parses HTTP/1.1 itself on a raw ``asyncio.Protocol``.
Driving either with ``lpbench.py publish --proto firehose`` measures the server CPU
a request costs before any work of ours: the floor under the edge's figures. The
process stops by itself after ``--lifetime`` seconds.
"""

import argparse
import asyncio
import os

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
            self._buffer = self._buffer[end:]
            if head.startswith(b"PUT "):
                self._transport.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
            else:
                self._transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")


async def serve(kind: str, port: int, lifetime_s: float) -> None:
    if kind == "tornado":
        server = HTTPServer(_Delegate())
        server.listen(port, "127.0.0.1")
    else:
        server = await asyncio.get_running_loop().create_server(_RawHTTP, "127.0.0.1", port)
    await asyncio.sleep(lifetime_s)
    server.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["tornado", "asyncio"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pidfile", help="write this process's pid here")
    parser.add_argument("--lifetime", type=float, default=120.0, help="seconds, then exit")
    args = parser.parse_args(argv)
    if args.pidfile:
        with open(args.pidfile, "w") as f:
            f.write(str(os.getpid()))
    asyncio.run(serve(args.kind, args.port, args.lifetime))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
