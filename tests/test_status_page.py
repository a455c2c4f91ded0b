"""The admin listener's status page in headless Chromium: a worker goes down and comes back.

The test reads the live page through the DevTools protocol (Chromium started with
--remote-debugging-port), so the page needs no test hooks of its own.
"""

import asyncio
import json
import re
import signal
import time

import pytest
import tornado.httpclient
import tornado.websocket

from .browser import Chromium, find_or_install_chromium
from .cluster import Cluster
from .http import async_request

WAIT_S = 30.0


class Page:
    """One open page, evaluated over the DevTools protocol."""

    def __init__(self, socket):
        self._socket = socket
        self._ids = 0

    @classmethod
    async def open(cls, browser: Chromium, url_prefix: str) -> "Page":
        deadline = time.monotonic() + WAIT_S
        port = None
        while port is None:
            match = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", browser.log_text())
            if match:
                port = int(match.group(1))
            elif time.monotonic() > deadline:
                raise AssertionError("Chromium did not start DevTools:\n" + browser.log_text())
            else:
                await asyncio.sleep(0.1)  # a bounded poll of Chromium's log
        client = tornado.httpclient.AsyncHTTPClient()
        while True:
            targets = json.loads((await client.fetch(f"http://127.0.0.1:{port}/json/list")).body)
            pages = [t for t in targets if t["type"] == "page" and t["url"].startswith(url_prefix)]
            if pages:
                break
            assert time.monotonic() < deadline, f"no page for {url_prefix}: {targets}"
            await asyncio.sleep(0.1)
        socket = await tornado.websocket.websocket_connect(pages[0]["webSocketDebuggerUrl"])
        return cls(socket)

    async def evaluate(self, expression: str):
        self._ids += 1
        await self._socket.write_message(json.dumps({
            "id": self._ids, "method": "Runtime.evaluate",
            "params": {"expression": expression, "returnByValue": True}}))
        while True:
            reply = json.loads(await self._socket.read_message())
            if reply.get("id") == self._ids:
                return reply["result"]["result"].get("value")

    async def wait_for(self, expression: str, expected, what: str):
        deadline = time.monotonic() + WAIT_S
        while True:
            got = await self.evaluate(expression)
            if got == expected:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise AssertionError(f"the page did not show {what} within {WAIT_S} s "
                                     f"({expression} = {got!r})")
            await asyncio.sleep(0.1)  # the page updates every second; poll it, bounded

    def close(self):
        self._socket.close()


@pytest.fixture(scope="module")
def chromium_binary():
    path, why_not = find_or_install_chromium()
    if path is None:
        pytest.skip(why_not)
    return path


def worker_state(worker_id: str) -> str:
    return (f"(document.querySelector('tr[data-worker=\"{worker_id}\"]') || {{dataset: {{}}}})"
            ".dataset.state || null")


def test_status_page_shows_a_worker_go_down_and_come_back(tmp_path, chromium_binary):
    with Cluster(tmp_path) as cluster:
        async def go():
            for i in range(5):
                assert (await async_request(cluster.url(f"/page/{i}"), "PUT", b"x")).status == 202
            url = cluster.admin_url("/")
            browser = Chromium(chromium_binary, url, ["--remote-debugging-port=0"])
            page = None
            try:
                page = await Page.open(browser, url)
                await page.wait_for(worker_state("w1"), "up", "w1 up")
                await page.wait_for(worker_state("w2"), "up", "w2 up")
                await page.wait_for("document.getElementById('published').textContent", "5",
                                    "5 publishes")
                channels = await page.evaluate(
                    "[...document.querySelectorAll('#workers tr')]"
                    ".map(r => Number(r.children[2].textContent)).reduce((a, b) => a + b, 0)")
                assert channels == 5
                assert await page.evaluate("document.getElementById('sub-sse').textContent") == "0"
                # The publishes chart has its blue line drawn above its zero line.
                assert await page.evaluate(
                    "(() => { const d = document.getElementById('chart-published')"
                    ".getContext('2d').getImageData(0, 0, 420, 100).data;"
                    " for (let i = 0; i < d.length; i += 4)"
                    "   if (d[i + 2] > 200 && d[i] < 80 && d[i + 3] > 200) return true;"
                    " return false; })()")

                cluster.workers["w2"].signal(signal.SIGSTOP)
                try:
                    await page.wait_for(worker_state("w2"), "down", "w2 down")
                    assert await page.evaluate(worker_state("w1")) == "up"
                    assert await page.evaluate(
                        "document.getElementById('state').dataset.ready") == "false"
                finally:
                    cluster.workers["w2"].signal(signal.SIGCONT)
                await page.wait_for(worker_state("w2"), "up", "w2 up again")
                await page.wait_for("document.getElementById('state').dataset.ready", "true",
                                    "the edge ready again")
            except AssertionError:
                print(browser.log_text())
                raise
            finally:
                if page is not None:
                    page.close()
                browser.stop()
        asyncio.run(asyncio.wait_for(go(), 180))
