"""The edge against HTTP/1.1's corner cases (RFC 9112): Connection: close, missing and
malformed fields, bare LF, numbers of thousands of digits, bodies in later reads,
the head cache, a WebSocket in its first bytes, and draining."""

import json
import signal
import socket
import struct
import time
import uuid

import pytest

from .cluster import Cluster
from .http import request
from .test_http_connections import Conn, _masked_text, _server_frame, get, put



# Tornado's own answers (its 400 for a request it cannot parse) carry
# ``Server: TornadoServer/x``; the edge's Connection writes no Server field.
TORNADO_SIGNATURE = "server"


def fresh() -> str:
    return f"/review/{uuid.uuid4().hex}"


def published(cluster, channel: str, body: bytes = b"m") -> int:
    answer = request(cluster.url(channel), "PUT", body)
    assert answer.status == 202, answer
    return int(answer.header("X-Firehose-Sequence"))


def newest_sequence(cluster, channel: str) -> int:
    """The channel's newest sequence (a long-poll from 0 answers at once when there is one)."""
    answer = request(cluster.url(channel))
    assert answer.status == 200, answer
    return json.loads(answer.body)["last_sequence"]


def one_answer(cluster, raw: bytes, timeout_s: float = 5.0):
    """The status of the first answer to ``raw`` on a new connection; None when the
    connection ended (or stayed silent for ``timeout_s``) without one."""
    conn = Conn(cluster, timeout_s=timeout_s)
    try:
        conn.send(raw)
        try:
            answer = conn.response()
        except (ConnectionResetError, socket.timeout, AssertionError):
            return None
        return None if answer is None else answer[0]
    finally:
        conn.close()


def open_connections(cluster) -> int:
    """The edge's ``connections`` gauge (this request's own connection included)."""
    report = json.loads(request(cluster.url("/metrics@firehose")).body)
    return report[-1]["global"]["connections"]


