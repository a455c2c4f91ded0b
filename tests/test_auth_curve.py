"""CURVE on the ZeroMQ links: firehose-keys, key files, the ZAP handler, native rights,
and a real two-worker cluster that nobody without a key can talk to."""

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from zmq.utils.monitor import parse_monitor_message

from firehose_zmq.auth import curve
from firehose_zmq.auth.keys import write_key_pair
from firehose_zmq.auth.tokens import AuthError
from firehose_zmq.config import ConfigError, load_config

from .cluster import Cluster, Process, BIN, channel_on
from .http import request

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 5.0


def keys(directory, *names) -> dict:
    """name -> (public file, secret file, z85 public key)."""
    directory.mkdir(exist_ok=True)
    return {name: write_key_pair(str(directory), name) for name in names}


def curve_tables(key_dir, workers=("w1", "w2"), native_clients=()) -> str:
    lines = ["[curve]", "enabled = true",
             "worker_keys = {" + ", ".join(f'{w} = "{key_dir}/{w}.key"' for w in workers) + "}",
             "worker_secret_keys = {" + ", ".join(f'{w} = "{key_dir}/{w}.key_secret"'
                                                  for w in workers) + "}",
             f'edge_key = "{key_dir}/edge.key"', f'edge_secret_key = "{key_dir}/edge.key_secret"',
             f'native_secret_key = "{key_dir}/native.key_secret"', ""]
    for name, publish, subscribe in native_clients:
        lines += ["[[curve.native_clients]]", f'key = "{key_dir}/{name}.key"',
                  f"publish = {list(publish)!r}".replace("'", '"'),
                  f"subscribe = {list(subscribe)!r}".replace("'", '"'), ""]
    return "\n".join(lines)


# -- firehose-keys and key files ---------------------------------------------


