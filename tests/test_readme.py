"""Every code snippet of README.md runs, against real clusters, with its ports moved.

Each fenced block with a language has a runner here, found by its first line; a
block without one fails ``test_every_snippet_has_a_runner``. Ports 7474-7477 in a
snippet become those of a cluster started from the embedded default with
``FIREHOSE_PORT_BASE``; ``localhost`` becomes 127.0.0.1.
"""

import asyncio
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web

from firehose_zmq.config import StorageConfig, parse_config

from .browser import Chromium, find_or_install_chromium
from .cluster import BIN, Cluster, Process
from .http import async_request, request
from .ports import free_port_block

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
COVERED_ELSEWHERE = {
    "make bench": "runs for minutes; tests/test_bench.py runs the harness in its quickest mode",
    "make test": "the command that runs this test",
}


def snippets() -> dict:
    """first line -> (language, text) of every fenced block with a language."""
    found = {}
    for match in re.finditer(r"^```(\w+)\n(.*?)^```", README.read_text(), re.S | re.M):
        text = match.group(2)
        found[text.splitlines()[0]] = (match.group(1), text)
    return found


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PORT" and not k.startswith("FIREHOSE_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


class DefaultCluster:
    """``firehose-cluster`` with no config, its ports moved to a free block."""

    def __init__(self, tmp_path):
        self.base = free_port_block()
        self.env = clean_env(FIREHOSE_PORT_BASE=str(self.base),
                             FIREHOSE_STORAGE_DATA_DIR=str(tmp_path / "var"),
                             FIREHOSE_EDGE_LONG_POLL_TIMEOUT_S="5",
                             FIREHOSE_ADMIN_DRAIN_GRACE_S="0.5")
        self.process = Process("cluster", [str(BIN / "firehose-cluster")], self.env)
        for line in ("edge listening", "worker w1 up", "worker w2 up"):
            self.process.wait_for(line)

    def moved(self, text: str) -> str:
        text = text.replace("localhost:", "127.0.0.1:")
        for offset in range(4):
            text = text.replace(f":{7474 + offset}", f":{self.base + offset}")
        return text

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.base}{path}"

    def stop(self) -> None:
        self.process.signal(signal.SIGTERM)
        self.process.popen.wait(30)
        self.process.stop()


@pytest.fixture
def default_cluster(tmp_path):
    cluster = DefaultCluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()


def without_comment(line: str) -> str:
    return re.sub(r"\s{2,}#.*$", "", line).rstrip()


def expect_in_order(expected: list, actual: str, what: str) -> None:
    """Every expected line appears among ``actual``'s lines, in this order."""
    lines = [line.rstrip("\r") for line in actual.splitlines()]
    position = 0
    for line in expected:
        try:
            position = lines.index(line, position) + 1
        except ValueError:
            raise AssertionError(f"{what}: {line!r} not found in order in:\n{actual}") from None


# -- runners ------------------------------------------------------------------------

