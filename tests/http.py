"""Small HTTP clients for the tests: a blocking one and an asyncio one (Tornado's)."""

import http.client
import socket
from typing import NamedTuple
from urllib.parse import urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPRequest


class Response(NamedTuple):
    status: int
    headers: dict
    body: bytes

    def header(self, name: str):
        return self.headers.get(name.lower())


def request(url: str, method: str = "GET", body=None, headers=None,
            timeout_s: float = 10.0) -> Response:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


_client = None


async def async_request(url: str, method: str = "GET", body=None, headers=None,
                        timeout_s: float = 30.0) -> Response:
    global _client
    if _client is None:
        _client = AsyncHTTPClient(force_instance=True, max_clients=1000)
    if body is None and method in ("PUT", "POST"):
        body = b""
    response = await _client.fetch(HTTPRequest(url, method=method, body=body,
                                               headers=headers or {}, request_timeout=timeout_s,
                                               connect_timeout=timeout_s, allow_nonstandard_methods=True),
                                   raise_error=False)
    if response.code == 599:
        raise response.error
    return Response(response.code, {k.lower(): v for k, v in response.headers.get_all()},
                    response.body or b"")


def reset_async_client() -> None:
    global _client
    if _client is not None:
        _client.close()
        _client = None


def parse_response_head(head: bytes) -> tuple:
    """``(status, {lower-case name: value})`` of a response head without its blank line."""
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers


def read_statuses(sock: socket.socket, count: int) -> list:
    """The statuses of the next ``count`` answers on a raw socket (interim 1xx skipped;
    fewer when the connection ends or times out first)."""
    received = b""
    statuses = []
    while len(statuses) < count:
        while b"\r\n\r\n" not in received:
            try:
                more = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                more = b""
            if not more:
                return statuses
            received += more
        head, _, received = received.partition(b"\r\n\r\n")
        status, headers = parse_response_head(head)
        if status < 200:
            continue
        statuses.append(status)
        length = int(headers.get("content-length", "0"))
        while len(received) < length:
            more = sock.recv(65536)
            if not more:
                return statuses
            received += more
        received = received[length:]
    return statuses