def test_firehose_keys_writes_a_secret_only_its_owner_reads(tmp_path):
    """The launcher writes NAME.key (0644) and NAME.key_secret (0600) and never overwrites."""
    run = [sys.executable, str(ROOT / "bin" / "firehose-keys"), "--dir", str(tmp_path / "k"),
           "w1", "edge"]
    result = subprocess.run(run, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for name in ("w1", "edge"):
        secret = tmp_path / "k" / f"{name}.key_secret"
        public = tmp_path / "k" / f"{name}.key"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert stat.S_IMODE(public.stat().st_mode) == 0o644
        pub, sec = curve.load_key_pair(str(secret))
        assert curve.load_public_key(str(public)) == pub and zmq.curve_public(sec) == pub
        assert b"secret" not in public.read_bytes().replace(b"secret key", b"")
        assert pub.decode() in result.stdout
    before = (tmp_path / "k" / "w1.key_secret").read_bytes()
    again = subprocess.run(run, capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "exists" in again.stderr
    assert (tmp_path / "k" / "w1.key_secret").read_bytes() == before


@pytest.mark.parametrize("problem, message", [
    ("missing", "cannot read CURVE key"),
    ("public only", "holds no secret key"),
    ("readable by others", "chmod 600"),
    ("not a key", "No public key"),
])
def test_unusable_key_files_are_one_line_errors(tmp_path, problem, message):
    (public, secret, _), = keys(tmp_path / "k", "x").values()
    path = {"missing": str(tmp_path / "nope"), "public only": public}.get(problem, secret)
    if problem == "readable by others":
        os.chmod(secret, 0o640)
    if problem == "not a key":
        Path(secret).write_text("hello\n")
    with pytest.raises(ConfigError, match=message) as raised:
        curve.load_key_pair(path)
    assert isinstance(raised.value, OSError)


def test_curve_config_needs_every_key(tmp_path):
    """curve.enabled without a worker's key, or with a key for an unknown worker, is refused."""
    base = ("[[workers]]\nid='w1'\nrouter_bind='tcp://127.0.0.1:1'\n"
            "router_connect='tcp://127.0.0.1:1'\npub_bind='tcp://127.0.0.1:2'\n"
            "pub_connect='tcp://127.0.0.1:2'\n")
    for text, expected in [
            ("[curve]\nenabled=true\nedge_key='e'\nedge_secret_key='e'\nnative_secret_key='n'\n",
             "no key for worker w1"),
            ("[curve]\nworker_keys={w9='x'}\n", "no worker w9"),
            ("[curve]\nenabled=true\nworker_keys={w1='w'}\n", "curve.edge_key must name"),
            ("[curve]\n[[curve.native_clients]]\npublish=['/a']\n", "needs key"),
    ]:
        path = tmp_path / "c.toml"
        path.write_text(base + text)
        with pytest.raises(ConfigError, match=expected):
            load_config(str(path), environ={})


# -- ZAP and native rights, in-process -------------------------------------------------


class Config:
    """The parts of a ClusterConfig that the curve module reads."""

    def __init__(self, text, tmp_path):
        path = tmp_path / "c.toml"
        workers = ("[[workers]]\nid='w1'\nrouter_bind='tcp://127.0.0.1:1'\n"
                   "router_connect='tcp://127.0.0.1:1'\npub_bind='tcp://127.0.0.1:2'\n"
                   "pub_connect='tcp://127.0.0.1:2'\n")
        path.write_text(workers + text)
        self.config = load_config(str(path), environ={})


def monitor_events(sock):
    return sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | curve.HANDSHAKE_FAILED)


def next_event(monitor, timeout_s=WAIT_S) -> int:
    assert monitor.poll(int(timeout_s * 1000)), "no handshake event"
    return parse_monitor_message(monitor.recv_multipart())["event"]


def test_native_rights_follow_the_client_key(tmp_path, ctx):
    """Through the native hooks, a key reads and publishes only the channels granted to it."""
    key_dir = tmp_path / "k"
    made = keys(key_dir, "w1", "edge", "native", "reader", "writer")
    config = Config(curve_tables(key_dir, ("w1",), [("reader", [], ["/chat/*"]),
                                                     ("writer", ["/chat/*"], ["/x"])]),
                    tmp_path).config
    rights = curve.NativeRights(config)
    xpub = ctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.LINGER, 0)
    xpub.setsockopt(zmq.XPUB_MANUAL, 1)
    curve.secure_server(xpub, config, curve.NATIVE)
    port = xpub.bind_to_random_port("tcp://127.0.0.1")
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    curve.secure_server(router, config, curve.NATIVE)
    router_port = router.bind_to_random_port("tcp://127.0.0.1")
    native_public = made["native"][2].encode()

    def client(kind, name, endpoint):
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        public, secret = curve.load_key_pair(made[name][1])
        curve.client_keys(sock, native_public, public, secret)
        sock.connect(endpoint)
        return sock

    subs = {name: client(zmq.SUB, name, f"tcp://127.0.0.1:{port}") for name in ("reader", "writer")}
    for sub in subs.values():
        sub.setsockopt(zmq.SUBSCRIBE, b"/chat/a\x00")
    subs["writer"].setsockopt(zmq.SUBSCRIBE, b"")  # everything: never granted by /x
    applied = 0
    for _ in range(3):
        assert xpub.poll(int(WAIT_S * 1000))
        frame = xpub.recv(copy=False)
        if rights.subscription_allowed(frame):
            xpub.setsockopt(zmq.SUBSCRIBE, frame.bytes[1:])
            applied += 1
    assert applied == 1
    xpub.send_multipart([b"/chat/a\x00", b"m"])
    assert subs["reader"].poll(int(WAIT_S * 1000)) and subs["reader"].recv_multipart()[1] == b"m"
    assert not subs["writer"].poll(200)

    for name, op, channel, allowed in [("writer", "publish", "/chat/a", True),
                                       ("writer", "delete", "/chat/b", True),
                                       ("writer", "publish", "/news", False),
                                       ("reader", "publish", "/chat/a", False),
                                       ("reader", "fetch", "/chat/a", True),
                                       ("writer", "fetch", "/chat/a", False),
                                       ("reader", "ping", None, True)]:
        dealer = client(zmq.DEALER, name, f"tcp://127.0.0.1:{router_port}")
        dealer.send(b"request")
        assert router.poll(int(WAIT_S * 1000))
        identity, body = router.recv_multipart(copy=False)
        try:
            rights.check_request({"op": op, "channel": channel}, body)
            outcome = True
        except AuthError as exc:
            assert exc.status == 403 and channel in exc.reason
            outcome = False
        assert outcome is allowed, (name, op, channel)
        dealer.close()


