"""Small HTTP clients for the tests: a blocking one and an asyncio one (Tornado's)."""

import http.client
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
