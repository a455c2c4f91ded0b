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
"""

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time

from .config import ConfigError, load_config

log = logging.getLogger("firehose.cluster")

_PR_SET_PDEATHSIG = 1
_HANDLED = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
_MAX_BACKOFF_S = 5.0
_HEALTHY_AFTER_S = 10.0


def _child_setup() -> None:
    """In the child, before exec: default signal mask, die with the parent."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Child:
    def __init__(self, name: str, argv: list, stop_step: int = 0):
        self.name = name
        self.argv = argv
        self.stop_step = stop_step  # children are stopped in increasing steps
        self.process = None
        self.started_at = 0.0
        self.backoff_s = 0.5
        self.restart_at = None


class Supervisor:
    def __init__(self, children, stop_timeout_s: float = 10.0):
        self.children = children
        self.stop_timeout_s = stop_timeout_s

    def _start(self, child: Child) -> None:
        child.process = subprocess.Popen(child.argv, preexec_fn=_child_setup)
        child.started_at = time.monotonic()
        child.restart_at = None
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
                self._reap_and_restart()
        finally:
            self._stop_all()

    def _reap_and_restart(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._start(child)
                continue
            code = child.process.poll()
            if code is None:
                continue
            if now - child.started_at > _HEALTHY_AFTER_S:
                child.backoff_s = 0.5
            log.warning("%s (pid %d) exited with status %d; restarting it in %.1f s",
                        child.name, child.process.pid, code, child.backoff_s)
            child.restart_at = now + child.backoff_s
            child.backoff_s = min(child.backoff_s * 2, _MAX_BACKOFF_S)

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="firehose-cluster",
        description="Run a local firehose-zmq cluster (every worker of the config and one edge).")
    parser.add_argument("--config", help="cluster config (TOML); default: the embedded local one")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--stop-timeout", type=float, default=10.0,
                        help="seconds to wait for children after SIGTERM before SIGKILL")
    parser.add_argument("--edges", type=int, default=1,
                        help="edge processes sharing the HTTP port (one per core); default 1")
    args = parser.parse_args(argv)
    if args.edges < 1:
        parser.error("--edges must be at least 1")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    common = ["--log-level", args.log_level] + (["--config", args.config] if args.config else [])
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
            extra = ["--reuse-port"] + ([] if n == 1 else ["--no-native"])
            children.insert(0, Child(f"edge {n}", edge_argv + extra, stop_step=0))
    edge = config.edge
    log.info("firehose cluster: %d edge(s) on http://%s:%d, workers %s; durability %s in %s",
             args.edges, edge.host, edge.port,
             ", ".join(f"{w.id} ({w.router_bind})" for w in config.workers),
             config.storage.durability, os.path.abspath(config.storage.data_dir))
    return Supervisor(children, args.stop_timeout).run()


if __name__ == "__main__":
    raise SystemExit(main())
