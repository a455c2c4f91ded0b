"""The servers under test: a local firehose-zmq cluster and the Nchan peers.

Each server is started on free loopback ports in its own session (so a Ctrl-C on
the terminal reaches only the harness), reports the pids whose CPU time and RSS
count as "server" (``pids()``), and is stopped by pid, escalating to SIGKILL of the
processes it started, whatever happened before. Use them as context managers.

``FirehoseServer`` runs ``firehose-cluster`` in one durability mode; after it stops,
``store_counts()`` reads from its workers' shutdown lines how many publishes and
store commits they made. ``NchanServer`` keeps messages in nginx's shared memory;
``NchanRedisServer`` also starts a ``redis-server`` of its own (AOF on, fsync
``always`` or ``everysec``) and stores Nchan's messages there, so its server CPU
is nginx's and Redis's together.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import lpbench
from firehose_zmq.testing import free_port

HERE = Path(__file__).resolve().parent
NCHAN_MODULE = "/usr/lib/nginx/modules/ngx_nchan_module.so"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
START_ATTEMPTS = 3


class ServerError(RuntimeError):
    """A server could not be started or answered wrongly; the message says why."""


class PortTaken(ServerError):
    """A port chosen as free was taken before the server bound it."""


def children_of(pid: int) -> list:
    """Every live descendant of ``pid`` (not ``pid`` itself), from /proc."""
    return [p for p in lpbench.descendants([pid]) if p != pid]


def start_time(pid: int):
    """The start time of process ``pid`` (clock ticks since boot), None if it is gone.

    Remembered with each pid so that stop() never signals a recycled pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def wait_port(port: int, deadline: float, process: subprocess.Popen, name: str) -> None:
    """Wait until 127.0.0.1:port accepts a connection; raise if ``process`` exits first."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"{name} exited with code {process.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ServerError(f"{name}: port {port} not accepting connections within {READY_TIMEOUT_S} s")


def http(method: str, url: str, body: bytes = b"", headers=None, timeout_s: float = 3.0):
    """One HTTP request to a loopback URL -> (status, headers, body); raises OSError."""
    request = urllib.request.Request(url, data=body if method in ("PUT", "POST") else None,
                                     method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return reply.status, reply.headers, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


class ManagedServer:
    """Common start/stop bookkeeping: one root process we started, in its own session."""

    name = "?"
    proto = "?"

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir).resolve()  # nginx -p resolves relative paths twice
        self.port = free_port()
        self.process = None
        self.known_pids: dict = {}  # pid -> start time, every server process seen
        self.log_path = None
        self.log_start = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self) -> list:
        """The server processes whose CPU and memory count (remembered for stop())."""
        raise NotImplementedError

    def __enter__(self):
        """Start the server; a port taken between choosing and binding it (the free-port
        race, likely right after 10,000 client connections) is retried on new ports."""
        for attempt in range(START_ATTEMPTS):
            try:
                self.start()
                return self
            except PortTaken:
                self.stop()
                if attempt == START_ATTEMPTS - 1:
                    raise
                self.port = free_port()
            except BaseException:
                self.stop()
                raise

    def __exit__(self, *exc):
        self.stop()

    def start(self) -> None:
        raise NotImplementedError

    def _spawn(self, argv: list, env=None, cwd=None) -> None:
        self.log_path = self.run_dir / f"{self.name}.log"
        log = open(self.log_path, "ab")
        self.log_start = log.tell()  # a retried start appends; read only its own lines
        try:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                            start_new_session=True)
        finally:
            log.close()
        self.remember([self.process.pid])

    def remember(self, pids) -> None:
        for pid in pids:
            if pid not in self.known_pids:
                self.known_pids[pid] = start_time(pid)

    def log_text(self) -> str:
        """What the server wrote to its log since the last start."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_start)
                return f.read().decode(errors="replace")
        except (OSError, TypeError):
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the root process, wait, then SIGKILL it and every process it started."""
        if self.process is None:
            return
        root = self.process.pid
        if self.process.poll() is None:
            self.remember(lpbench.descendants([root]))
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGTERM)
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        for pid, started in sorted(self.known_pids.items()):
            if pid != root and started is not None and start_time(pid) == started:
                try:
                    # a process this server started that outlived the stop
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(5)
        self.process = None


# what a worker logs when it stops (worker/server.py main)
STOPPED_LINE = re.compile(r"worker (\S+) stopped[^:]*: \d+ requests, (\d+) published, .*?"
                          r"(\d+) store commits")


class FirehoseServer(ManagedServer):
    """A firehose-zmq cluster as ``make run`` starts it (firehose-cluster: workers and
    ``edges`` edges sharing the HTTP port), configured by a generated TOML file on free
    loopback ports."""

    name = "firehose-zmq"
    proto = "firehose"

    def __init__(self, run_dir: Path, workers: int = 2, long_poll_timeout_s: float = 30.0,
                 durability: str = "sync", commit_window_ms: int = 0, label: str = None,
                 edges: int = 1):
        super().__init__(run_dir)
        self.edges = edges
        self.durability = durability
        self.commit_window_ms = commit_window_ms
        self.name = label or self.name
        self.worker_ids = [f"w{i + 1}" for i in range(workers)]
        self.long_poll_timeout_s = long_poll_timeout_s
        self.config_path = self.run_dir / "cluster.toml"
        self.bin = Path(sys.executable).parent / "firehose-cluster"

    def write_config(self) -> None:
        lines = []
        for worker_id in self.worker_ids:
            router, pub = free_port(), free_port()
            lines += ["[[workers]]", f'id = "{worker_id}"',
                      f'router_bind = "tcp://127.0.0.1:{router}"',
                      f'router_connect = "tcp://127.0.0.1:{router}"',
                      f'pub_bind = "tcp://127.0.0.1:{pub}"',
                      f'pub_connect = "tcp://127.0.0.1:{pub}"', ""]
        # The native ZeroMQ endpoints too: their default ports may still be held by the
        # previous run's edge while it exits.
        lines += ["[edge]", 'host = "127.0.0.1"', f"port = {self.port}",
                  f"long_poll_timeout_s = {self.long_poll_timeout_s}",
                  f'native_pub_bind = "tcp://127.0.0.1:{free_port()}"',
                  f'native_router_bind = "tcp://127.0.0.1:{free_port()}"', "",
                  "[admin]", f'bind = "127.0.0.1:{free_port()}"', "",
                  # A store of this run's own: the checkout's var/ holds make run's
                  # channels and every earlier run's, which the workers would load.
                  "[storage]", f'data_dir = "{self.run_dir / "data"}"',
                  f'durability = "{self.durability}"',
                  f"commit_window_ms = {self.commit_window_ms}"]
        self.config_path.write_text("\n".join(lines) + "\n")

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.run_dir / "data", ignore_errors=True)  # only the logs are kept

    def start(self) -> None:
        if not self.bin.exists():
            raise ServerError(f"{self.bin} not found: run `make install` (or `make bench`) first")
        self.write_config()
        env = {k: v for k, v in os.environ.items() if k not in ("PORT", "FIREHOSE_LONG_POLL_TIMEOUT")}
        # firehose-cluster starts its children with `python -m firehose_zmq...`, which
        # imports from the working directory first: run it in this checkout, the code
        # the venv's editable install points at, whatever the caller's directory is.
        self._spawn([str(self.bin), "--config", str(self.config_path), "--log-level", "INFO",
                     "--edges", str(self.edges)], env, cwd=HERE.parent)
        deadline = time.monotonic() + READY_TIMEOUT_S
        wanted = [f"worker {w} up" for w in self.worker_ids]
        while True:
            text = self.log_text()
            if all(w in text for w in wanted) and text.count("edge listening") >= self.edges:
                break
            if "Address already in use" in text:
                raise PortTaken(f"firehose-zmq: a port was taken: {self.log_tail(3)}")
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise ServerError(f"firehose-cluster did not become ready (waiting for {wanted}"
                                  f" and {self.edges} edge(s) listening);"
                                  f" log:\n{self.log_tail()}")
            time.sleep(0.05)
        # With several edges, one may log its workers up before another has heard them
        # (a 503 for a moment): probes on new connections (the kernel spreads them over
        # the edges) until 4 per edge in a row succeed, or the deadline.
        ok = 0
        while ok < 4 * self.edges:
            status, _, body = http("PUT", f"{self.url}/bench-probe/ready", b"ready")
            if status == 202:
                ok += 1
                continue
            ok = 0
            if status != 503 or time.monotonic() > deadline:
                raise ServerError(f"firehose-zmq answered {status} {body[:200]!r} to a probe "
                                  f"publish")
            time.sleep(0.05)
        self.pids()

    def store_counts(self) -> dict:
        """Publishes and store commits of every worker, from the lines they log when they
        stop (call after ``stop()``): ``{"published", "commits", "publishes_per_commit"}``,
        the last None without commits (``memory``) or when a worker's line is missing."""
        found = STOPPED_LINE.findall(self.log_text())
        published = sum(int(p) for _, p, _ in found)
        commits = sum(int(c) for _, _, c in found)
        complete = len({w for w, _, _ in found}) == len(self.worker_ids)
        return {"published": published, "commits": commits,
                "publishes_per_commit": (round(published / commits, 2)
                                         if complete and commits else None)}

    def pids(self) -> list:
        if self.process is None:
            return []
        found = children_of(self.process.pid)  # the edge and the workers, not the supervisor
        self.remember(found)
        return found

    def supports(self, transport: str) -> tuple:
        """Probe the WebSocket ("ws") or SSE ("sse") endpoint -> (bool, reason).

        A message is published first so that a server without the endpoint answers the
        probe at once as a long-poll instead of holding it. Only the response head is
        read: a stream that works stays open."""
        channel = f"/bench-probe/{transport}"
        try:
            http("PUT", self.url + channel, b"probe")
            if transport == "sse":
                status, headers = self._probe_head(
                    b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
                    % channel.encode())
                kind = headers.get("content-type", "")
                if status == 200 and kind.startswith("text/event-stream"):
                    return True, "ok"
                return False, f"event-stream GET answered {status} {kind.split(';')[0] or '-'}"
            status, _ = self._probe_head(
                b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n" % (channel.encode(), lpbench.WS_KEY))
            if status == 101:
                return True, "ok"
            return False, f"WebSocket upgrade answered {status}"
        except (OSError, ValueError) as exc:
            return False, f"probe failed: {exc}"

    def _probe_head(self, request: bytes, timeout_s: float = 3.0) -> tuple:
        """Send ``request`` on a new connection -> (status, {lower-case header: value})."""
        deadline = time.monotonic() + timeout_s
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s) as s:
            s.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        status, raw = lpbench.parse_head(data.split(b"\r\n\r\n", 1)[0])
        return status, {k.decode(errors="replace"): v.decode(errors="replace")
                        for k, v in raw.items()}