def test_unknown_client_key_is_refused_by_zap(tmp_path, ctx):
    """A client whose key is not configured fails the handshake (ZAP 400) and the worker
    socket receives nothing; the edge's key gets through."""
    key_dir = tmp_path / "k"
    made = keys(key_dir, "w1", "edge", "native", "stranger")
    config = Config(curve_tables(key_dir, ("w1",)), tmp_path).config
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    curve.secure_server(router, config, "w1")
    port = router.bind_to_random_port("tcp://127.0.0.1")
    for name, expected in (("stranger", zmq.EVENT_HANDSHAKE_FAILED_AUTH),
                           ("edge", zmq.EVENT_HANDSHAKE_SUCCEEDED)):
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        public, secret = curve.load_key_pair(made[name][1])
        curve.client_keys(dealer, made["w1"][2].encode(), public, secret)
        monitor = monitor_events(dealer)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send(b"hello")
        assert next_event(monitor) == expected
        got = router.poll(1000 if name == "stranger" else int(WAIT_S * 1000))
        assert bool(got) is (name == "edge")
        if got:
            assert router.recv_multipart()[1] == b"hello"
        dealer.disable_monitor()
        monitor.close()
        dealer.close()


# -- real processes -----------------------------------------------------------


@pytest.fixture(scope="module")
def curve_cluster(tmp_path_factory):
    """A two-worker cluster with CURVE on every link and two native client keys."""
    tmp_path = tmp_path_factory.mktemp("curve")
    key_dir = tmp_path / "keys"
    made = keys(key_dir, "w1", "w2", "edge", "native", "app", "stranger", "reader")
    tables = curve_tables(key_dir, native_clients=[("app", ["*"], ["*"]),
                                                   ("reader", [], ["/chat/*"])])
    with Cluster(tmp_path, tables=tables) as running:
        running.keys = made
        running.key_dir = key_dir
        yield running


def test_curve_cluster_works_for_the_edge(curve_cluster):
    """With CURVE on, the edge reaches both workers: publish and read back on each."""
    for worker_id in curve_cluster.worker_ids:
        channel = channel_on(worker_id, curve_cluster.worker_ids, "/curve")
        assert request(curve_cluster.url(channel), "PUT", b"hi").status == 202
        reply = request(curve_cluster.url(channel))
        assert reply.status == 200 and b'"hi"' in reply.body


def test_plain_socket_gets_nothing_from_any_port(curve_cluster, ctx):
    """A ZeroMQ socket without a key fails the handshake on every port of the cluster and
    receives nothing, while a keyed native client gets the same message."""
    ports = [(zmq.SUB, curve_cluster.native_pub), (zmq.DEALER, curve_cluster.native_router)]
    for router, pub in curve_cluster.endpoints.values():
        ports += [(zmq.DEALER, router), (zmq.SUB, pub)]
    plain = []
    for kind, endpoint in ports:
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        monitor = monitor_events(sock)
        sock.connect(endpoint)
        if kind == zmq.DEALER:
            sock.send(msgpack.packb({"v": 1, "id": 1, "op": "ping"}))
        assert next_event(monitor) & curve.HANDSHAKE_FAILED, endpoint
        plain.append(sock)
    channels = [channel_on(worker_id, curve_cluster.worker_ids, "/plain")
                for worker_id in curve_cluster.worker_ids]
    keyed = keyed_socket(ctx, curve_cluster, zmq.SUB, "app")
    for channel in channels:
        keyed.setsockopt(zmq.SUBSCRIBE, channel.encode() + b"\x00")
    keyed.connect(curve_cluster.native_pub)
    deadline = time.monotonic() + WAIT_S
    while not keyed.poll(100):
        assert time.monotonic() < deadline, "the keyed subscriber got nothing"
        for channel in channels:
            assert request(curve_cluster.url(channel), "PUT", b"secret").status == 202
    for sock in plain:
        assert not sock.poll(0), "a socket without a key received something"


def keyed_socket(ctx, cluster, kind, name):
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    public, secret = curve.load_key_pair(cluster.keys[name][1])
    curve.client_keys(sock, cluster.keys["native"][2].encode(), public, secret)
    return sock


def test_native_key_rights_on_the_edge(curve_cluster, ctx):
    """A key granted reading /chat/* may fetch and subscribe there, may not publish,
    and its subscription to another channel is refused; nothing reaches it there."""
    dealer = keyed_socket(ctx, curve_cluster, zmq.DEALER, "reader")
    dealer.connect(curve_cluster.native_router)
    refused = native_call(dealer, {"id": 1, "op": "publish", "channel": "/chat/a",
                                   "data": b"x"})
    assert refused["error"] == "forbidden"
    assert native_call(dealer, {"id": 2, "op": "fetch", "channel": "/chat/a",
                                "since": 0})["id"] == 2
    assert native_call(dealer, {"id": 3, "op": "fetch", "channel": "/news",
                                "since": 0})["error"] == "forbidden"
    allowed, other = (keyed_socket(ctx, curve_cluster, zmq.SUB, "reader") for _ in range(2))
    allowed.setsockopt(zmq.SUBSCRIBE, b"/chat/a\x00")
    other.setsockopt(zmq.SUBSCRIBE, b"/news\x00")
    for sock in (allowed, other):
        sock.connect(curve_cluster.native_pub)
    deadline = time.monotonic() + WAIT_S
    while not allowed.poll(100):
        assert time.monotonic() < deadline, "the granted subscription got nothing"
        assert request(curve_cluster.url("/chat/a"), "PUT", b"c").status == 202
        assert request(curve_cluster.url("/news"), "PUT", b"n").status == 202
    assert not other.poll(300), "a subscription the key does not grant received a message"


