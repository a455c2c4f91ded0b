"""The authorization callout: an HTTP service that says yes or no per request
(like Nchan's ``nchan_authorize_request``), for deployments that decide per request.

Question (``[auth] callout_url``)::

    POST <callout_url>
    Content-Type: application/json
    Authorization: Bearer <credential>          (when the client sent one)
    {"op": "publish" | "subscribe", "channel": "/chat/a"}

Answer: ``2xx`` allows; ``401`` and ``403`` refuse with that status (and the first
line of a text body as the reason); any other status, a connection that fails, or
no answer within ``callout_timeout_s`` is a *failure*. A failure refuses with
``503`` (fail closed, the default) or, with ``callout_fail_open = true``, allows
and is logged. Allowing and refusing answers are remembered for
``callout_cache_ttl_s`` per (op, channel, credential), at most
``callout_cache_size`` of them (the oldest go first); failures are not. Questions
asked again while the first is on its way share its answer. At most
``callout_max_in_flight`` questions are on their way at once; one more is a failure.
"""

import asyncio
import json
import logging
import time

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from .tokens import AuthError

log = logging.getLogger("firehose.auth")

_MAX_REASON_CHARS = 200


class Callout:
    """Asks ``url`` and caches its answers; every method runs on the event loop."""

    def __init__(self, url: str, timeout_s: float = 2.0, cache_ttl_s: float = 5.0,
                 cache_size: int = 1024, max_in_flight: int = 64, fail_open: bool = False,
                 realm: str = "firehose", clock=time.monotonic):
        self.url = url
        self._timeout_s = timeout_s
        self._cache_ttl_s = cache_ttl_s
        self._cache_size = cache_size
        self._max_in_flight = max_in_flight
        self._fail_open = fail_open
        self._challenge = f'Bearer realm="{realm}"'
        self._clock = clock
        self._cache = {}  # (op, channel, credential) -> (expires_at, None | AuthError)
        self._pending = {}  # the same key -> the future of the question on its way
        self._client = None
        self.asked = 0
        self.failures = 0

    @classmethod
    def from_config(cls, auth) -> "Callout":
        return cls(auth.callout_url, auth.callout_timeout_s, auth.callout_cache_ttl_s,
                   auth.callout_cache_size, auth.callout_max_in_flight, auth.callout_fail_open,
                   auth.realm)

    @property
    def cached(self) -> int:
        return len(self._cache)

    def answered(self, op: str, channel: str, credential) -> bool:
        """True when a remembered answer allows; a remembered refusal raises it."""
        key = (op, channel, credential)
        hit = self._cache.get(key)
        if hit is None:
            return False
        expires_at, refusal = hit
        if self._clock() >= expires_at:
            del self._cache[key]
            return False
        if refusal is not None:
            raise AuthError(refusal.status, refusal.reason, refusal.www_authenticate)
        return True

    async def ask(self, op: str, channel: str, credential) -> None:
        """Raise ``AuthError`` unless the service (or its remembered answer) allows."""
        if self.answered(op, channel, credential):
            return
        key = (op, channel, credential)
        pending = self._pending.get(key)
        if pending is None:
            if len(self._pending) >= self._max_in_flight:
                refusal = self._failed(f"{self._max_in_flight} authorization callouts are "
                                       "already waiting")
            else:
                pending = asyncio.ensure_future(self._fetch(key))
                self._pending[key] = pending
                pending.add_done_callback(lambda _: self._pending.pop(key, None))
        if pending is not None:
            # One waiter that goes away (a closed connection) does not cancel the others'.
            refusal = await asyncio.shield(pending)
        if refusal is not None:
            raise AuthError(refusal.status, refusal.reason, refusal.www_authenticate)

    async def _fetch(self, key):
        """The service's answer to ``key``: None (allowed) or the AuthError to raise."""
        op, channel, credential = key
        if self._client is None:
            self._client = AsyncHTTPClient(force_instance=True,
                                           max_clients=self._max_in_flight)
        headers = {"Content-Type": "application/json"}
        if credential:
            headers["Authorization"] = f"Bearer {credential}"
        request = HTTPRequest(self.url, method="POST", headers=headers,
                              body=json.dumps({"op": op, "channel": channel}),
                              connect_timeout=self._timeout_s, request_timeout=self._timeout_s,
                              follow_redirects=False)
        self.asked += 1
        try:
            response = await self._client.fetch(request, raise_error=False)
        except Exception as exc:  # DNS, refused connection, TLS: the service cannot be asked
            return self._failed(f"cannot reach it: {exc}")
        status = response.code
        if 200 <= status < 300:
            refusal = None
        elif status in (401, 403):
            reason = _first_line(response.body) or (
                "the authorization service refused the credential" if status == 401 else
                f"the authorization service does not allow this {op} on {channel}")
            challenge = (response.headers.get("WWW-Authenticate") or self._challenge
                         if status == 401 else None)
            refusal = AuthError(status, reason, challenge)
        elif status == 599:
            return self._failed(f"no answer: {response.error}")
        else:
            return self._failed(f"it answered {status}")
        if len(self._cache) >= self._cache_size:
            del self._cache[next(iter(self._cache))]
        self._cache[key] = (self._clock() + self._cache_ttl_s, refusal)
        return refusal

    def _failed(self, why: str):
        self.failures += 1
        count = self.failures
        if count <= 10 or count % 1000 == 0:
            log.warning("authorization callout %s failed (%d so far): %s; %s", self.url, count,
                        why, "allowing (callout_fail_open)" if self._fail_open else "refusing")
        if self._fail_open:
            return None
        return AuthError(503, "the authorization service is unavailable; retry later")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _first_line(body) -> str:
    if not body:
        return ""
    text = body.decode("utf-8", "replace").strip()
    return text.splitlines()[0][:_MAX_REASON_CHARS] if text else ""
