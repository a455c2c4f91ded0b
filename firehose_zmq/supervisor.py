"""firehose-cluster: a whole cluster on this host, in the foreground (``make run``).

Starts every worker of the config and one edge as child processes, restarts any
child that dies (with a growing back-off, logged), and on Ctrl-C or SIGTERM
drains the cluster in two steps: SIGTERM to the edges first (they stop
accepting, answer waiting long-polls and let publishes in flight finish while
the workers still run), then SIGTERM to the workers (they answer what is queued
and flush their stores); SIGKILL for whatever is still running after
``--stop-timeout`` per step, leaving none behind. Workers keep their stores in
``storage.data_dir`` of the config (``./var`` by default). Children also get SIGTERM if the supervisor itself is killed (Linux
parent-death signal). For a cluster spread over hosts, run ``firehose-worker``
and ``firehose-edge`` with the same ``--config`` on each host instead.

It refuses, with one line and before starting anything, a config in which two
processes would bind the same address on this host, and a port that something
else already holds (a second ``make run``). A child that exits with an error
status (not a signal) within ``_STARTUP_S`` seconds of its first start (it could
not bind, or its config or store is unusable) stops the cluster instead of being
restarted forever; a child that exits with status 0 (a drained edge, a worker
stopped by an operator's SIGTERM) is not restarted.
"""

import ctypes
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from . import cli
from .config import local_bind_clashes, split_host_port

log = logging.getLogger("firehose.cluster")

_PR_SET_PDEATHSIG = 1
_HANDLED = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
_MAX_BACKOFF_S = 5.0
_HEALTHY_AFTER_S = 10.0
_STARTUP_S = 5.0


def _child_setup() -> None:
    """In the child, before exec: default signal mask, die with the parent."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Child:
    def __init__(self, name: str, argv: list, stop_step: int = 0, env=None):
        self.name = name
        self.argv = argv
        self.env = env  # None: the supervisor's own
        self.stop_step = stop_step  # children are stopped in increasing steps
        self.process = None
        self.started_at = 0.0
        self.backoff_s = 0.5
        self.restart_at = None
        self.starts = 0
        self.finished = False  # exited with status 0: not restarted


class Supervisor:
    def __init__(self, children, stop_timeout_s: float = 10.0):
        self.children = children
        self.stop_timeout_s = stop_timeout_s

    def _start(self, child: Child) -> None:
        child.process = subprocess.Popen(child.argv, preexec_fn=_child_setup, env=child.env)
        child.started_at = time.monotonic()
        child.restart_at = None
        child.starts += 1
        log.info("started %s (pid %d)", child.name, child.process.pid)

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        for child in self.children:
            self._start(child)
        try:
            while True:
                now = time.monotonic()
                waits = [c.restart_at - now for c in self.children if c.restart_at is not None]
                timeout = max(0.0, min(waits)) if waits else 60.0
                info = signal.sigtimedwait(_HANDLED, timeout)
                if info is not None and info.si_signo != signal.SIGCHLD:
                    log.info("received %s: stopping the cluster",
                             signal.Signals(info.si_signo).name)
                    return 0
                failed = self._reap_and_restart()
                if failed is not None:
                    log.error("%s exited with status %d while starting; stopping the cluster "
                              "(its log above says why)", failed.name, failed.process.returncode)
                    return 1
        finally:
            self._stop_all()

    def _reap_and_restart(self):
        """Reap exited children and schedule their restart; returns a child that
        failed at its first start (the cluster should stop) or None."""
        now = time.monotonic()
        for child in self.children:
            if child.finished:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._start(child)
                continue
            code = child.process.poll()
            if code is None:
                continue
            if code == 0:
                log.info("%s (pid %d) exited with status 0 (drained or stopped); not restarting "
                         "it", child.name, child.process.pid)
                child.finished = True
                continue
            if code > 0 and child.starts == 1 and now - child.started_at < _STARTUP_S:
                return child
            if now - child.started_at > _HEALTHY_AFTER_S:
                child.backoff_s = 0.5
            log.warning("%s (pid %d) exited with status %d; restarting it in %.1f s",
                        child.name, child.process.pid, code, child.backoff_s)
            child.restart_at = now + child.backoff_s
            child.backoff_s = min(child.backoff_s * 2, _MAX_BACKOFF_S)
        return None

    def _stop_all(self) -> None:
        for step in sorted({c.stop_step for c in self.children}):
            running = [c for c in self.children if c.stop_step == step
                       and c.process is not None and c.process.poll() is None]
            for child in running:
                child.process.terminate()
            deadline = time.monotonic() + self.stop_timeout_s
            for child in running:
                try:
                    code = child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("%s (pid %d) did not stop in time; killing it", child.name,
                                child.process.pid)
                    child.process.kill()
                    code = child.process.wait()
                log.info("%s stopped (status %d)", child.name, code)
        log.info("cluster stopped")


def listeners(config) -> list:
    """``(host, port, what)`` of every TCP address this host's cluster binds."""
    found = []

    def zmq_endpoint(endpoint: str, what: str) -> None:
        if endpoint.startswith("tcp://"):
            host, _, port = endpoint[6:].rpartition(":")
            if port.isdigit():
                found.append((host.strip("[]"), int(port), what))

    found.append((config.edge.host, config.edge.port, "the edge's HTTP port"))
    zmq_endpoint(config.edge.native_pub_bind, "edge native_pub_bind")
    zmq_endpoint(config.edge.native_router_bind, "edge native_router_bind")
    if config.admin.bind:
        found.append((*split_host_port(config.admin.bind), "admin bind"))
    for w in config.workers:
        zmq_endpoint(w.router_bind, f"worker {w.id} router_bind")
        zmq_endpoint(w.pub_bind, f"worker {w.id} pub_bind")
        if w.admin:
            found.append((*split_host_port(w.admin), f"worker {w.id} admin"))
    return found