class NchanServer(ManagedServer):
    """Nginx with the Nchan module in the foreground, ``workers`` worker processes; the
    master and its workers count as server processes."""

    name = "nchan"
    proto = "nchan"

    def __init__(self, run_dir: Path, workers: int = 1, label: str = None):
        super().__init__(run_dir)
        self.workers = workers
        self.nginx_dir = self.run_dir / "nchan"
        self.name = label or self.name

    @staticmethod
    def available() -> tuple:
        """(bool, reason): nginx and the Nchan module are installed."""
        if shutil.which("nginx") is None:
            return False, "nginx is not installed (apt-get install nginx libnginx-mod-nchan)"
        if not os.path.exists(NCHAN_MODULE):
            return False, f"{NCHAN_MODULE} is missing (apt-get install libnginx-mod-nchan)"
        return True, "ok"

    def start(self) -> None:
        ok, why = self.available()
        if not ok:
            raise ServerError(why)
        self.nginx_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.nginx_dir, 0o755)
        conf = (HERE / "nchan.conf").read_text().format(
            run_dir=self.nginx_dir, port=self.port, workers=self.workers,
            **self.storage_config())
        conf_path = self.nginx_dir / "nginx.conf"
        conf_path.write_text(conf)
        self._spawn([shutil.which("nginx"), "-p", str(self.nginx_dir), "-e",
                     str(self.nginx_dir / "error.log"), "-c", str(conf_path)])
        try:
            wait_port(self.port, time.monotonic() + READY_TIMEOUT_S, self.process, "nginx")
        except ServerError:
            if "Address already in use" in self.log_tail() + self._error_log():
                raise PortTaken(f"nchan: port {self.port} was taken") from None
            raise ServerError(f"nginx did not start: {self.log_tail(5)} {self._error_log()}") from None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            status, _, body = http("POST", f"{self.url}/pub?id=bench-probe", b"ready")
            if 200 <= status < 300:
                break
            # 503 while Nchan is still connecting to its Redis
            if status != 503 or time.monotonic() > deadline:
                raise ServerError(f"nchan answered {status} {body[:200]!r} to a probe publish")
            time.sleep(0.05)
        self.pids()

    def storage_config(self) -> dict:
        """nchan.conf's storage lines: none (nginx's shared memory)."""
        return {"upstreams": "", "storage": ""}

    def _error_log(self) -> str:
        try:
            return (self.nginx_dir / "error.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def pids(self) -> list:
        if self.process is None:
            return []
        found = lpbench.descendants([self.process.pid])  # master and workers
        self.remember(found)
        return found

    def supports(self, transport: str) -> tuple:
        return True, "ok"


REDIS_CONF = """# written by bench/servers.py for one run
bind 127.0.0.1
port {port}
protected-mode yes
daemonize no
logfile ""
dir {dir}
save ""
appendonly yes
appendfsync {fsync}
# no automatic rewrite: a forked child's CPU would escape the count (runs are short)
auto-aof-rewrite-percentage 0
"""


class RedisServer(ManagedServer):
    """``redis-server`` in the foreground with an append-only file (``appendfsync``
    ``fsync``) in its run directory, nothing else persisted."""

    name = "redis"
    proto = "redis"

    def __init__(self, run_dir: Path, fsync: str):
        super().__init__(run_dir)
        self.fsync = fsync
        self.data_dir = self.run_dir / "redis"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerError("redis-server is not installed (apt-get install redis-server)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf_path = self.data_dir / "redis.conf"
        conf_path.write_text(REDIS_CONF.format(port=self.port, dir=self.data_dir, fsync=self.fsync))
        self._spawn([binary, str(conf_path)])
        try:
            wait_port(self.port, time.monotonic() + READY_TIMEOUT_S, self.process, "redis-server")
        except ServerError:
            if "Address already in use" in self.log_tail():
                raise PortTaken(f"redis: port {self.port} was taken") from None
            raise ServerError(f"redis-server did not start: {self.log_tail(5)}") from None
        with socket.create_connection(("127.0.0.1", self.port), timeout=3) as s:
            s.sendall(b"PING\r\n")
            if not s.recv(64).startswith(b"+PONG"):
                raise ServerError("redis-server did not answer PING")

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.data_dir / "appendonlydir", ignore_errors=True)  # logs are kept

    def pids(self) -> list:
        if self.process is None:
            return []
        self.remember([self.process.pid])
        return [self.process.pid]


class NchanRedisServer(NchanServer):
    """Nchan storing its channels in a Redis of its own (``nchan_redis_pass``, Nchan's
    default "distributed" storage mode): nginx's processes and ``redis-server`` count
    as the server."""

    name = "nchan-redis"

    def __init__(self, run_dir: Path, fsync: str, workers: int = 1, label: str = None):
        super().__init__(run_dir, workers, label)
        self.fsync = fsync
        self.redis = None

    @staticmethod
    def available() -> tuple:
        ok, why = NchanServer.available()
        if ok and shutil.which("redis-server") is None:
            return False, "redis-server is not installed (apt-get install redis-server)"
        return ok, why

    def start(self) -> None:
        ok, why = self.available()
        if not ok:
            raise ServerError(why)
        self.redis = RedisServer(self.run_dir, self.fsync).__enter__()
        super().start()

    def storage_config(self) -> dict:
        return {"upstreams": "upstream redis_store { nchan_redis_server redis://127.0.0.1:%d; }"
                % self.redis.port,
                "storage": "nchan_redis_pass redis_store;"}

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self.redis is not None:
                self.redis.stop()
                self.redis = None

    def pids(self) -> list:
        found = super().pids()
        return found + (self.redis.pids() if self.redis is not None else [])