def wait_for_connections_at_most(cluster, limit: int, timeout_s: float = 5.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        count = open_connections(cluster)
        if count <= limit or time.monotonic() > deadline:
            return count


# -- Connection: close (RFC 9112 §9.6) -------------------------------------------------

def test_no_request_is_processed_after_connection_close(cluster):
    """A request pipelined after one carrying ``Connection: close`` is not acted on:
    the server closes after the first answer and publishes nothing more."""
    channel = fresh()
    published(cluster, channel, b"first")
    conn = Conn(cluster)
    try:
        conn.send(get(channel, 0, "Connection: close\r\n") + put(channel, b"sneaked in"))
        status, _, body = conn.response()
        assert status == 200 and json.loads(body)["message"] == "first"
        assert conn.at_eof(), "a second answer followed a Connection: close answer"
    finally:
        conn.close()
    assert newest_sequence(cluster, channel) == 1, "the pipelined PUT was published"


def test_nothing_is_served_after_a_connection_close_answer(cluster):
    """After a ``Connection: close`` answer the connection ends, whatever the bytes
    after it ask for."""
    channel = fresh()
    published(cluster, channel)
    conn = Conn(cluster)
    try:
        conn.send(get(channel, 0, "Connection: close\r\n")
                  + f"OPTIONS {channel} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert conn.response()[0] == 200
        assert conn.at_eof(), "a request after Connection: close was answered"
    finally:
        conn.close()


@pytest.mark.parametrize("kind", ["poll", "publish"])
def test_connection_close_answer_says_close(cluster, kind):
    """The answer to a ``Connection: close`` request carries ``Connection: close``
    (RFC 9112 §9.6 SHOULD; Tornado's does)."""
    channel = fresh()
    published(cluster, channel)
    raw = (get(channel, 0, "Connection: close\r\n") if kind == "poll"
           else put(channel, b"x", "Connection: close\r\n"))
    conn = Conn(cluster)
    try:
        conn.send(raw)
        status, headers, _ = conn.response()
    finally:
        conn.close()
    assert status in (200, 202)
    assert headers.get("connection", "").lower() == "close"


# -- Request syntax RFC 9112 refuses ----------------------------------------------------

def test_request_without_host_is_refused(cluster):
    """HTTP/1.1 without ``Host`` is a 400 (RFC 9112 §3.2; Tornado answers 400), and
    nothing is published."""
    channel = fresh()
    published(cluster, channel)
    assert one_answer(cluster, f"GET {channel} HTTP/1.1\r\n\r\n".encode()) == 400
    assert one_answer(cluster, f"PUT {channel} HTTP/1.1\r\nContent-Length: 1\r\n\r\nx"
                      .encode()) == 400
    assert newest_sequence(cluster, channel) == 1


@pytest.mark.parametrize("bad_line", [
    "X-Note: a\x01b",           # a control character in a value
    "X-Note: a\rb",             # a bare CR (RFC 9112 §2.2)
    "Bad Name: x",              # a space in a field name
    "X(y): 1",                  # a field name that is not a token
    "Host: a b",                # an invalid Host
])
def test_malformed_header_field_is_refused(cluster, bad_line):
    """A field Tornado refuses with 400 is refused on the fast path too, not published."""
    channel = fresh()
    published(cluster, channel)
    raw = (f"PUT {channel} HTTP/1.1\r\nHost: x\r\n{bad_line}\r\nContent-Length: 1\r\n\r\nx"
           .replace("Host: x\r\nHost: a b", "Host: a b").encode("latin-1"))
    assert one_answer(cluster, raw) == 400
    assert newest_sequence(cluster, channel) == 1


def test_content_length_with_a_vertical_tab_is_refused(cluster):
    """``Content-Length: 1<VT>`` is not a Content-Length (Tornado: 400); the fast path
    must not strip the VT and publish."""
    channel = fresh()
    published(cluster, channel)
    raw = f"PUT {channel} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\x0b\r\n\r\nx".encode()
    assert one_answer(cluster, raw) == 400
    assert newest_sequence(cluster, channel) == 1


def test_request_with_bare_lf_line_ends_is_answered(cluster):
    """A head whose lines end in a bare LF (RFC 9112 §2.2 lets a server accept it;
    Tornado does) is answered, not left waiting for a CRLF that never comes."""
    channel = fresh()
    published(cluster, channel, b"lf")
    raw = f"GET {channel}?last_message_sequence=0 HTTP/1.1\nHost: x\n\n".encode()
    assert one_answer(cluster, raw) == 200


# -- Huge numbers ------------------------------------------------------------------------

HUGE = "1" + "0" * 5000  # more digits than int() converts (sys.get_int_max_str_digits)


def test_content_length_with_thousands_of_digits_gets_an_answer(cluster):
    """A Content-Length far beyond the limit is a 413 (or 400), not a dropped connection."""
    channel = fresh()
    raw = f"PUT {channel} HTTP/1.1\r\nHost: x\r\nContent-Length: {HUGE}\r\n\r\n".encode()
    assert one_answer(cluster, raw) in (400, 413)


@pytest.mark.parametrize("header", ["X-Firehose-Buffer-Size", "X-Firehose-TTL"])
def test_publish_header_with_thousands_of_digits_gets_an_answer(cluster, header):
    """A publish option with thousands of digits is answered (400 for a buffer size
    above the maximum), never a dropped connection or a 500."""
    channel = fresh()
    raw = put(channel, b"x", f"{header}: {HUGE}\r\n")
    status = one_answer(cluster, raw)
    assert status is not None and status < 500
    if header == "X-Firehose-Buffer-Size":
        assert status == 400


def test_last_event_id_with_thousands_of_digits_gets_an_answer(cluster):
    """An event stream whose Last-Event-ID has thousands of digits gets a 400."""
    channel = fresh()
    raw = (f"GET {channel} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
           f"Last-Event-ID: {HUGE}\r\n\r\n").encode()
    assert one_answer(cluster, raw) == 400


def test_last_message_sequence_with_thousands_of_digits_is_400(cluster):
    """Long-poll with an enormous N: 400 (too large), not 500."""
    channel = fresh()
    raw = f"GET {channel}?last_message_sequence={HUGE} HTTP/1.1\r\nHost: x\r\n\r\n"
    assert one_answer(cluster, raw.encode()) == 400


# -- Bodies ------------------------------------------------------------------------------

def test_publish_whose_body_arrives_in_later_reads(cluster):
    """A PUT within the limit whose body takes several reads is published by the edge's
    own connection, which then serves the next request."""
    channel = fresh()
    body = b"b" * (1024 * 1024)  # more than one read of the transport
    conn = Conn(cluster)
    try:
        conn.send(put(channel, body) + get(channel, 0))
        published_answer, polled = conn.response(), conn.response()
    finally:
        conn.close()
    assert published_answer[0] == 202 and polled[0] == 200
    assert TORNADO_SIGNATURE not in published_answer[1], "the publish was served by Tornado"
    assert TORNADO_SIGNATURE not in polled[1], "the connection was handed to Tornado"


# -- Resource accounting -----------------------------------------------------------------

def _kernel_queues(local_port: int, remote_port: int) -> tuple:
    """(tx_queue, rx_queue) of the loopback TCP socket local_port -> remote_port."""
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1].split(":")[1], fields[2].split(":")[1]
            if int(local, 16) == local_port and int(remote, 16) == remote_port:
                tx, rx = fields[4].split(":")
                return int(tx, 16), int(rx, 16)
    return 0, 0


def test_client_reset_while_its_answer_is_queued_is_not_counted_open(fresh_cluster):
    """A client that resets its connection while its answer is still queued in the
    edge and its next request waits is no longer counted in the ``connections`` gauge
    of /metrics@firehose."""
    cluster = fresh_cluster
    channel = fresh()
    # An answer a few KB larger than what the kernel buffers of a loopback connection
    # take with a 2 KB receive buffer (2177024 bytes): the rest stays queued in the
    # edge, under its low-water mark, so the next request waits.
    published(cluster, channel, b"z" * (2177024 + 8000))
    before = open_connections(cluster)
    conn = Conn(cluster, rcvbuf=2048)
    try:
        conn.send(get(channel, 0) + f"OPTIONS {channel} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        conn.data = conn.sock.recv(1)  # the answer is being written
        total = 2177024 + 8000 + 100
        client_port = conn.sock.getsockname()[1]
        deadline = time.monotonic() + 10.0
        while True:  # until the edge holds less than its low-water mark (16 KiB) itself
            server_tx, _ = _kernel_queues(cluster.http_port, client_port)
            _, client_rx = _kernel_queues(client_port, cluster.http_port)
            if server_tx + client_rx + 1 >= total - 12000:
                break
            assert time.monotonic() < deadline, (server_tx, client_rx)
    finally:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # RST
    assert wait_for_connections_at_most(cluster, before) <= before


def test_websocket_closed_in_its_first_bytes_gets_a_close_reply(cluster):
    """A handshake with a close frame right behind it: 101, the close echoed, EOF."""
    conn = Conn(cluster)
    try:
        conn.send(f"GET {fresh()} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
                  + b"\x88\x82\x00\x00\x00\x00\x03\xe8")
        while b"\r\n\r\n" not in conn.data:
            assert conn._fill()
        head, _, conn.data = conn.data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        assert _server_frame(conn) == (0x8, b"\x03\xe8")
        assert conn.at_eof()
    finally:
        conn.close()


def test_websocket_subscribe_pipelined_with_the_handshake(cluster):
    """A subscribe frame in the same packet as the handshake replays, then a ping pongs."""
    channel = fresh()
    published(cluster, channel, b"early")
    conn = Conn(cluster)
    try:
        conn.send(f"GET {channel} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
                  + _masked_text(b'{"last_message_sequence":0}')
                  + _masked_text(b'{"ping":"PING"}'))
        while b"\r\n\r\n" not in conn.data:
            assert conn._fill()
        conn.data = conn.data.partition(b"\r\n\r\n")[2]
        assert _server_frame(conn) == (0x1, b'{"message":"early","last_sequence":1}')
        assert _server_frame(conn) == (0x1, b'{"pong":"PONG"}')
    finally:
        conn.close()


def test_long_poll_head_cache_does_not_mix_up_answers(cluster):
    """The same head on two channels' connections, and one head re-sent after the
    channel moved on: each answer is the one its own request asks for."""
    a, b = fresh(), fresh()
    published(cluster, a, b"a1")
    published(cluster, b, b"b1")
    published(cluster, b, b"b2")
    conn = Conn(cluster)
    try:
        conn.send(get(a, 0) + get(b, 1) + get(a, 0))
        answers = [json.loads(conn.response()[2]) for _ in range(3)]
        published(cluster, a, b"a2")
        conn.send(get(a, 0, "Origin: http://o.example\r\n") + get(a, 0))
        with_origin, again = conn.response(), conn.response()
    finally:
        conn.close()
    assert answers == [{"message": "a1", "last_sequence": 1},
                       {"message": "b2", "last_sequence": 2},
                       {"message": "a1", "last_sequence": 1}]
    assert with_origin[1]["access-control-allow-origin"] == "http://o.example"
    assert json.loads(with_origin[2])["message"] == "a2"
    assert "access-control-allow-origin" not in again[1]
    assert json.loads(again[2]) == {"message": "a2", "last_sequence": 2}


def test_long_poll_head_cache_memory_is_bounded(cluster):
    """Distinct long-poll heads with big headers are not kept by the edge: thousands of
    60 KB heads do not grow its resident memory by hundreds of MB."""
    channel = fresh()
    published(cluster, channel)
    pid = cluster.edge.popen.pid

    def rss_kib() -> int:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    before = rss_kib()
    filler = "y" * 60000
    for batch in range(30):
        conn = Conn(cluster, timeout_s=30.0)
        try:
            conn.send(b"".join(get(channel, 0, f"X-Pad: {batch}-{i}-{filler}\r\n")
                               for i in range(100)))
            for _ in range(100):
                assert conn.response()[0] == 200
        finally:
            conn.close()
    grown_mib = (rss_kib() - before) / 1024
    assert grown_mib < 64, f"the edge grew by {grown_mib:.0f} MiB"


# -- Drain (SIGTERM) ---------------------------------------------------------------------

def test_drain_answers_every_fast_path_client(tmp_path):
    """SIGTERM: a waiting long-poll gets 204, an event stream ends cleanly, a WebSocket
    is closed, a keep-alive idle connection is closed, and the edge exits."""
    with Cluster(tmp_path, long_poll_timeout_s=30.0) as running:
        channel = fresh()
        published(running, channel)
        poll, sse, ws, idle = (Conn(running, timeout_s=10.0) for _ in range(4))
        try:
            poll.send(get(channel, 1))
            sse.send(f"GET {channel} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
                     .encode())
            while b"data: m" not in sse.data:
                assert sse._fill()
            ws.send(f"GET {channel} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
                    + _masked_text(b'{"last_message_sequence":0}'))
            while b"\r\n\r\n" not in ws.data:
                assert ws._fill()
            ws.data = ws.data.partition(b"\r\n\r\n")[2]
            assert _server_frame(ws)[0] == 0x1
            idle.send(put(channel, b"k"))
            assert idle.response()[0] == 202
            assert poll.response()[0] == 200  # the keep-alive publish woke it
            poll.send(get(channel, 2))
            running.edge.signal(signal.SIGTERM)
            assert poll.response()[0] == 204
            assert poll.at_eof()
            while not sse.data.endswith(b"0\r\n\r\n"):
                assert sse._fill(), "the event stream was cut, not ended"
            try:
                while ws._fill():
                    pass
            except ConnectionResetError:
                pass
            assert idle.at_eof()
            assert running.edge.popen.wait(15) == 0
        finally:
            for conn in (poll, sse, ws, idle):
                conn.close()
