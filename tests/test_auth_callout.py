"""The authorization callout against a real HTTP service on loopback."""

import asyncio
import json
import time

import pytest
import tornado.web
from tornado.httpserver import HTTPServer

from firehose_zmq.auth.callout import Callout
from firehose_zmq.auth.tokens import AuthError, Authorizer
from firehose_zmq.config import AuthConfig
from firehose_zmq.testing import free_port

TIMEOUT_S = 0.5


class AuthService:
    """A small authorization service: the credential says what it answers.

    ``allow`` 200, ``deny`` 403 with a reason, ``who`` 401, ``boom`` 500, ``hang``
    never answers (until the service stops); every question is recorded."""

    def __init__(self):
        self.questions = []
        self.release = asyncio.Event()
        service = self

        class Handler(tornado.web.RequestHandler):
            async def post(self):
                credential = self.request.headers.get("Authorization", "")
                service.questions.append((credential, json.loads(self.request.body)))
                token = credential.removeprefix("Bearer ")
                if token == "hang":
                    await service.release.wait()
                    return
                status = {"allow": 200, "deny": 403, "who": 401, "boom": 500}.get(token, 401)
                self.set_status(status)
                if status == 403:
                    self.write("room is closed\nsecond line")

        self.port = free_port()
        self.server = HTTPServer(tornado.web.Application([(r"/auth", Handler)]))
        self.server.listen(self.port, "127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}/auth"

    async def stop(self):
        self.release.set()
        self.server.stop()
        await self.server.close_all_connections()


def callout_for(service_url, **options):
    return Callout(service_url, **{"timeout_s": TIMEOUT_S, **options})


async def status_of(callout, credential, op="subscribe", channel="/a"):
    try:
        await callout.ask(op, channel, credential)
    except AuthError as exc:
        return exc.status, exc.reason
    return 200, ""


@pytest.mark.parametrize("credential, status, reason", [
    ("allow", 200, ""),
    ("deny", 403, "room is closed"),
    ("who", 401, "the authorization service refused the credential"),
    ("boom", 503, "the authorization service is unavailable; retry later"),
    ("hang", 503, "the authorization service is unavailable; retry later"),
    (None, 401, "the authorization service refused the credential"),
])
def test_answers(run, credential, status, reason):
    """2xx allows, 401/403 refuse with the service's reason, an error or silence is 503."""
    async def scenario():
        service = AuthService()
        callout = callout_for(service.url)
        try:
            started = time.monotonic()
            assert await status_of(callout, credential) == (status, reason)
            assert time.monotonic() - started < TIMEOUT_S + 2
            assert service.questions[0] == (f"Bearer {credential}" if credential else "",
                                            {"op": "subscribe", "channel": "/a"})
        finally:
            callout.close()
            await service.stop()
    run(scenario())


def test_unreachable_service_fails_closed_or_open(run):
    """Nobody listening: refused with 503 by default, allowed with fail_open."""
    async def scenario():
        url = f"http://127.0.0.1:{free_port()}/auth"
        closed, opened = callout_for(url), callout_for(url, fail_open=True)
        try:
            assert (await status_of(closed, "allow"))[0] == 503
            assert (await status_of(opened, "allow"))[0] == 200
            assert closed.failures == 1 and closed.cached == 0
        finally:
            closed.close()
            opened.close()
    run(scenario())


def test_answers_are_cached_for_the_ttl(run):
    """A second question within the TTL is answered from the cache, refusals included;
    after it the service is asked again."""
    async def scenario():
        service = AuthService()
        clock = [0.0]
        callout = callout_for(service.url, cache_ttl_s=5, clock=lambda: clock[0])
        try:
            for credential, status in (("allow", 200), ("deny", 403)):
                assert (await status_of(callout, credential))[0] == status
                assert (await status_of(callout, credential))[0] == status
            assert len(service.questions) == 2
            assert callout.answered("subscribe", "/a", "allow")
            with pytest.raises(AuthError):
                callout.answered("subscribe", "/a", "deny")
            assert (await status_of(callout, "allow", channel="/b"))[0] == 200
            assert len(service.questions) == 3  # another channel is another question
            clock[0] += 5
            assert (await status_of(callout, "allow"))[0] == 200
            assert len(service.questions) == 4
            assert (await status_of(callout, "boom"))[0] == 503
            assert (await status_of(callout, "boom"))[0] == 503
            assert len(service.questions) == 6  # failures are not remembered
        finally:
            callout.close()
            await service.stop()
    run(scenario())


def test_concurrent_questions_share_one_request(run):
    """Fifty subscribers asking the same thing at once cost the service one question."""
    async def scenario():
        service = AuthService()
        callout = callout_for(service.url)
        try:
            results = await asyncio.gather(*(status_of(callout, "deny") for _ in range(50)))
            assert {r[0] for r in results} == {403}
            assert len(service.questions) == 1
        finally:
            callout.close()
            await service.stop()
    run(scenario())


def test_cache_is_bounded(run):
    """callout_cache_size answers at most are remembered: the oldest go first."""
    async def scenario():
        service = AuthService()
        callout = callout_for(service.url, cache_size=20)
        try:
            for i in range(60):
                assert (await status_of(callout, "allow", channel=f"/c{i}"))[0] == 200
            assert callout.cached == 20
            assert callout.answered("subscribe", "/c59", "allow")
            assert not callout.answered("subscribe", "/c0", "allow")
        finally:
            callout.close()
            await service.stop()
    run(scenario())


def test_questions_in_flight_are_bounded(run):
    """Past callout_max_in_flight waiting questions, another is refused (503) at once."""
    async def scenario():
        service = AuthService()
        callout = callout_for(service.url, max_in_flight=2, timeout_s=10)
        try:
            waiting = [asyncio.ensure_future(status_of(callout, "hang", channel=f"/h{i}"))
                       for i in range(2)]
            deadline = time.monotonic() + 5
            while len(service.questions) < 2:  # both questions have reached the service
                assert time.monotonic() < deadline
                await asyncio.wait(waiting, timeout=0.05)
            started = time.monotonic()
            assert (await status_of(callout, "allow"))[0] == 503
            assert time.monotonic() - started < 1.0
            service.release.set()
            await asyncio.gather(*waiting)
        finally:
            callout.close()
            await service.stop()
    run(scenario())


def test_authorizer_with_a_callout(run):
    """With a callout and no JWT key, a required operation needs a credential and the
    service's consent; callout_pending tells the fast path when to await it."""
    async def scenario():
        service = AuthService()
        auth = Authorizer.from_config(AuthConfig(
            publish="required", subscribe="open", callout_url=service.url,
            callout_timeout_s=TIMEOUT_S))
        try:
            with pytest.raises(AuthError) as missing:
                await auth.authorize("publish", "/a", None)
            assert missing.value.status == 401 and not service.questions
            assert not auth.callout_pending("subscribe", "/a", None)  # open: nothing to ask
            assert auth.callout_pending("publish", "/a", "allow")
            await auth.authorize("publish", "/a", "allow")
            assert not auth.callout_pending("publish", "/a", "allow")  # remembered
            await auth.authorize("subscribe", "/a", None)
            with pytest.raises(AuthError) as denied:
                await auth.authorize("publish", "/a", "deny")
            assert denied.value.status == 403
            with pytest.raises(AuthError):
                auth.callout_pending("publish", "/a", "deny")  # a remembered refusal
            assert len(service.questions) == 2
        finally:
            auth.close()
            await service.stop()
    run(scenario())
