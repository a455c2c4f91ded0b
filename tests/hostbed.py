"""A cluster spread over "hosts" on one machine: each worker and each edge on a loopback
address of its own (127.0.0.2, 127.0.0.3, ...), every link between them a TCP
connection between two addresses.

``HostBed`` writes the config file, starts ``firehose-worker`` and ``firehose-edge``
processes, rewrites the config for a ring change and sends SIGHUP (the operator's
steps in README "Growing the cluster"), and breaks hosts: ``kill`` (SIGKILL: the
host is gone, its connections reset), ``freeze``/``thaw`` (SIGSTOP/SIGCONT: a
partition: the peers' TCP connections stay open and nothing arrives, as when a
link drops packets). This machine has ``ip netns`` and ``tc`` but no iptables or
nft; namespaces would need a veth pair and routes per host and outlive a crashed
test, so SIGSTOP stands in for a partition (see README "When a host is lost").
Every process started is stopped by ``stop``.
"""

import itertools
import os
import random
import signal
import socket
from pathlib import Path

from firehose_zmq.testing import _EPHEMERAL_LOW

from .cluster import BIN, Process

_hosts = itertools.count(2)
_taken: set = set()


def free_port_on(host: str) -> int:
    """A TCP port free on ``host`` now, below the ephemeral range."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(10000, _EPHEMERAL_LOW)
        if (host, port) in _taken:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _taken.add((host, port))
        return port
    raise RuntimeError(f"no free TCP port on {host}")


def next_host() -> str:
    """A loopback address not handed out before in this process (127.0.0.2 up)."""
    n = next(_hosts)
    return f"127.0.{n // 250}.{n % 250 + 2}" if n >= 250 else f"127.0.0.{n}"


class HostBed:
    """Workers and edges on addresses of their own; see the module docstring."""

    def __init__(self, tmp_path, worker_ids=("w1", "w2"), edges: int = 1,
                 durability: str = "sync", long_poll_timeout_s: float = 3.0,
                 extra_config: str = "", tables: str = "", storage: str = ""):
        self.tmp_path = Path(tmp_path)
        self.durability = durability
        self.long_poll_timeout_s = long_poll_timeout_s
        self.extra_config = extra_config  # more [edge] keys
        self.tables = tables              # more TOML tables ([limits], ...)
        self.storage = storage            # more [storage] keys (replicas, ...)
        self.data_dir = self.tmp_path / "data"
        self.config_path = self.tmp_path / "cluster.toml"
        self.hosts: dict = {}       # worker id -> (host, router port, pub port)
        self.members = list(worker_ids)
        self.previous: list = []
        self.leaving: list = []
        self.workers: dict = {}     # worker id -> Process
        self.edges: list = []       # (Process, host, http port, native router endpoint)
        for worker_id in worker_ids:
            self.add_host(worker_id)
        self._edge_count = edges
        self.env = None

    def add_host(self, worker_id: str) -> str:
        host = next_host()
        self.hosts[worker_id] = (host, free_port_on(host), free_port_on(host))
        return host

    def write_config(self, members=None, previous=(), leaving=()) -> None:
        """The config every process reads: ``members`` in the ring, ``leaving`` listed
        but out of it, ``previous`` as ``ring_previous``."""
        if members is not None:
            self.members = list(members)
        self.previous, self.leaving = list(previous), list(leaving)
        lines = []
        if self.previous:
            lines.append("ring_previous = [" + ", ".join(f'"{w}"' for w in self.previous)
                         + "]")
        for worker_id in self.members + self.leaving:
            host, router, pub = self.hosts[worker_id]
            lines += ["[[workers]]", f'id = "{worker_id}"',
                      f'router_bind = "tcp://{host}:{router}"',
                      f'router_connect = "tcp://{host}:{router}"',
                      f'pub_bind = "tcp://{host}:{pub}"',
                      f'pub_connect = "tcp://{host}:{pub}"']
            if worker_id in self.leaving:
                lines.append("leaving = true")
            lines.append("")
        lines += ["[edge]", f"long_poll_timeout_s = {self.long_poll_timeout_s}",
                  self.extra_config, "", "[storage]", f'durability = "{self.durability}"',
                  f'data_dir = "{self.data_dir}"', self.storage, "", "[admin]", 'bind = ""', "",
                  self.tables]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self) -> "HostBed":
        self.env = {k: v for k, v in os.environ.items()
                    if k != "PORT" and not k.startswith("FIREHOSE_")}
        self.write_config()
        try:
            for worker_id in self.members:
                self.start_worker(worker_id)
            for _ in range(self._edge_count):
                self.start_edge()
        except BaseException:
            self.stop()
            raise
        return self

    def start_worker(self, worker_id: str) -> Process:
        process = Process(f"worker {worker_id}", [
            str(BIN / "firehose-worker"), "--config", str(self.config_path), "--id", worker_id],
            self.env)
        self.workers[worker_id] = process
        process.wait_for(f"worker {worker_id} ready")
        return process

    def start_edge(self) -> tuple:
        host = next_host()
        port = free_port_on(host)
        native_pub = f"tcp://{host}:{free_port_on(host)}"
        native_router = f"tcp://{host}:{free_port_on(host)}"
        env = {**self.env, "FIREHOSE_EDGE_HOST": host, "FIREHOSE_EDGE_PORT": str(port),
               "FIREHOSE_EDGE_NATIVE_PUB_BIND": native_pub,
               "FIREHOSE_EDGE_NATIVE_ROUTER_BIND": native_router}
        process = Process(f"edge {host}", [str(BIN / "firehose-edge"), "--config",
                                           str(self.config_path)], env)
        self.edges.append((process, host, port, native_router))
        process.wait_for("edge listening")
        for worker_id in self.members:
            process.wait_for(f"worker {worker_id} up")
        return process, host, port

    def url(self, path: str, edge: int = 0) -> str:
        _, host, port, _ = self.edges[edge]
        return f"http://{host}:{port}{path}"

    def reload(self, processes=None) -> None:
        """SIGHUP to ``processes`` (default: every worker, then every edge)."""
        if processes is None:
            processes = [*self.workers.values(), *(edge[0] for edge in self.edges)]
        for process in processes:
            process.signal(signal.SIGHUP)

    def kill(self, worker_id: str) -> None:
        process = self.workers[worker_id]
        process.signal(signal.SIGKILL)
        process.popen.wait(10)

    def freeze(self, worker_id: str) -> None:
        self.workers[worker_id].signal(signal.SIGSTOP)

    def thaw(self, worker_id: str) -> None:
        self.workers[worker_id].signal(signal.SIGCONT)

    def stop(self) -> None:
        for process, *_ in self.edges:
            process.stop()
        for process in self.workers.values():
            process.signal(signal.SIGCONT)
            process.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
