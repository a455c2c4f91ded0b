"""A real browser: a page from another origin subscribes with EventSource and WebSocket,
receives messages published over HTTP, and resumes after the edge restarts."""

import asyncio
import json

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web

from .browser import Chromium, find_or_install_chromium
from .cluster import Cluster
from .http import async_request

REPORT_TIMEOUT_S = 60.0

# The page reports every event to its own origin, one POST after the other so that
# they arrive in order. Its WebSocket speaks like the Firehose JavaScript client:
# ping, wait for the pong, then {"message_sequence": last}; a second pong says the
# subscription took effect. It reconnects from its last sequence when the socket closes.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>firehose-zmq browser test</title></head>
<body><script>
const query = new URLSearchParams(location.search);
const edge = query.get("edge");
const channel = query.get("channel");
const token = query.get("token");  // a subscriber's JWT, when the edge requires one
const auth = token ? "access_token=" + encodeURIComponent(token) : "";
let reports = Promise.resolve();
function report(event) {
  const body = JSON.stringify(event);
  reports = reports.then(() => fetch("/report", {method: "POST", body: body}))
                   .catch(() => undefined);
}

const source = new EventSource(edge + channel + "?last_message_sequence=0" +
                               (auth ? "&" + auth : ""));
source.onopen = () => report({transport: "sse", event: "open"});
source.onerror = () => report({transport: "sse", event: "error"});
source.onmessage = (e) => report({transport: "sse", event: "message", seq: Number(e.lastEventId),
                                  data: e.data});