def run_make(text, tmp_path):
    """`make run` starts a cluster (its install step skipped: make test just did it)."""
    assert text.splitlines()[1].startswith("make test")
    base = free_port_block()
    env = clean_env(FIREHOSE_PORT_BASE=str(base), FIREHOSE_DATA_DIR=str(tmp_path / "var"))
    make = subprocess.Popen(["make", "-o", "install", "run"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = 30.0
        started = time.monotonic()
        while True:
            try:
                if request(f"http://127.0.0.1:{base + 3}/readyz", timeout_s=1).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() - started < deadline, "make run did not become ready"
            assert make.poll() is None, "make run exited"
            threading.Event().wait(0.1)  # a bounded poll of another process
        assert request(f"http://127.0.0.1:{base}/readme/make", "PUT", b"x").status == 202
    finally:
        os.killpg(make.pid, signal.SIGINT)  # the group this test started
        make.wait(30)


def run_curl_session(text, tmp_path):
    """Each `$` command runs; the lines after it are found in its output (a command
    followed by another at once waits in the background, and the next output
    block may be its own)."""
    cluster = DefaultCluster(tmp_path)
    try:
        steps = []
        for line in cluster.moved(text).splitlines():
            if line.startswith("$ "):
                steps.append((without_comment(line[2:]), []))
            elif line.strip() and steps:
                steps[-1][1].append(without_comment(line))
        background = []
        for command, expected in steps:
            process = subprocess.Popen(["bash", "-c", command], stdout=subprocess.PIPE,
                                       text=True, env=cluster.env)
            if not expected:
                background.append(process)
                continue
            output = process.communicate(timeout=30)[0]
            if not output.strip() and background:
                output = background.pop(0).communicate(timeout=30)[0]
            expect_in_order(expected, output, command)
        for process in background:
            process.communicate(timeout=30)
    finally:
        cluster.stop()


def run_config_commands(text, tmp_path):
    """The per-host commands with a local cluster.toml, then each firehose-cluster line."""
    layout = Cluster(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "cluster.toml").write_text(layout.config_path.read_text())
    commands = [without_comment(line) for line in text.splitlines() if line.strip()]
    assert [c.split()[0] for c in commands] == ["firehose-worker", "firehose-worker",
                                                "firehose-edge", "firehose-cluster",
                                                "firehose-cluster"]
    env = clean_env(FIREHOSE_PORT_BASE=str(free_port_block()),
                    FIREHOSE_DATA_DIR=str(tmp_path / "var"))

    def start(command: str) -> Process:
        return subprocess_process(command, work, env)

    together = [start(command) for command in commands[:3]]
    try:
        together[2].wait_for("worker w1 up")
        together[2].wait_for("worker w2 up")
        assert request(layout.url("/readme/hosts"), "PUT", b"x").status == 202
    finally:
        for process in together:
            process.stop()
    for command, ready in ((commands[3], ["worker w1 up", "worker w2 up"]),
                           (commands[4], ["edge listening", "edge listening"])):
        process = start(command)
        try:
            after = {}  # a line repeated (two edges) must appear twice; others in any order
            for line in ready:
                after[line] = process.wait_for(line, start=after.get(line, -1) + 1)
        finally:
            process.signal(signal.SIGTERM)
            assert process.popen.wait(30) == 0
            process.stop()


def subprocess_process(command: str, cwd, env) -> Process:
    argv = command.split()
    argv[0] = str(BIN / argv[0])
    old = os.getcwd()
    os.chdir(cwd)  # Process has no cwd parameter; restored at once
    try:
        return Process(command, argv, env)
    finally:
        os.chdir(old)


def run_print_config(text, tmp_path):
    command, shown = text.splitlines()[:2]
    result = subprocess.run(without_comment(command).split(), capture_output=True, text=True,
                            env=clean_env(), timeout=30)
    assert result.returncode == 0, result.stderr
    wanted = " ".join(shown.lstrip("# ").split())
    assert wanted in [" ".join(line.split()) for line in result.stdout.splitlines()]


def run_ctl(text, tmp_path):
    cluster = DefaultCluster(tmp_path)
    try:
        assert request(cluster.url("/chat/room1"), "PUT", b"x").status == 202
        for line in text.splitlines():
            command = cluster.moved(without_comment(line))
            result = subprocess.run(command.split(), capture_output=True, text=True,
                                    env=cluster.env, timeout=60)
            assert result.returncode == 0, (command, result.stdout, result.stderr)
        cluster.process.wait_for("edge .* exited with status 0 .*not restarting")
    finally:
        cluster.stop()


def run_python(text, tmp_path):
    cluster = DefaultCluster(tmp_path)
    try:
        result = subprocess.run([sys.executable, "-c", cluster.moved(text)], capture_output=True,
                                text=True, timeout=60, env=cluster.env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == "1 hi", result.stdout
        assert "Message(" in lines[1] and "seq=1" in lines[1] and "b'hi'" in lines[1], lines
    finally:
        cluster.stop()


def run_toml(text, tmp_path):
    """The [storage] example is valid and shows the defaults."""
    document = tomllib.loads(text)
    document["workers"] = [{"id": "w1", "router_bind": "tcp://127.0.0.1:1",
                            "router_connect": "tcp://127.0.0.1:1",
                            "pub_bind": "tcp://127.0.0.1:2", "pub_connect": "tcp://127.0.0.1:2"}]
    assert parse_config(document).storage == StorageConfig()


def run_event_stream(text, tmp_path):
    cluster = DefaultCluster(tmp_path)
    try:
        lines = text.splitlines()
        expected = [line[2:] if line.startswith("# ") else "" for line in lines[1:]]
        for body in (b"first", b"first line\nsecond line"):
            assert request(cluster.url("/hello"), "PUT", body).status == 202
        curl = subprocess.Popen(["bash", "-c", cluster.moved(lines[0])], stdout=subprocess.PIPE,
                                text=True, env=cluster.env, start_new_session=True)
        try:
            output = ""
            selector = selectors.DefaultSelector()
            selector.register(curl.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 20
            while "data: second line" not in output and time.monotonic() < deadline:
                if selector.select(timeout=deadline - time.monotonic()):
                    chunk = curl.stdout.readline()
                    if not chunk:
                        break
                    output += chunk
        finally:
            os.killpg(curl.pid, signal.SIGKILL)  # the group this test started
            curl.wait(10)
        expect_in_order(expected, output, lines[0])
    finally:
        cluster.stop()


REPORTER = """<!doctype html><html><head><meta charset="utf-8"></head><body><script>
let reports = Promise.resolve();
console.log = (line) => {
  reports = reports.then(() => fetch("/report", {method: "POST", body: String(line)}))
                   .catch(() => undefined);
};
window.onerror = (message) => console.log("ERROR " + message);
SNIPPET
</script></body></html>"""


def run_javascript(text, tmp_path, chromium):
    """The WebSocket snippet in a page in headless Chromium: both sockets log their frames."""
    cluster = DefaultCluster(tmp_path)
    try:
        for i in range(1, 5):
            assert request(cluster.url("/hello"), "PUT", f"m{i}".encode()).status == 202
        assert request(cluster.url("/b"), "PUT", b"on b").status == 202
        page = REPORTER.replace("SNIPPET", cluster.moved(text))

        async def go():
            reports = []
            changed = asyncio.Event()

            class Page(tornado.web.RequestHandler):
                def get(self):
                    self.finish(page)

            class Report(tornado.web.RequestHandler):
                def post(self):
                    reports.append(self.request.body.decode())
                    changed.set()
                    self.set_status(204)

            sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
            server = tornado.httpserver.HTTPServer(tornado.web.Application(
                [("/", Page), ("/report", Report)]))
            server.add_sockets(sockets)
            browser = Chromium(chromium, f"http://127.0.0.1:{sockets[0].getsockname()[1]}/")
            wanted = {'{"message":"m4","last_sequence":4}',
                      '{"channel":"/b","message":"on b","last_sequence":1}'}
            try:
                async def all_seen():
                    while not wanted <= set(reports):
                        changed.clear()
                        await changed.wait()
                try:
                    await asyncio.wait_for(all_seen(), 60)
                except asyncio.TimeoutError:
                    raise AssertionError(f"the page logged {reports}; "
                                         f"browser:\n{browser.log_text()}") from None
                assert not [r for r in reports if r.startswith("ERROR")], reports
                assert '{"pong":"PONG"}' in reports
                # After the unsubscribe of /a a publish there reaches only nobody on mx.
                r = await async_request(cluster.url("/c"), "PUT", b"on c")
                assert r.status == 202
                wanted.add('{"channel":"/c","message":"on c","last_sequence":1}')
                await asyncio.wait_for(all_seen(), 30)
            finally:
                browser.stop()
                server.stop()
        asyncio.run(asyncio.wait_for(go(), 120))
    finally:
        cluster.stop()


def run_token(text, tmp_path):
    """The token snippet, with its secret file here: its token publishes to /chat/*
    and reads /chat/room1 on a cluster that requires both, and nothing else."""
    secret = "r" * 40
    secret_file = tmp_path / "jwt.secret"
    secret_file.write_text(secret + "\n")
    code = text.replace("/etc/firehose/jwt.secret", str(secret_file))
    assert code != text, "the snippet no longer reads /etc/firehose/jwt.secret"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    tables = f'[auth]\npublish = "required"\nsubscribe = "required"\njwt_key = "{secret}"\n'
    with Cluster(tmp_path, tables=tables) as cluster:
        bearer = {"Authorization": f"Bearer {token}"}
        assert request(cluster.url("/chat/room1"), "PUT", b"x", headers=bearer).status == 202
        assert request(cluster.url("/chat/room1"), headers=bearer).status == 200
        assert request(cluster.url("/news"), "PUT", b"x", headers=bearer).status == 403
        assert request(cluster.url("/chat/room2"), headers=bearer).status == 403


RUNNERS = {
    "make run": run_make,
    "$ curl -i -X PUT": run_curl_session,
    "firehose-worker --config cluster.toml --id w1": run_config_commands,
    "firehose-edge --print-config": run_print_config,
    "firehose-ctl status": run_ctl,
    "from firehose_zmq.client import": run_python,
    "[storage]": run_toml,
    "const ws = new WebSocket": run_javascript,
    "curl -N -H 'Accept: text/event-stream'": run_event_stream,
    "import jwt, time": run_token,
}


def runner_of(first_line: str):
    for prefix, runner in RUNNERS.items():
        if first_line.startswith(prefix):
            return runner
    for prefix in COVERED_ELSEWHERE:
        if first_line.startswith(prefix):
            return None
    raise AssertionError(f"README snippet without a runner in tests/test_readme.py: "
                         f"{first_line!r}")


def test_every_snippet_has_a_runner():
    used = {runner_of(first) for first in snippets()}
    assert set(RUNNERS.values()) <= used, "a runner whose snippet left the README"


@pytest.mark.parametrize("first_line", sorted(snippets()))
def test_readme_snippet_runs(first_line, tmp_path, request_chromium):
    runner = runner_of(first_line)
    if runner is None:
        pytest.skip(COVERED_ELSEWHERE[next(p for p in COVERED_ELSEWHERE
                                           if first_line.startswith(p))])
    text = snippets()[first_line][1]
    if runner is run_javascript:
        runner(text, tmp_path, request_chromium())
    else:
        runner(text, tmp_path)


@pytest.fixture
def request_chromium():
    def find():
        path, why_not = find_or_install_chromium()
        if path is None:
            pytest.skip(why_not)
        return path
    return find
