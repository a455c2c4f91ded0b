"""Python clients of firehose-zmq: HTTP ``Producer``, long-poll ``Consumer``, ``ZmqSubscriber``.

Theory of operation
-------------------
Every client is a *program*: a generator that holds all the logic (what to send,
how to read the answer, when to retry, which sequence comes next) and does no
I/O itself. It yields effects and gets their results back::

    HttpCall(method, url, headers, body, timeout_s)  -> HttpResponse | raises TransportError
    Sleep(seconds)                                   -> None
    ZmqSend(frames)                                  -> None   (on the request DEALER)
    ZmqWait(timeout_s)                               -> [("sub" | "req", frames), ...]
    Emit(value)                                      -> None   (handed to the caller)

Two small drivers run a program: ``run_sync`` / ``iterate_sync`` with blocking
I/O, ``run_async`` / ``iterate_async`` on asyncio. So each client exists once,
and its sync and asyncio faces (``Producer`` / ``AsyncProducer``, ...) only pick
a driver and an I/O object.

The native subscriber's state machine is ``SubscriberCore`` (pure: frames and
clock readings in, events and request frames out). Per channel it keeps the
epoch and the ``floor`` (the newest sequence delivered or reported lost) and
applies these rules to each live message ``m``:

    =====================================  ===========================================
    m.epoch < epoch                        stale incarnation: dropped
    m.epoch > epoch                        the channel started over: epoch = m.epoch,
                                           floor = 0, then the rows below
    a fetch is in flight                   held, replayed when the fetch is answered
    m.seq <= floor                         duplicate (e.g. a last-value-cache re-send)
    m.seq == floor + 1                     delivered
    m.seq >  floor + 1                     gap: held, and the owner is asked for every
                                           buffered message above floor (fetch after)
    =====================================  ===========================================

A fetch answer delivers what it brings in order; sequences it cannot bring
(fallen out of the channel's buffer) are reported as one ``Gap`` event in their
place. A subscriber that lost the *newest* messages of a quiet channel cannot
see a later sequence, so a channel with no traffic is probed (fetch after floor)
after ``probe_interval_s``, backing off to ``probe_max_s`` while nothing is new.
"""

import asyncio
import http.client
import itertools
import json
import logging
import random
import sys
import time
from collections import deque
from typing import NamedTuple, Optional
from urllib.parse import urlencode, urlsplit

import zmq

from . import cli
from .wire import frames
from .wire.names import InvalidName, check_channel

log = logging.getLogger("firehose.client")


# -- errors and results ---------------------------------------------------------

class ClientError(Exception):
    """Base of every error of this module."""


class TransportError(ClientError):
    """The server could not be reached or did not answer in time."""


class PublishError(ClientError):
    """A publish was answered with something other than 202 (``status``, ``reason``)."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"publish failed with HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


class ConsumeError(ClientError):
    """A long-poll was refused for good (a 4xx other than 408/429)."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"subscription refused with HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


class HttpResponse(NamedTuple):
    status: int
    headers: dict  # lower-case names
    body: bytes


class Message(NamedTuple):
    """One channel message. ``data`` is bytes from ZeroMQ, str from long-poll (JSON)."""

    channel: str
    seq: int
    data: object
    epoch: Optional[int] = None


class Gap(NamedTuple):
    """Sequences ``first_seq..last_seq`` of ``channel`` (in ``epoch``) were lost for good:
    they fell out of the channel's buffer before they could be fetched."""

    channel: str
    epoch: int
    first_seq: int
    last_seq: int


# -- effects and drivers -------------------------------------------------------

class HttpCall(NamedTuple):
    method: str
    url: str
    headers: dict
    body: Optional[bytes]
    timeout_s: float


class Sleep(NamedTuple):
    seconds: float


class ZmqSend(NamedTuple):
    frames: list


class ZmqWait(NamedTuple):
    timeout_s: float


class Emit(NamedTuple):
    value: object


def _step(program, value, error):
    """Advance ``program`` by one effect; StopIteration carries its result."""
    return program.throw(error) if error is not None else program.send(value)