def port_in_use(host: str, port: int) -> bool:
    """True when binding ``host:port`` fails because something holds it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host if host not in ("*", "") else "0.0.0.0", port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def main(argv=None) -> int:
    parser = cli.command_parser(
        "firehose-cluster",
        "Run a local firehose-zmq cluster (every worker of the config and one edge).")
    parser.add_argument("--stop-timeout", type=float, default=10.0,
                        help="seconds to wait for children after SIGTERM before SIGKILL")
    parser.add_argument("--edges", type=int, default=1,
                        help="edge processes sharing the HTTP port (one per core); default 1")
    started = cli.start(parser, argv)
    if started.exit_code is not None:
        return started.exit_code
    args, config = started.args, started.config
    if args.edges < 1:
        parser.error("--edges must be at least 1")
    clashes = local_bind_clashes(config)
    if clashes:
        log.error("this config cannot run on one host: %s (firehose-cluster runs every "
                  "process here; give each worker its own ports)", "; ".join(clashes))
        return 2
    for host, port, what in listeners(config):
        if port_in_use(host, port):
            log.error("port %d (%s) is already in use on %s: is another cluster running? "
                      "Move every port with FIREHOSE_PORT_BASE=<port> (or one with "
                      "FIREHOSE_<SECTION>_<KEY>, see --print-config)", port, what, host)
            return 1
    common = (["--log-level", args.log_level, "--log-format", args.log_format]
              + (["--config", args.config] if args.config else []))
    children = [Child(f"worker {w.id}",
                      [sys.executable, "-m", "firehose_zmq.worker", "--id", w.id] + common,
                      stop_step=1)
                for w in config.workers]
    edge_argv = [sys.executable, "-m", "firehose_zmq.edge"] + common
    if args.edges == 1:
        children.insert(0, Child("edge", edge_argv, stop_step=0))
    else:
        # Every edge shares the HTTP port (SO_REUSEPORT); the first one also
        # serves the native ZeroMQ endpoints, whose ports cannot be shared.
        for n in range(args.edges, 0, -1):
            # Only the first serves the admin listener, whose port cannot be shared either.
            extra = ["--reuse-port"] + ([] if n == 1 else ["--no-native"])
            env = None if n == 1 else {**os.environ, "FIREHOSE_ADMIN_BIND": ""}
            children.insert(0, Child(f"edge {n}", edge_argv + extra, stop_step=0, env=env))
    edge = config.edge
    log.info("firehose cluster: %d edge(s) on http://%s:%d, workers %s; durability %s in %s",
             args.edges, edge.host, edge.port,
             ", ".join(f"{w.id} ({w.router_bind})" for w in config.workers),
             config.storage.durability, os.path.abspath(config.storage.data_dir))
    return Supervisor(children, args.stop_timeout).run()


if __name__ == "__main__":
    raise SystemExit(main())