def native_call(sock, request: dict) -> dict:
    sock.send(msgpack.packb({"v": 1, **request}))
    assert sock.poll(int(WAIT_S * 1000)), "no reply"
    return msgpack.unpackb(sock.recv())


def test_native_client_needs_a_configured_key(curve_cluster, ctx):
    """On the native request endpoint an unconfigured key is refused (ZAP 400, no reply);
    the configured one is answered."""
    for name in ("stranger", "app"):
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        public, secret = curve.load_key_pair(curve_cluster.keys[name][1])
        curve.client_keys(dealer, curve_cluster.keys["native"][2].encode(), public, secret)
        monitor = monitor_events(dealer)
        dealer.connect(curve_cluster.native_router)
        event = next_event(monitor)
        if name == "stranger":
            assert event == zmq.EVENT_HANDSHAKE_FAILED_AUTH
            try:
                dealer.send(msgpack.packb({"v": 1, "id": 1, "op": "ping"}), zmq.NOBLOCK)
            except zmq.Again:
                pass  # no peer to queue for: refused before any frame
            assert not dealer.poll(500)
        else:
            assert event == zmq.EVENT_HANDSHAKE_SUCCEEDED
            assert native_call(dealer, {"id": 7, "op": "ping"})["id"] == 7
        dealer.disable_monitor()
        monitor.close()


def test_edge_with_the_wrong_server_key_says_so(curve_cluster, tmp_path):
    """An edge given another key for w1 cannot reach it, logs why, and answers 503 for w1's
    channels while w2's work."""
    write_key_pair(str(curve_cluster.key_dir), "impostor")
    text = curve_cluster.config_path.read_text().replace(
        f'w1 = "{curve_cluster.key_dir}/w1.key"', f'w1 = "{curve_cluster.key_dir}/impostor.key"')
    assert "impostor" in text
    config_path = tmp_path / "wrong.toml"
    config_path.write_text(text)
    from firehose_zmq.testing import free_port
    port = free_port()
    edge = Process("wrong edge", [str(BIN / "firehose-edge"), "--config", str(config_path),
                                  "--no-native"], {**curve_cluster.env, "PORT": str(port),
                                                   "FIREHOSE_ADMIN_BIND":
                                                   f"127.0.0.1:{free_port()}"})
    try:
        edge.wait_for("edge listening")
        edge.wait_for("worker w2 up")
        edge.wait_for(r"worker w1 unreachable \(1 failed handshakes\): the CURVE handshake "
                      r"failed: .*wrong server key")
        assert "worker w1 up" not in edge.log_text()
        w1_channel = channel_on("w1", curve_cluster.worker_ids, "/wrong")
        w2_channel = channel_on("w2", curve_cluster.worker_ids, "/wrong")
        assert request(curve_cluster.url(w1_channel, port), "PUT", b"x").status == 503
        assert request(curve_cluster.url(w2_channel, port), "PUT", b"x").status == 202
    finally:
        edge.stop()


def test_worker_with_an_unreadable_key_does_not_start(curve_cluster, tmp_path):
    """A worker whose secret key file is readable by others refuses to start, in one line."""
    bad = tmp_path / "w1.key_secret"
    bad.write_bytes(Path(curve_cluster.keys["w1"][1]).read_bytes())
    bad.chmod(0o644)
    text = curve_cluster.config_path.read_text().replace(
        f'w1 = "{curve_cluster.key_dir}/w1.key_secret"', f'w1 = "{bad}"')
    config_path = tmp_path / "bad.toml"
    config_path.write_text(text)
    result = subprocess.run([str(BIN / "firehose-worker"), "--config", str(config_path), "--id",
                             "w1"], capture_output=True, text=True, timeout=30,
                            env=curve_cluster.env)
    assert result.returncode == 1
    assert "readable by others" in result.stderr and "Traceback" not in result.stderr