def iterate_sync(program, io):
    """Run ``program`` with blocking ``io``; yields what it emits, returns its result."""
    value = error = None
    while True:
        try:
            effect = _step(program, value, error)
        except StopIteration as stop:
            return stop.value
        value = error = None
        if isinstance(effect, Emit):
            yield effect.value
            continue
        try:
            value = io.perform(effect)
        except TransportError as exc:
            error = exc


def run_sync(program, io):
    """Run a program that emits nothing with blocking ``io``; returns its result."""
    steps = iterate_sync(program, io)
    try:
        emitted = next(steps)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError(f"unexpected emitted value {emitted!r}")


async def iterate_async(program, io):
    """Run ``program`` with asyncio ``io``; an async generator of what it emits."""
    value = error = None
    while True:
        try:
            effect = _step(program, value, error)
        except StopIteration:
            return
        value = error = None
        if isinstance(effect, Emit):
            yield effect.value
            continue
        try:
            value = await io.perform(effect)
        except TransportError as exc:
            error = exc


async def run_async(program, io):
    """Run a program that emits nothing to its end; returns its result."""
    value = error = None
    while True:
        try:
            effect = _step(program, value, error)
        except StopIteration as stop:
            return stop.value
        value = error = None
        if isinstance(effect, Emit):
            raise RuntimeError(f"unexpected emitted value {effect.value!r}")
        try:
            value = await io.perform(effect)
        except TransportError as exc:
            error = exc


# -- HTTP I/O -------------------------------------------------------------------

class SyncHttp:
    """Blocking HTTP/1.1 with one keep-alive connection (``http.client``)."""

    def __init__(self):
        self._conn = None
        self._origin = None

    def perform(self, effect):
        if isinstance(effect, Sleep):
            time.sleep(effect.seconds)
            return None
        parts = urlsplit(effect.url)
        origin = (parts.scheme, parts.hostname, parts.port)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        reused = self._conn is not None and self._origin == origin
        for attempt in (1, 2):
            conn = self._connection(origin, effect.timeout_s)
            try:
                conn.request(effect.method, path, body=effect.body, headers=effect.headers)
                response = conn.getresponse()
                body = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if reused and attempt == 1:
                    continue  # the server closed an idle keep-alive connection
                raise TransportError(f"{effect.method} {effect.url}: {exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise TransportError(f"{effect.method} {effect.url}: {exc}") from None
            if response.getheader("Connection", "").lower() == "close":
                self.close()
            return HttpResponse(response.status,
                                {k.lower(): v for k, v in response.getheaders()}, body)

    def _connection(self, origin, timeout_s):
        if self._conn is None or self._origin != origin:
            self.close()
            scheme, host, port = origin
            cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            self._conn, self._origin = cls(host, port, timeout=timeout_s), origin
        self._conn.timeout = timeout_s
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout_s)
        return self._conn

    def close(self):
        if self._conn is not None:
            self._conn.close()
        self._conn = None


class AsyncHttp:
    """asyncio HTTP (Tornado's client, already a dependency of the server)."""

    def __init__(self):
        self._client = None

    async def perform(self, effect):
        if isinstance(effect, Sleep):
            await asyncio.sleep(effect.seconds)
            return None
        from tornado.httpclient import AsyncHTTPClient, HTTPRequest
        if self._client is None:
            self._client = AsyncHTTPClient(force_instance=True)
        body = effect.body
        if body is None and effect.method in ("PUT", "POST"):
            body = b""
        request = HTTPRequest(effect.url, method=effect.method, headers=effect.headers, body=body,
                              connect_timeout=effect.timeout_s, request_timeout=effect.timeout_s,
                              allow_nonstandard_methods=True)
        response = await self._client.fetch(request, raise_error=False)
        if response.code == 599:
            raise TransportError(f"{effect.method} {effect.url}: {response.error}")
        return HttpResponse(response.code, {k.lower(): v for k, v in response.headers.get_all()},
                            response.body or b"")

    def close(self):
        if self._client is not None:
            self._client.close()
        self._client = None