let lastSequence = 0;
function connectSocket() {
  const socket = new WebSocket(edge.replace(/^http/, "ws") + channel + (auth ? "?" + auth : ""));
  let pongs = 0;
  socket.onopen = () => socket.send(JSON.stringify({ping: "PING"}));
  socket.onmessage = (e) => {
    const frame = JSON.parse(e.data);
    if (frame.pong === "PONG") {
      pongs += 1;
      if (pongs === 1) {
        socket.send(JSON.stringify({message_sequence: lastSequence}));
        socket.send(JSON.stringify({ping: "PING"}));
      } else if (pongs === 2) {
        report({transport: "ws", event: "open"});
      }
      return;
    }
    lastSequence = frame.last_sequence;
    report({transport: "ws", event: "message", seq: frame.last_sequence, data: frame.message});
  };
  socket.onclose = () => {
    report({transport: "ws", event: "close"});
    setTimeout(connectSocket, 300);
  };
}
connectSocket();
</script></body></html>
"""


class Reports:
    """What the page reported, in order, with a bounded wait for a condition."""

    def __init__(self):
        self.events: list = []
        self._changed = asyncio.Condition()

    async def add(self, event: dict) -> None:
        async with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def of(self, transport: str, event: str) -> list:
        return [e for e in self.events if e["transport"] == transport and e["event"] == event]

    def messages(self, transport: str) -> list:
        return [(e["seq"], e["data"]) for e in self.of(transport, "message")]

    async def wait_for(self, predicate, what: str) -> None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), REPORT_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise AssertionError(f"the page did not report {what} within "
                                     f"{REPORT_TIMEOUT_S} s; it reported {self.events}") from None


class PageHandler(tornado.web.RequestHandler):
    def get(self):
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(PAGE)


class ReportHandler(tornado.web.RequestHandler):
    def initialize(self, reports):
        self.reports = reports

    async def post(self):
        await self.reports.add(json.loads(self.request.body))
        self.set_status(204)


class PageSite:
    """The page's own origin (a Tornado server on a free port) and a headless Chromium
    showing the page with ``query``; ``reports`` is what the page reported."""

    def __init__(self, chromium_binary: str, query: str):
        self.reports = Reports()
        app = tornado.web.Application([("/page.html", PageHandler),
                                       ("/report", ReportHandler, {"reports": self.reports})])
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        self.server = tornado.httpserver.HTTPServer(app)
        self.server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        self.browser = Chromium(chromium_binary, f"http://127.0.0.1:{port}/page.html?{query}")

    def stop(self) -> None:
        self.browser.stop()
        self.server.stop()


@pytest.fixture(scope="session")
def chromium_binary():
    path, why_not = find_or_install_chromium()
    if path is None:
        pytest.skip(why_not)
    return path


def test_browser_event_source_and_websocket_resume_after_edge_restart(tmp_path, run,
                                                                      chromium_binary):
    """EventSource and WebSocket on a page from another origin get every message once, in
    order, across a restart of the edge."""
    channel = "/browser/news"
    with Cluster(tmp_path) as cluster:
        async def publish(body: str) -> None:
            r = await async_request(cluster.url(channel), "PUT", body.encode())
            assert r.status == 202

        async def go():
            edge = f"http://127.0.0.1:{cluster.http_port}"
            site = PageSite(chromium_binary, f"edge={edge}&channel={channel}")
            reports, browser = site.reports, site.browser
            loop = asyncio.get_running_loop()
            try:
                await reports.wait_for(lambda: reports.of("sse", "open")
                                       and reports.of("ws", "open"), "both subscriptions")
                for i in (1, 2, 3):
                    await publish(f"message {i}\nline two")
                expected = [(i, f"message {i}\nline two") for i in (1, 2, 3)]
                await reports.wait_for(lambda: len(reports.messages("sse")) >= 3
                                       and len(reports.messages("ws")) >= 3, "3 messages")
                assert reports.messages("sse") == expected
                assert reports.messages("ws") == expected

                await loop.run_in_executor(None, cluster.restart_edge)
                for i in (4, 5):
                    await publish(f"message {i}\nline two")
                expected += [(i, f"message {i}\nline two") for i in (4, 5)]
                await reports.wait_for(lambda: len(reports.messages("sse")) >= 5
                                       and len(reports.messages("ws")) >= 5, "5 messages")
                assert reports.messages("sse") == expected
                assert reports.messages("ws") == expected
                assert reports.of("ws", "close"), "the WebSocket never saw the edge go away"
                assert reports.of("sse", "error"), "the EventSource never saw the edge go away"
                print("page reported:", [(e["transport"], e["event"], e.get("seq")) for e in reports.events])
            except AssertionError:
                print(browser.log_text())
                raise
            finally:
                site.stop()

        run(go(), timeout_s=180)


def test_browser_subscribes_with_a_token_in_its_urls(tmp_path, run, chromium_binary):
    """With subscribing required, a page's EventSource and WebSocket carry their token
    in the URL (browsers cannot set headers on either) and get the messages."""
    import time

    import jwt
    secret = "b" * 40
    channel = "/browser/private"
    claims = {"exp": int(time.time()) + 600, "firehose": {"publish": [channel],
                                                          "subscribe": [channel]}}
    token = jwt.encode(claims, secret, algorithm="HS256")
    tables = f'[auth]\npublish = "required"\nsubscribe = "required"\njwt_key = "{secret}"\n'
    with Cluster(tmp_path, tables=tables) as cluster:
        async def go():
            edge = f"http://127.0.0.1:{cluster.http_port}"
            site = PageSite(chromium_binary, f"edge={edge}&channel={channel}&token={token}")
            reports, browser = site.reports, site.browser
            try:
                await reports.wait_for(lambda: reports.of("sse", "open")
                                       and reports.of("ws", "open"), "both subscriptions")
                for i in (1, 2):
                    r = await async_request(cluster.url(channel), "PUT", f"secret {i}".encode(),
                                            {"Authorization": f"Bearer {token}"})
                    assert r.status == 202
                expected = [(1, "secret 1"), (2, "secret 2")]
                await reports.wait_for(lambda: len(reports.messages("sse")) >= 2
                                       and len(reports.messages("ws")) >= 2, "2 messages")
                assert reports.messages("sse") == expected
                assert reports.messages("ws") == expected
            except AssertionError:
                print(browser.log_text())
                raise
            finally:
                site.stop()

        run(go(), timeout_s=120)
