"""Real clusters for the integration tests: worker and edge processes on free loopback ports.

``Cluster`` writes a config file, starts ``firehose-worker`` and ``firehose-edge``
from this virtualenv, waits (bounded) for each to say it is ready by reading its
log, and always stops what it started.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from firehose_zmq.testing import free_port

BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 20.0
# The edge's two ways of reading requests: its own connections (the default), and
# Tornado's (``--no-fast-path``); the contract tests run against both.
SERVING_PATHS = {"fast": [], "slow": ["--no-fast-path"]}


class Process:
    """A child process whose log lines are collected and can be waited for."""

    def __init__(self, name: str, argv: list, env=None):
        self.name = name
        self.lines: list = []
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      env=env, text=True, bufsize=1)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout_s: float = READY_TIMEOUT_S, start: int = 0) -> int:
        """Wait until a log line from index ``start`` on matches; returns its index."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            index = start
            while True:
                while index < len(self.lines):
                    if regex.search(self.lines[index]):
                        return index
                    index += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.popen.poll() is not None and index >= len(self.lines)
                                      and not self._thread.is_alive()):
                    raise AssertionError(f"{self.name}: no log line matching {pattern!r} within "
                                         f"{timeout_s} s; log:\n" + "\n".join(self.lines[-40:]))
                self._cond.wait(remaining)

    def log_text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def signal(self, signum) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def stop(self, timeout_s: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout_s)
        self._thread.join(timeout_s)
        return self.popen.returncode


class Cluster:
    """Workers and one edge on free ports; ``url(path)`` addresses the edge, and
    ``native_pub`` / ``native_router`` are its native ZeroMQ endpoints; ``tables`` is
    more TOML (an [auth] or [curve] table) for the config file."""

    def __init__(self, tmp_path, worker_ids=("w1", "w2"), long_poll_timeout_s: float = 3.0,
                 extra_config: str = "", durability: str = "sync", storage_config: str = "",
                 edge_args=(), tables: str = ""):
        self.edge_args = list(edge_args)
        self.tmp_path = Path(tmp_path)
        self.worker_ids = list(worker_ids)
        self.http_port = free_port()
        self.native_pub = f"tcp://127.0.0.1:{free_port()}"
        self.native_router = f"tcp://127.0.0.1:{free_port()}"
        self.admin = f"127.0.0.1:{free_port()}"  # the edge's admin listener
        self.endpoints = {}
        self.worker_admin = {}
        lines = []
        for worker_id in self.worker_ids:
            router, pub = free_port(), free_port()
            self.endpoints[worker_id] = (f"tcp://127.0.0.1:{router}", f"tcp://127.0.0.1:{pub}")
            self.worker_admin[worker_id] = f"127.0.0.1:{free_port()}"
            lines += ["[[workers]]", f'id = "{worker_id}"',
                      f'router_bind = "tcp://127.0.0.1:{router}"',
                      f'router_connect = "tcp://127.0.0.1:{router}"',
                      f'pub_bind = "tcp://127.0.0.1:{pub}"',
                      f'pub_connect = "tcp://127.0.0.1:{pub}"',
                      f'admin = "{self.worker_admin[worker_id]}"', ""]
        self.data_dir = self.tmp_path / "data"
        lines += ["[edge]", 'host = "127.0.0.1"', f"port = {self.http_port}",
                  f"long_poll_timeout_s = {long_poll_timeout_s}",
                  f'native_pub_bind = "{self.native_pub}"',
                  f'native_router_bind = "{self.native_router}"', extra_config, "",
                  "[storage]", f'durability = "{durability}"', f'data_dir = "{self.data_dir}"',
                  storage_config, "", "[admin]", f'bind = "{self.admin}"', "", tables]
        self.config_path = self.tmp_path / "cluster.toml"
        self.config_path.write_text("\n".join(lines) + "\n")
        self.workers: dict = {}
        self.edge = None
        self.extra_edges: list = []
        self.env = {k: v for k, v in os.environ.items()
                    if k != "PORT" and not k.startswith("FIREHOSE_")}

    def start(self) -> "Cluster":
        try:
            for worker_id in self.worker_ids:
                self.start_worker(worker_id)
            self._start_primary_edge()
        except BaseException:
            self.stop()
            raise
        return self

    def restart_edge(self) -> None:
        """Stop the edge (SIGTERM) and start a new one on the same port."""
        self.edge.stop()
        self._start_primary_edge()

    def _start_primary_edge(self) -> None:
        """Start the edge of ``http_port``; wait until it listens and sees every worker."""
        self.edge = Process("edge", [str(BIN / "firehose-edge"), "--config",
                                     str(self.config_path), *self.edge_args], self.env)
        self.edge.wait_for("edge listening")
        for worker_id in self.worker_ids:
            self.edge.wait_for(f"worker {worker_id} up")

    def start_worker(self, worker_id: str) -> Process:
        process = Process(f"worker {worker_id}", [str(BIN / "firehose-worker"), "--config",
                                                  str(self.config_path), "--id", worker_id],
                          self.env)
        self.workers[worker_id] = process
        process.wait_for(f"worker {worker_id} ready")
        return process

    def kill_worker(self, worker_id: str) -> None:
        process = self.workers[worker_id]
        process.signal(signal.SIGKILL)
        process.popen.wait(10)

    def start_edge(self) -> tuple:
        """Another edge of the same cluster on a port of its own; returns (process, port)."""
        port = free_port()
        config_path = self.tmp_path / f"edge-{port}.toml"
        config_path.write_text(self.config_path.read_text()
                               .replace(self.native_pub, f"tcp://127.0.0.1:{free_port()}")
                               .replace(self.native_router, f"tcp://127.0.0.1:{free_port()}")
                               .replace(self.admin, f"127.0.0.1:{free_port()}"))
        process = Process(f"edge {port}", [str(BIN / "firehose-edge"), "--config",
                                           str(config_path)], {**self.env, "PORT": str(port)})
        self.extra_edges.append(process)
        process.wait_for("edge listening")
        for worker_id in self.worker_ids:
            process.wait_for(f"worker {worker_id} up")
        return process, port

    def admin_url(self, path: str, worker_id=None) -> str:
        """A URL on the edge's admin listener, or on ``worker_id``'s."""
        return f"http://{self.worker_admin[worker_id] if worker_id else self.admin}{path}"

    def url(self, path: str, port=None) -> str:
        return f"http://127.0.0.1:{port or self.http_port}{path}"

    def stop(self) -> None:
        for process in [self.edge, *self.extra_edges, *self.workers.values()]:
            if process is not None:
                process.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def channel_on(worker_id: str, worker_ids, prefix: str = "/ch") -> str:
    """A channel name that the ring gives to ``worker_id``."""
    from firehose_zmq.ring import Ring
    ring = Ring(list(worker_ids))
    for i in range(10000):
        name = f"{prefix}-{i}"
        if ring.owner(name) == worker_id:
            return name
    raise AssertionError(f"no channel for {worker_id}")
