"""Hostile and careless HTTP and WebSocket clients against a real edge: each is
refused or cut within a bound of time and memory, and a well-behaved client is
served meanwhile (README, "Limits")."""

import json
import os
import socket
import subprocess
import time
import uuid

import pytest

from .cluster import Cluster
from .http import read_statuses, request

KIB = 1024
MIB = 1024 * KIB
MASK = b"\x01\x02\x03\x04"


def fresh() -> str:
    return f"/hostile/{uuid.uuid4().hex}"


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KIB
    raise AssertionError("no VmRSS")


def served(cluster) -> float:
    """Seconds a publish and a long-poll of a well-behaved client took (asserted OK)."""
    started = time.monotonic()
    channel = fresh()
    assert request(cluster.url(channel), "PUT", b"ok", timeout_s=5).status == 202
    assert request(cluster.url(channel), timeout_s=5).status == 200
    return time.monotonic() - started


def frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """A masked client frame (payload under 126 bytes)."""
    assert len(payload) < 126
    return bytes(((0x80 if fin else 0) | opcode, 0x80 | len(payload))) + MASK + bytes(
        b ^ MASK[i % 4] for i, b in enumerate(payload))


def upgraded_socket(cluster, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", cluster.http_port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        more = sock.recv(1)
        assert more, "closed during the handshake"
        head += more
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def flood(sock: socket.socket, unit: bytes, budget_bytes: int, budget_s: float) -> int:
    """Send ``unit`` over and over without reading, until the server stops taking it
    (a send blocks for a second), closes, or a budget runs out; returns bytes sent."""
    sock.settimeout(1.0)
    batch = unit * max(1, 16 * KIB // len(unit))
    sent = 0
    deadline = time.monotonic() + budget_s
    while sent < budget_bytes and time.monotonic() < deadline:
        try:
            sent += sock.send(batch)
        except (socket.timeout, BlockingIOError):
            break
        except (BrokenPipeError, ConnectionResetError):
            break
    return sent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    config = "header_timeout_s = 1.0\nidle_timeout_s = 2.0\nmax_connections = 200"
    with Cluster(tmp_path_factory.mktemp("hostile"), long_poll_timeout_s=2.0,
                 extra_config=config) as running:
        yield running


@pytest.mark.parametrize("unit", [
    frame(0x9),                                       # protocol pings
    frame(0x1, b'{"ping":"PING"}'),                   # Firehose pings
], ids=["ping frames", "ping messages"])
def test_websocket_flood_without_reading_is_bounded(cluster, unit):
    """A client that floods frames whose answers it never reads is closed (more than
    ws_max_frames_per_s), holds a bounded amount of edge memory, and starves nobody:
    the edge keeps answering its workers' heartbeats."""
    pid = cluster.edge.popen.pid
    before = rss_bytes(pid)
    sock = upgraded_socket(cluster, fresh())
    try:
        sent = flood(sock, unit, budget_bytes=200 * MIB, budget_s=15.0)
        grown = rss_bytes(pid) - before
        assert served(cluster) < 2.0
    finally:
        sock.close()
    print(f"flood: sent {sent / MIB:.1f} MiB, edge RSS +{grown / MIB:.1f} MiB")
    assert sent < 32 * MIB, "the edge kept reading a client that does not read"
    assert grown < 64 * MIB, f"edge RSS grew {grown / MIB:.0f} MiB"
    assert "down (no answer" not in cluster.edge.log_text(), "the flood starved the edge"


def test_endless_fragments_close_the_socket_with_1009(cluster):
    """Zero-length continuation frames count toward the message limit."""
    sock = upgraded_socket(cluster, fresh())
    try:
        sock.sendall(frame(0x1, b"x", fin=False))
        sent = flood(sock, frame(0x0, b"", fin=False), budget_bytes=64 * MIB, budget_s=15.0)
        sock.settimeout(5)
        data = b""
        while True:
            try:
                more = sock.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not more:
                break
            data += more
    finally:
        sock.close()
    assert sent < 64 * MIB
    assert b"\x88" in data and (1009).to_bytes(2, "big") in data  # a close frame, 1009
    assert served(cluster) < 2.0


def test_slow_head_is_answered_408_and_closed(cluster):
    """One header byte per interval (slowloris) ends at the header timeout."""
    with socket.create_connection(("127.0.0.1", cluster.http_port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /x HTTP/1.1\r\n")
        answer = b""
        while True:
            try:
                sock.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.3)
            try:
                more = sock.recv(4096)
            except socket.timeout:
                continue
            if not more:
                break
            answer += more
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert elapsed < 5.0


def test_idle_keep_alive_connection_is_closed(cluster):
    with socket.create_connection(("127.0.0.1", cluster.http_port), timeout=10) as sock:
        sock.sendall(f"PUT {fresh()} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nm".encode())
        started = time.monotonic()
        data = b""
        while True:
            more = sock.recv(4096)
            if not more:
                break
            data += more
        elapsed = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 202")
    assert 1.5 < elapsed < 6.0  # idle_timeout_s = 2, swept every second


def test_connections_past_the_cap_get_503_and_the_rest_are_served(cluster):
    """Past ``max_connections`` a new client gets a one-line 503; nothing floods the log."""
    held = []
    try:
        for _ in range(260):
            sock = socket.create_connection(("127.0.0.1", cluster.http_port), timeout=10)
            held.append(sock)
        refused = 0
        for sock in held[-40:]:
            sock.settimeout(5)
            try:
                if sock.recv(4096).startswith(b"HTTP/1.1 503"):
                    refused += 1
            except socket.timeout:
                pass
        assert refused == 40
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # the sweep closes what the test left; new clients are taken again
        try:
            served(cluster)
            break
        except (AssertionError, OSError):
            assert time.monotonic() < deadline
    log = cluster.edge.log_text()
    assert log.count("refusing connections") <= 3


def test_huge_head_is_431_at_once(cluster):
    """A 70,000-digit sequence makes a head past 64 KiB: 431, not silence."""
    raw = f"GET {fresh()}?last_message_sequence={'9' * 70000} HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", cluster.http_port), timeout=5) as sock:
        started = time.monotonic()
        try:
            sock.sendall(raw.encode())
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 431")
    assert time.monotonic() - started < 2.0


def test_deeply_nested_json_is_400_not_500(cluster):
    body = b"[" * 100000 + b"]" * 100000
    answer = request(cluster.url("/channels@firehose"), "POST", body)
    assert answer.status == 400
    assert "nests deeper" in json.loads(answer.body)["reason"]
    assert "Traceback" not in cluster.edge.log_text(), cluster.edge.log_text()[-3000:]


def test_a_subscription_naming_too_many_channels_is_400_at_once(cluster):
    """100,000 channels in a multiplexed POST: 400 in well under a second of CPU, and a
    waiting long-poll of another client is not disturbed."""
    body = json.dumps({f"/c{i}": 0 for i in range(100000)}).encode()
    pid = cluster.edge.popen.pid
    cpu_before = _cpu_s(pid)
    answer = request(cluster.url("/channels@firehose"), "POST", body)
    cpu = _cpu_s(pid) - cpu_before
    print(f"100,000-channel subscription: {answer.status} after {cpu:.3f} s of edge CPU")
    assert answer.status == 400
    assert "at most 1000 channels" in json.loads(answer.body)["reason"]
    assert cpu < 1.0
    query = ",".join(f"/q{i}!0" for i in range(1001))
    assert request(cluster.url(f"/channels@firehose?subscribe={query}")).status == 400
    assert served(cluster) < 2.0


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_publishes_past_the_rate_limit_get_429(tmp_path):
    """With publish_rate_per_s set, a client past its burst gets 429 and Retry-After;
    it may publish again once its bucket refills; another client is not affected."""
    config = "publish_rate_per_s = 20\npublish_burst = 5"
    with Cluster(tmp_path, extra_config=config) as cluster:
        channel = fresh()
        with socket.create_connection(("127.0.0.1", cluster.http_port), timeout=5) as sock:
            one = f"PUT {channel} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nm".encode()
            sock.sendall(one * 10)
            statuses = read_statuses(sock, 10)
        assert statuses == [202] * 5 + [429] * 5, statuses
        assert request(cluster.url(channel)).status == 200  # reading is not limited
        deadline = time.monotonic() + 3
        while request(cluster.url(channel), "PUT", b"again").status != 202:
            assert time.monotonic() < deadline, "the bucket never refilled"
        log = cluster.edge.log_text()
    assert "Traceback" not in log



def test_a_long_poll_on_a_thousand_channels_gets_the_last_ones_message(cluster):
    """At the cap (stream_max_channels): a multiplexed long-poll on 1,000 channels is
    set up and gets a publish to its 1,000th channel; a control client is served
    meanwhile."""
    base = fresh()
    names = [f"{base}/{i}" for i in range(1000)]
    query = ",".join(f"{name}!0" for name in names)
    with socket.create_connection(("127.0.0.1", cluster.http_port), timeout=15) as sock:
        sock.sendall(f"GET /channels@firehose?subscribe={query} HTTP/1.1\r\nHost: x\r\n\r\n"
                     .encode())
        assert served(cluster) < 2.0
        deadline = time.monotonic() + 10
        answer = b""
        while b"\r\n\r\n" not in answer:
            # The publish may come before the last subscription is set up: the poll
            # still gets it (subscribe, then fetch).
            assert request(cluster.url(names[-1]), "PUT", b"last").status == 202
            sock.settimeout(0.5)
            try:
                answer += sock.recv(65536)
            except socket.timeout:
                pass
            assert time.monotonic() < deadline, answer
        while not answer.endswith(b"}"):
            answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["channel"] == names[-1]


def test_out_of_descriptors_the_edge_backs_off_and_recovers(cluster, tmp_path):
    """An edge whose descriptor limit is below its connection cap runs into EMFILE: it
    stops accepting for a while instead of spinning, logs a few lines, and serves new
    clients once connections close."""
    from firehose_zmq.testing import free_port
    from .cluster import BIN, Process
    port = free_port()
    config_path = tmp_path / "edge.toml"
    config_path.write_text(cluster.config_path.read_text()
                           .replace(cluster.native_pub, f"tcp://127.0.0.1:{free_port()}")
                           .replace(cluster.native_router, f"tcp://127.0.0.1:{free_port()}")
                           .replace(cluster.admin, f"127.0.0.1:{free_port()}")
                           .replace("max_connections = 200", "max_connections = 5000"))
    edge = Process("edge under prlimit", ["prlimit", "--nofile=160:160", str(BIN / "firehose-edge"),
                                          "--config", str(config_path)],
                   {**cluster.env, "PORT": str(port)})
    held = []
    try:
        edge.wait_for("edge listening")
        for worker_id in cluster.worker_ids:
            edge.wait_for(f"worker {worker_id} up")
        for _ in range(220):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        edge.wait_for("cannot accept connections")
        cpu_before = _cpu_s(edge.popen.pid)
        with pytest.raises(subprocess.TimeoutExpired):  # two seconds of the edge stuck
            edge.popen.wait(timeout=2.0)
        cpu = _cpu_s(edge.popen.pid) - cpu_before
        for sock in held:
            sock.close()
        held = []
        deadline = time.monotonic() + 10
        while True:
            try:
                if request(f"http://127.0.0.1:{port}{fresh()}", "PUT", b"m",
                           timeout_s=2).status == 202:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the edge did not serve again"
        log = edge.log_text()
    finally:
        for sock in held:
            sock.close()
        edge.stop()
    print(f"out of descriptors: {cpu:.3f} s of edge CPU in 2 s, "
          f"{log.count('cannot accept connections')} warning line(s)")
    assert cpu < 1.0, f"the edge spun for {cpu:.2f} s of CPU in 2 s"
    assert "Traceback" not in log
    assert log.count("cannot accept connections") <= 3


def test_a_huge_chunk_size_is_413_at_once(cluster):
    """A chunk that declares more than the body limit is refused before its data is
    buffered."""
    pid = cluster.edge.popen.pid
    before = rss_bytes(pid)
    with socket.create_connection(("127.0.0.1", cluster.http_port), timeout=5) as sock:
        sock.sendall(f"PUT {fresh()} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     "\r\nffffffffff\r\n".encode())
        sent = flood(sock, b"z" * 65536, budget_bytes=64 * MIB, budget_s=5.0)
        sock.settimeout(5)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                more = sock.recv(4096)
                if not more:
                    break
                answer += more
        except (ConnectionResetError, socket.timeout):
            pass
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert rss_bytes(pid) - before < 32 * MIB, f"sent {sent / MIB:.0f} MiB"


def test_refusals_of_head_requests_have_no_body(cluster):
    """A refused HEAD is answered without a body (the next answer is not shifted)."""
    with socket.create_connection(("127.0.0.1", cluster.http_port), timeout=5) as sock:
        sock.sendall(b"HEAD /a!b HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while data.count(b"\r\n\r\n") < 2:
            more = sock.recv(4096)
            assert more, data
            data += more
    first, second, rest = data.split(b"\r\n\r\n", 2)
    assert first.startswith(b"HTTP/1.1 400")
    assert second.startswith(b"HTTP/1.1 200"), data
    assert rest == b""
