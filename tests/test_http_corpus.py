"""A corpus of raw requests, good and bad: every one gets the same status on a fresh
connection and after other requests on the same connection (a CORS preflight, a
chunked publish), whether the edge reads requests itself or Tornado does."""

import socket
import uuid

import pytest

from .cluster import SERVING_PATHS, Cluster
from .http import read_statuses

HUGE_SEQUENCE = "1" * 70000  # a head over 64 KiB (max_head_bytes)


def _channel() -> str:
    return f"/corpus/{uuid.uuid4().hex}"


def _put(extra: str = "", body: bytes = b"m", path: str = "", host: str = "Host: x\r\n",
         version: str = "HTTP/1.1") -> bytes:
    path = path or _channel()
    return (f"PUT {path} {version}\r\n{host}Content-Length: {len(body)}\r\n{extra}\r\n"
            .encode("latin-1") + body)


# (name, request bytes, the status every serving path must give; None: no answer)
CORPUS = [
    ("plain publish", lambda: _put(), 202),
    ("WebSocket upgrade with a body", lambda: f"GET {_channel()} HTTP/1.1\r\nHost: x\r\n"
                                              "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                                              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                              "Sec-WebSocket-Version: 13\r\n"
                                              "Content-Length: 5\r\n\r\nhello".encode(), 400),
    ("event stream with a body", lambda: f"GET {_channel()} HTTP/1.1\r\nHost: x\r\n"
                                         "Accept: text/event-stream\r\nContent-Length: 2\r\n"
                                         "\r\nhi".encode(), 400),
    ("multiplex POST with an unknown expectation", lambda: b"POST /channels@firehose HTTP/1.1"
                                                           b"\r\nHost: x\r\nExpect: tea\r\n"
                                                           b"Content-Length: 2\r\n\r\n{}", 417),
    ("two hosts joined", lambda: _put(host="Host: a,b\r\n"), 400),
    ("two host fields", lambda: _put(host="Host: a\r\nHost: b\r\n"), 400),
    ("no host", lambda: _put(host=""), 400),
    ("host with a space", lambda: _put(host="Host: a b\r\n"), 400),
    ("host with a bad port", lambda: _put(host="Host: a:b\r\n"), 400),
    ("IPv6 host", lambda: _put(host="Host: [::1]:7474\r\n"), 202),
    ("HTTP/1.0 without host", lambda: _put(host="", version="HTTP/1.0"), 202),
    ("HTTP/2.0 request line", lambda: _put(version="HTTP/2.0"), 400),
    ("HTTP/1.2 request line", lambda: _put(version="HTTP/1.2"), 505),
    ("percent junk in the path", lambda: _put(path=f"{_channel()}/a%zz"), 202),
    ("raw UTF-8 in the path", lambda: _put(path=f"{_channel()}/caf\u00c3\u00a9"), 202),
    ("latin-1 byte in the path", lambda: _put(path=f"{_channel()}/caf\u00e9"), 400),
    ("control byte in the path", lambda: _put(path=f"{_channel()}/a\x01"), 400),
    ("absolute-form target", lambda: _put(path="http://x/a"), 400),
    ("bang in the path", lambda: _put(path=f"{_channel()}!1"), 400),
    ("reserved path", lambda: _put(path="/x@firehose"), 400),
    ("obs-fold", lambda: _put("X-A: b\r\n c\r\n"), 400),
    ("space in a field name", lambda: _put("Bad Name: x\r\n"), 400),
    ("vertical tab in a value", lambda: _put("X-A: a\x0bb\r\n"), 400),
    ("field without a colon", lambda: _put("NoColon\r\n"), 400),
    ("equal Content-Length twice", lambda: _put("Content-Length: 1\r\n"), 202),
    ("unequal Content-Length", lambda: _put("Content-Length: 2\r\n"), 400),
    ("signed Content-Length", lambda: f"PUT {_channel()} HTTP/1.1\r\nHost: x\r\n"
                                      "Content-Length: +1\r\n\r\nm".encode(), 400),
    ("negative Content-Length", lambda: f"PUT {_channel()} HTTP/1.1\r\nHost: x\r\n"
                                        "Content-Length: -1\r\n\r\nm".encode(), 400),
    ("Transfer-Encoding and Content-Length", lambda: _put("Transfer-Encoding: chunked\r\n"),
     400),
    ("gzip Transfer-Encoding", lambda: f"PUT {_channel()} HTTP/1.1\r\nHost: x\r\n"
                                       "Transfer-Encoding: gzip\r\n\r\n".encode(), 400),
    ("malformed chunk", lambda: f"PUT {_channel()} HTTP/1.1\r\nHost: x\r\n"
                                "Transfer-Encoding: chunked\r\n\r\nzz\r\nm\r\n0\r\n\r\n"
                                .encode(), 400),
    ("bare LF lines", lambda: f"PUT {_channel()} HTTP/1.1\nHost: x\nContent-Length: 1\n\nm"
                              .encode(), 202),
    ("double space in the request line", lambda: f"PUT  {_channel()} HTTP/1.1\r\nHost: x\r\n"
                                                   "Content-Length: 0\r\n\r\n".encode(), 400),
    ("lower-case method", lambda: f"put {_channel()} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 405),
    ("unknown method", lambda: f"FOO {_channel()} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 405),
    ("Expect: 100-continue", lambda: _put("Expect: 100-continue\r\n"), 202),
    ("unknown expectation", lambda: _put("Expect: coffee\r\n"), 417),
    ("bad buffer size", lambda: _put("X-Firehose-Buffer-Size: -1\r\n"), 400),
    ("bad TTL", lambda: _put("X-Firehose-TTL: soon\r\n"), 400),
    ("oversized head", lambda: f"GET {_channel()}?last_message_sequence={HUGE_SEQUENCE} "
                               "HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 431),
    ("body over the limit", lambda: f"PUT {_channel()} HTTP/1.1\r\nHost: x\r\n"
                                    "Content-Length: 99999999999\r\n\r\n".encode(), 413),
    ("negative sequence", lambda: f"GET {_channel()}?last_message_sequence=-1 HTTP/1.1\r\n"
                                  "Host: x\r\n\r\n".encode(), 400),
    ("too many query parameters", lambda: f"GET {_channel()}?{'&'.join(['a=1'] * 100)} "
                                          "HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 400),
    ("unknown endpoint", lambda: b"GET /nope@firehose HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    ("multiplex without channels", lambda: b"GET /channels@firehose HTTP/1.1\r\n"
                                           b"Host: x\r\n\r\n", 400),
    ("multiplex body too deep", lambda: b"POST /channels@firehose HTTP/1.1\r\nHost: x\r\n"
                                        b"Content-Length: 2000\r\n\r\n" + b"[" * 2000, 400),
    ("asterisk preflight", lambda: b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 204),
    ("health", lambda: f"HEAD {_channel()} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 200),
    ("delete", lambda: f"DELETE {_channel()} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 204),
    ("bad WebSocket version", lambda: f"GET {_channel()} HTTP/1.1\r\nHost: x\r\n"
                                      "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                      "Sec-WebSocket-Version: 8\r\n\r\n".encode(), 426),
]

PREFACES = {
    "fresh": b"",
    "after a preflight": b"OPTIONS /corpus HTTP/1.1\r\nHost: x\r\nOrigin: http://o.test\r\n\r\n",
    "after a chunked publish": (b"PUT /corpus/chunked HTTP/1.1\r\nHost: x\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n1\r\nm\r\n0\r\n\r\n"),
}


@pytest.fixture(scope="module")
def edges(tmp_path_factory):
    """One cluster per serving path."""
    clusters = {}
    try:
        for name, args in SERVING_PATHS.items():
            clusters[name] = Cluster(tmp_path_factory.mktemp(name), long_poll_timeout_s=1.0,
                                     edge_args=args).start()
        yield clusters
    finally:
        for cluster in clusters.values():
            cluster.stop()


def _statuses(port: int, data: bytes, answers: int, timeout_s: float = 5.0) -> list:
    """The statuses of the first ``answers`` answers to ``data`` on a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_statuses(sock, answers)


@pytest.mark.parametrize("name, build, expected", CORPUS, ids=[case[0] for case in CORPUS])
def test_every_path_gives_the_same_status(edges, name, build, expected):
    """The same bytes get the same status whoever reads them and whatever came first."""
    seen = {}
    for path, cluster in edges.items():
        for preface_name, preface in PREFACES.items():
            wanted = 2 if preface else 1
            statuses = _statuses(cluster.http_port, preface + build(), wanted)
            assert len(statuses) == wanted, (path, preface_name, statuses)
            seen[(path, preface_name)] = statuses[-1]
    assert set(seen.values()) == {expected}, seen