def _reason(response: HttpResponse) -> str:
    text = response.body.decode("utf-8", "replace").strip()
    return text.splitlines()[0] if text else "(no reason given)"


# -- Producer -------------------------------------------------------------------

def publish_program(url: str, data: bytes, ttl_s=None, buffer_size=None, persist=False,
                    timeout_s: float = 10.0):
    """PUT ``data`` to the channel ``url``; returns the sequence it got (docs/protocol.md §2)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    headers = {"Content-Type": "application/octet-stream"}
    if ttl_s is not None:
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s < 0:
            raise ValueError("ttl_s must be an integer >= 0")
        headers["X-Firehose-TTL"] = str(ttl_s)
    if buffer_size is not None:
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 0:
            raise ValueError("buffer_size must be an integer >= 0")
        headers["X-Firehose-Buffer-Size"] = str(buffer_size)
    if persist:
        headers["X-Firehose-Persist"] = "true"
    response = yield HttpCall("PUT", url, headers, data, timeout_s)
    if response.status != 202:
        raise PublishError(response.status, _reason(response))
    sequence = response.headers.get("x-firehose-sequence", "")
    return int(sequence) if sequence.isdigit() else None


class _ProducerBase:
    def __init__(self, base_url: str, timeout_s: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def _program(self, channel, data, ttl_s, buffer_size, persist):
        if not channel.startswith("/"):
            raise ValueError("a channel name starts with '/'")
        return publish_program(self.base_url + channel, data, ttl_s, buffer_size, persist,
                               self.timeout_s)


class Producer(_ProducerBase):
    """Publishes over HTTP: ``Producer("http://host:7474").publish("/chan", b"hi")``.

    ``publish`` returns the message's sequence; it raises ``PublishError`` for any
    answer but 202 and ``TransportError`` when the edge is unreachable or does not
    answer within ``timeout_s``. Not thread-safe; one keep-alive connection.
    """

    def __init__(self, base_url: str, timeout_s: float = 10.0):
        super().__init__(base_url, timeout_s)
        self._io = SyncHttp()

    def publish(self, channel: str, data, ttl_s: Optional[int] = None,
                buffer_size: Optional[int] = None, persist: bool = False) -> Optional[int]:
        return run_sync(self._program(channel, data, ttl_s, buffer_size, persist),
                                self._io)

    def close(self) -> None:
        self._io.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncProducer(_ProducerBase):
    """``Producer`` for asyncio: ``await producer.publish(...)``."""

    def __init__(self, base_url: str, timeout_s: float = 10.0):
        super().__init__(base_url, timeout_s)
        self._io = AsyncHttp()

    async def publish(self, channel: str, data, ttl_s: Optional[int] = None,
                      buffer_size: Optional[int] = None, persist: bool = False) -> Optional[int]:
        return await run_async(self._program(channel, data, ttl_s, buffer_size, persist),
                               self._io)

    def close(self) -> None:
        self._io.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()


# -- Consumer (long-poll) -------------------------------------------------------

class Backoff:
    """Exponential back-off with full jitter: attempt n waits U(0, min(cap, base * 2**n))."""

    def __init__(self, base_s: float = 0.1, cap_s: float = 10.0, rng=None):
        self.base_s = base_s
        self.cap_s = cap_s
        self.rng = rng or random.Random()
        self.attempt = 0

    def next_delay_s(self) -> float:
        delay = self.rng.uniform(0, min(self.cap_s, self.base_s * 2 ** self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


def consume_program(url: str, since: int = 0, poll_timeout_s: float = 60.0,
                    backoff: Optional[Backoff] = None, max_errors: Optional[int] = None):
    """Long-poll the channel ``url`` from sequence ``since``; emits ``Message`` (data: str).

    Resumes with each reply's ``last_sequence``; 204 re-polls at once; 5xx, 408,
    429 and transport errors back off with jitter (``max_errors`` in a row end it
    with the last error); any other status raises ``ConsumeError``.
    """
    backoff = backoff or Backoff()
    channel = urlsplit(url).path
    seq, errors = since, 0
    while True:
        try:
            response = yield HttpCall("GET", f"{url}?{urlencode({'last_message_sequence': seq})}",
                                      {}, None, poll_timeout_s)
        except TransportError as exc:
            response, failure = None, exc
        if response is not None:
            if response.status == 200:
                frame = json.loads(response.body)
                seq, errors = frame["last_sequence"], 0
                backoff.reset()
                yield Emit(Message(channel, seq, frame["message"]))
                continue
            if response.status == 204:
                errors = 0
                backoff.reset()
                continue
            if 400 <= response.status < 500 and response.status not in (408, 429):
                raise ConsumeError(response.status, _reason(response))
            failure = ConsumeError(response.status, _reason(response))
        errors += 1
        if max_errors is not None and errors >= max_errors:
            raise failure
        delay = backoff.next_delay_s()
        log.info("long-poll of %s failed (%s); retrying in %.2f s", url, failure, delay)
        yield Sleep(delay)


class Consumer:
    """Long-poll one channel URL: ``for message in Consumer(url): ...`` (sync), or
    ``async for message in Consumer(url)`` (asyncio). Messages are ``Message`` with
    ``data`` as a str (the JSON transports carry text). ``last_sequence`` is where
    to resume after a restart.
    """

    def __init__(self, url: str, since: int = 0, poll_timeout_s: float = 60.0,
                 backoff: Optional[Backoff] = None, max_errors: Optional[int] = None):
        self.url = url
        self.last_sequence = since
        self._options = (poll_timeout_s, backoff, max_errors)

    def _program(self):
        poll_timeout_s, backoff, max_errors = self._options
        return consume_program(self.url, self.last_sequence, poll_timeout_s, backoff, max_errors)

    def __iter__(self):
        io = SyncHttp()
        try:
            for message in iterate_sync(self._program(), io):
                self.last_sequence = message.seq
                yield message
        finally:
            io.close()

    async def __aiter__(self):
        io = AsyncHttp()
        try:
            async for message in iterate_async(self._program(), io):
                self.last_sequence = message.seq
                yield message
        finally:
            io.close()


# -- native ZeroMQ subscriber ---------------------------------------------------

class _ChannelState:
    __slots__ = ("name", "epoch", "floor", "request", "held", "probe_at", "probe_wait_s",
                 "retry_at", "retry_wait_s", "started")

    def __init__(self, name: str, floor: int):
        self.name = name
        self.epoch = 0
        self.floor = floor
        self.request = None  # id of the fetch in flight
        self.held: list = []  # live messages that arrived while fetching
        self.probe_at = 0.0
        self.probe_wait_s = 0.0
        self.retry_at = None
        self.retry_wait_s = 0.0
        self.started = False


class SubscriberCore:
    """The native subscriber's state machine (rules in the module docstring). No I/O.

    Feed it ``on_message(frames, now)`` (SUB), ``on_reply(frames, now)`` (DEALER)
    and ``tick(now)``; take ``outbox`` (request frames to send) and ``events``
    (``Message`` and ``Gap``, in order per channel). ``start(now)`` must follow the
    SUB subscriptions (subscribe, then fetch).
    """

    HELD_LIMIT = 10000

    def __init__(self, channels: dict, request_timeout_s: float = 5.0,
                 probe_interval_s: float = 1.0, probe_max_s: float = 30.0,
                 fill_limit: int = 1000, max_bytes: int = 64 * 1024 * 1024, rng=None):
        self.channels = {}
        for name, since in channels.items():
            try:
                check_channel(name)
            except InvalidName as exc:
                raise ValueError(f"{name!r}: {exc.reason}") from None
            if isinstance(since, bool) or not isinstance(since, int) or since < 0:
                raise ValueError(f"{name!r}: the sequence to resume from must be an int >= 0")
            self.channels[name] = _ChannelState(name, since)
        self.request_timeout_s = request_timeout_s
        self.probe_interval_s = probe_interval_s
        self.probe_max_s = probe_max_s
        self.fill_limit = fill_limit
        self.max_bytes = max_bytes
        self.rng = rng or random.Random()
        self.outbox: list = []
        self.events: deque = deque()
        self._pending: dict = {}  # request id -> (channel state, deadline, initial)
        self._ids = itertools.count(1)
        # What happened, for tests and monitoring.
        self.delivered = 0
        self.duplicates = 0
        self.gaps_detected = 0
        self.filled = 0
        self.lost = 0
        self.rejected_frames = 0

    def topics(self) -> list:
        return [frames.topic(name) for name in self.channels]

    def start(self, now: float) -> None:
        for state in self.channels.values():
            self._fetch(state, now, initial=True)

    # -- inputs -----------------------------------------------------------------

    def on_message(self, parts, now: float) -> None:
        try:
            message = frames.decode_message(parts, self.max_bytes)
        except frames.ProtocolError as exc:
            self.rejected_frames += 1
            log.warning("dropped a bad message frame: %s", exc)
            return
        state = self.channels.get(message.channel)
        if state is not None:
            self._live(state, message.seq, message.epoch, message.data, now)

    def on_reply(self, parts, now: float) -> None:
        try:
            if len(parts) != 1:
                raise frames.ProtocolError(f"a reply has 1 frame, not {len(parts)}")
            reply = frames.decode_reply(parts[0], self.max_bytes)
        except frames.ProtocolError as exc:
            self.rejected_frames += 1
            log.warning("dropped a bad reply: %s", exc)
            return
        entry = self._pending.pop(reply["id"], None)
        if entry is None:
            return  # late: its deadline passed and it was retried
        state, _, initial = entry
        state.request = None
        if not reply["ok"]:
            log.warning("fetch of %s failed: %s (%s)", state.name, reply["reason"],
                        reply["error"])
            self._retry_later(state, now)
            return
        state.retry_wait_s = 0.0
        self._apply_fetch(state, reply, now, initial)

    def tick(self, now: float) -> None:
        """Expire requests, send due retries and probes."""
        for request_id, (state, deadline, initial) in list(self._pending.items()):
            if now >= deadline:
                del self._pending[request_id]
                state.request = None
                log.warning("fetch of %s got no answer within %g s", state.name,
                            self.request_timeout_s)
                self._retry_later(state, now)
        for state in self.channels.values():
            if state.request is not None:
                continue
            if state.retry_at is not None:
                if now >= state.retry_at:
                    self._fetch(state, now, initial=not state.started)
            elif state.started and now >= state.probe_at:
                self._fetch(state, now, initial=False)

    def next_timeout_s(self, now: float) -> float:
        """Seconds until ``tick`` has something to do."""
        times = [deadline for _, deadline, _ in self._pending.values()]
        for state in self.channels.values():
            if state.request is None:
                times.append(state.retry_at if state.retry_at is not None else state.probe_at)
        return max(0.0, min(times) - now) if times else self.probe_max_s

    # -- rules ------------------------------------------------------------------

    def _live(self, state, seq: int, epoch: int, data: bytes, now: float) -> None:
        if state.request is not None or state.retry_at is not None:
            if len(state.held) >= self.HELD_LIMIT:
                state.held.pop(0)  # a hole here is found again as a gap and fetched
            state.held.append((epoch, seq, data))
            return
        if epoch < state.epoch:
            return
        if epoch > state.epoch:
            state.epoch, state.floor = epoch, 0
        if seq <= state.floor:
            self.duplicates += 1
            return
        if seq == state.floor + 1:
            self._deliver(state, seq, data, now)
            return
        self.gaps_detected += 1
        state.held.append((epoch, seq, data))
        self._fetch(state, now, initial=False)

    def _deliver(self, state, seq: int, data: bytes, now: float, fetched: bool = False) -> None:
        state.floor = seq
        self.delivered += 1
        if fetched:
            self.filled += 1
        state.probe_wait_s = self.probe_interval_s
        state.probe_at = now + self.probe_interval_s
        self.events.append(Message(state.name, seq, data, state.epoch))

    def _lose(self, state, first: int, last: int) -> None:
        self.lost += last - first + 1
        state.floor = last
        self.events.append(Gap(state.name, state.epoch, first, last))

    def _fetch(self, state, now: float, initial: bool) -> None:
        request_id = next(self._ids)
        state.retry_at = None
        state.request = request_id
        since = state.floor
        fields = {"id": request_id, "op": "fetch", "channel": state.name, "since": since,
                  "limit": self.fill_limit}
        if not initial or since > 0:
            fields["after"] = True  # every buffered message above since
        self._pending[request_id] = (state, now + self.request_timeout_s, initial)
        self.outbox.append([frames.encode_request(fields)])

    def _retry_later(self, state, now: float) -> None:
        state.retry_wait_s = min(max(0.1, state.retry_wait_s * 2), 5.0)
        state.retry_at = now + self.rng.uniform(0.5, 1.0) * state.retry_wait_s

    def _apply_fetch(self, state, reply, now: float, initial: bool) -> None:
        seq, epoch, messages = reply["seq"], reply["epoch"], reply["messages"]
        if initial:
            state.started = True
            state.epoch = epoch
            if state.floor == 0:  # a new subscriber: the newest message (§5), no history
                state.floor = messages[0][0] - 1 if messages else seq
            elif state.floor >= seq:  # caught up, or ahead of a channel that started over
                state.floor = seq
        elif epoch != state.epoch:
            if epoch > state.epoch and seq > 0:  # started over while we filled: from its start
                state.epoch, state.floor = epoch, 0
                self._fetch(state, now, initial=False)
                return
            epoch = state.epoch  # the channel is gone (seq 0); wait for live messages
            messages, seq = [], state.floor
        for message_seq, data in messages:
            if message_seq <= state.floor:
                continue
            if message_seq > state.floor + 1:
                self.gaps_detected += 1
                self._lose(state, state.floor + 1, message_seq - 1)
            self._deliver(state, message_seq, data, now, fetched=not initial)
        if state.floor < seq:
            if messages and len(messages) >= self.fill_limit:
                self._fetch(state, now, initial=False)  # more to page through
                return
            # Gone from the buffer, except what we hold from the live stream.
            last_lost = min([seq] + [held_seq - 1 for held_epoch, held_seq, _ in state.held
                                     if held_epoch == state.epoch and held_seq > state.floor])
            if last_lost > state.floor:
                self._lose(state, state.floor + 1, last_lost)
        if not messages and not initial:  # a probe that found nothing new
            state.probe_wait_s = min(max(state.probe_wait_s, self.probe_interval_s) * 2,
                                     self.probe_max_s)
            state.probe_at = now + state.probe_wait_s
        elif not messages:
            state.probe_wait_s = self.probe_interval_s
            state.probe_at = now + self.probe_interval_s
        held, state.held = sorted(state.held), []
        for index, (held_epoch, held_seq, data) in enumerate(held):
            self._live(state, held_seq, held_epoch, data, now)
            if state.request is not None:  # a new gap: keep the rest for after it
                state.held = held[index + 1:] + state.held
                state.held.sort()
                return


def subscriber_program(core: SubscriberCore, idle_timeout_s: Optional[float] = None,
                       clock=time.monotonic):
    """Drive ``core`` with ZeroMQ effects; emits its events (``Message`` and ``Gap``).

    Ends after ``idle_timeout_s`` without an event (never when it is None).
    """
    core.start(clock())
    last_event_at = clock()
    while True:
        if core.events:
            last_event_at = clock()
        while core.events:
            yield Emit(core.events.popleft())
        for parts in core.outbox:
            yield ZmqSend(parts)
        core.outbox.clear()
        now = clock()
        timeout_s = core.next_timeout_s(now)
        if idle_timeout_s is not None:
            idle_left_s = last_event_at + idle_timeout_s - now
            if idle_left_s <= 0:
                return
            timeout_s = min(timeout_s, idle_left_s)
        received = yield ZmqWait(timeout_s)
        now = clock()
        for kind, parts in received:
            if kind == "sub":
                core.on_message(parts, now)
            else:
                core.on_reply(parts, now)
        core.tick(now)


class _ZmqIo:
    """The two sockets of a native subscriber.

    Links (both connect to one edge)::

        SUB    -> native_pub     <- [channel + b"\\x00", message]
        DEALER -> native_router  -> [fetch request]   <- [reply]
    """

    BATCH = 1000

    def __init__(self, pub_endpoint: str, router_endpoint: str, topics, rcvhwm: int,
                 context=None):
        self._context = context or zmq.Context.instance()
        self.sub = self._context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, rcvhwm)
        self.dealer = self._context.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.sub.connect(pub_endpoint)
        self.dealer.connect(router_endpoint)
        for topic in topics:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)

    def drain(self) -> list:
        received = []
        for kind, sock in (("sub", self.sub), ("req", self.dealer)):
            for _ in range(self.BATCH):
                try:
                    received.append((kind, sock.recv_multipart(zmq.NOBLOCK)))
                except zmq.Again:
                    break
        return received

    def send(self, parts) -> None:
        try:
            self.dealer.send_multipart(parts, zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected yet: the request times out and is retried

    def readable(self) -> bool:
        return any(sock.getsockopt(zmq.EVENTS) & zmq.POLLIN for sock in (self.sub, self.dealer))

    def close(self) -> None:
        self.sub.close(linger=0)
        self.dealer.close(linger=0)


class _SyncZmqIo(_ZmqIo):
    def perform(self, effect):
        if isinstance(effect, ZmqSend):
            return self.send(effect.frames)
        received = self.drain()
        if not received and effect.timeout_s > 0:
            poller = zmq.Poller()
            poller.register(self.sub, zmq.POLLIN)
            poller.register(self.dealer, zmq.POLLIN)
            poller.poll(int(effect.timeout_s * 1000) + 1)
            received = self.drain()
        return received


class _AsyncZmqIo(_ZmqIo):
    async def perform(self, effect):
        if isinstance(effect, ZmqSend):
            return self.send(effect.frames)
        received = self.drain()
        if received or effect.timeout_s <= 0:
            return received
        loop = asyncio.get_running_loop()
        woken = loop.create_future()

        def wake():
            if not woken.done():
                woken.set_result(None)

        fds = [self.sub.FD, self.dealer.FD]
        for fd in fds:
            loop.add_reader(fd, wake)
        try:
            if not self.readable():  # the FD is edge-triggered: look before waiting
                await asyncio.wait([woken], timeout=effect.timeout_s)
        finally:
            for fd in fds:
                loop.remove_reader(fd)
        return self.drain()


class ZmqSubscriber:
    """Native subscriber of several channels with gap filling (module docstring).

    ``channels`` maps each channel to the sequence to resume after (0: the newest
    message, then everything live). Iterate it, sync or asyncio::

        with ZmqSubscriber(pub, router, {"/a": 0}) as sub:
            for event in sub:            # or: async for event in sub
                ...                       # Message(channel, seq, data, epoch) or Gap

    Each message is yielded once, in sequence order per channel; sequences that
    could not be fetched any more are reported by one ``Gap`` in their place. A
    subscriber instance is iterated once; iteration ends after ``idle_timeout_s``
    without an event (None: never). ``core`` has the counters.
    """

    def __init__(self, pub_endpoint: str, router_endpoint: str, channels: dict,
                 rcvhwm: int = 10000, idle_timeout_s: Optional[float] = None, context=None,
                 **core_options):
        self.idle_timeout_s = idle_timeout_s
        self.pub_endpoint = pub_endpoint
        self.router_endpoint = router_endpoint
        self.rcvhwm = rcvhwm
        self._context = context
        self.core = SubscriberCore(dict(channels), **core_options)
        self._io = None

    def _open(self, io_class):
        if self._io is not None:
            raise RuntimeError("a ZmqSubscriber is iterated once")
        self._io = io_class(self.pub_endpoint, self.router_endpoint, self.core.topics(),
                            self.rcvhwm, self._context)
        return self._io

    def __iter__(self):
        return iterate_sync(subscriber_program(self.core, self.idle_timeout_s),
                            self._open(_SyncZmqIo))

    def __aiter__(self):
        return iterate_async(subscriber_program(self.core, self.idle_timeout_s),
                             self._open(_AsyncZmqIo))

    def close(self) -> None:
        if self._io is not None:
            self._io.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()


# -- console scripts ------------------------------------------------------------

def _channel_url(parser, url: str):
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.path.startswith("/"):
        parser.error(f"{url!r} is not a channel URL like http://127.0.0.1:7474/chat")
    return f"{parts.scheme}://{parts.netloc}", parts.path


def publish_main(argv=None) -> int:
    """``firehose-publish URL [PAYLOAD]``: publish PAYLOAD (or stdin) and print its sequence."""
    parser = cli.command_parser("firehose-publish", "Publish a message to a firehose channel.",
                                config=False)
    parser.add_argument("url", help="channel URL, e.g. http://127.0.0.1:7474/chat")
    parser.add_argument("payload", nargs="?",
                        help="the message; default: all of stdin, without its final newline")
    parser.add_argument("--lines", action="store_true", help="publish each stdin line")
    parser.add_argument("--keep-newline", action="store_true",
                        help="publish stdin with its final newline (dropped by default)")
    parser.add_argument("--count", type=int, default=1, help="publish each message N times")
    parser.add_argument("--ttl", type=int, help="channel TTL in seconds")
    parser.add_argument("--buffer-size", type=int, help="messages kept for late subscribers")
    parser.add_argument("--persist", action="store_true", help="never expire the channel")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    started = cli.start(parser, argv)
    if started.exit_code is not None:
        return started.exit_code
    args = started.args
    base, channel = _channel_url(parser, args.url)
    if args.count < 1:
        parser.error("--count must be at least 1")
    if args.payload is not None:
        payloads = [args.payload.encode("utf-8")]
    elif args.lines:
        payloads = [line.rstrip(b"\r\n") for line in sys.stdin.buffer]
    else:
        payload = sys.stdin.buffer.read()
        if not args.keep_newline:
            # `echo hi | firehose-publish URL` publishes "hi", as the argument form would.
            payload = payload[:-2] if payload.endswith(b"\r\n") else payload.removesuffix(b"\n")
        payloads = [payload]
    with Producer(base, timeout_s=args.timeout) as producer:
        try:
            for payload in payloads:
                for _ in range(args.count):
                    print(producer.publish(channel, payload, ttl_s=args.ttl,
                                           buffer_size=args.buffer_size, persist=args.persist),
                          flush=True)
        except (ClientError, ValueError) as exc:
            print(f"firehose-publish: {exc}", file=sys.stderr)
            return 1
    return 0


def consume_main(argv=None) -> int:
    """``firehose-consume URL``: long-poll a channel and print one message per line."""
    parser = cli.command_parser("firehose-consume", "Print the messages of a firehose channel.",
                                config=False)
    parser.add_argument("url", help="channel URL, e.g. http://127.0.0.1:7474/chat")
    parser.add_argument("--since", type=int, default=0,
                        help="resume after this sequence (0: the newest message, then live)")
    parser.add_argument("--count", type=int, help="stop after N messages")
    parser.add_argument("--json", action="store_true",
                        help='print frames {"message":...,"last_sequence":N} instead of payloads')
    parser.add_argument("--max-errors", type=int, help="give up after N errors in a row")
    started = cli.start(parser, argv)
    if started.exit_code is not None:
        return started.exit_code
    args = started.args
    _channel_url(parser, args.url)
    if args.since < 0 or (args.count is not None and args.count < 1):
        parser.error("--since must be >= 0 and --count >= 1")
    consumer = Consumer(args.url, since=args.since, max_errors=args.max_errors)
    received = 0
    try:
        for message in consumer:
            if args.json:
                line = json.dumps({"message": message.data, "last_sequence": message.seq},
                                  separators=(",", ":"))
            else:
                line = message.data
            print(line, flush=True)
            received += 1
            if args.count is not None and received >= args.count:
                break
    except ClientError as exc:
        print(f"firehose-consume: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
