"""The stream transports' side of the contract (docs/protocol.md §6-7), as pure functions.

WebSocket: every client frame is classified by ``parse_channel_frame`` (a socket
on one channel) or ``parse_multiplex_frame`` (``/channels@firehose``) into one of

    =================  ==========================================================
    result             what the socket does
    =================  ==========================================================
    ``PING``           answers ``{"pong":"PONG"}`` after every earlier frame took
                       effect
    ``Subscribe``      subscribes (a repeated channel on one socket is ignored)
    ``Unsubscribe``    drops those channels (unknown ones are ignored)
    ``Rejected``       a subscribe frame that cannot be honoured: answered with
                       ``{"error":"Subscription failed","reason":...}``, counted
    ``Ignored``        anything else (not JSON, not an object, unknown keys or
                       values): no answer, counted, the socket stays open
    =================  ==========================================================

Server-Sent Events: ``channel_event`` and ``multiplex_event`` build the exact
bytes of one event; their ids are read back by ``http.Rules`` (a browser's ``Last-Event-ID``). A multiplexed stream's event id is the
position of every channel of the stream, in the ``?subscribe=`` syntax with
percent-encoded names (``/a!3,/b!0``), so a reconnecting browser resumes every
channel where it was.

Nothing here does I/O; errors are ``http.HttpError``.
"""

import json
import re
from typing import NamedTuple
from urllib.parse import quote

from . import http
from .http import HttpError, Subscription

PONG_FRAME = b'{"pong":"PONG"}'
KEEPALIVE_COMMENT = b": keep-alive\n\n"

_SUBSCRIBE_KEYS = frozenset(("last_message_sequence", "message_sequence", "params"))
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class _Ping:
    __slots__ = ()

    def __repr__(self) -> str:
        return "PING"


PING = _Ping()


class Subscribe(NamedTuple):
    subscriptions: tuple  # of http.Subscription, channels unique, in frame order


class Unsubscribe(NamedTuple):
    channels: tuple


class Rejected(NamedTuple):
    reason: str


class Ignored(NamedTuple):
    reason: str


def _load_object(text, max_depth: int):
    """The frame as a dict, or an ``Ignored``."""
    try:
        frame = http.load_json(text, max_depth)
    except HttpError as exc:
        return Ignored(exc.reason)
    if not isinstance(frame, dict):
        return Ignored("the frame is not a JSON object")
    return frame


def _ping(frame: dict):
    return PING if frame["ping"] == "PING" else Ignored('"ping" must be "PING"')


def parse_channel_frame(text, channel: str, url_params: dict, max_depth: int):
    """Classify one client frame of a WebSocket on ``channel``.

    A subscribe frame holds ``last_message_sequence`` or ``message_sequence``
    and/or ``params``; its params are added to ``url_params`` (the frame wins).
    """
    frame = _load_object(text, max_depth)
    if not isinstance(frame, dict):
        return frame
    if "ping" in frame:
        return _ping(frame)
    if not _SUBSCRIBE_KEYS.intersection(frame):
        return Ignored("the frame is neither a ping nor a subscription")
    try:
        sub = http.subscription_from_value(channel, frame)
    except HttpError as exc:
        return Rejected(exc.reason)
    return Subscribe((Subscription(channel, sub.last_sequence, {**url_params, **sub.params}),))


def _subscription_entry(entry) -> Subscription:
    if not isinstance(entry, dict):
        raise HttpError(400, "each multiplex_subscribe entry must be an object with a channel")
    if "channel" not in entry:
        raise HttpError(400, "a multiplex_subscribe entry has no channel")
    channel = http.subscribed_channel(entry["channel"])
    spec = {key: value for key, value in entry.items() if key != "channel"}
    return http.subscription_from_value(channel, spec)


def parse_multiplex_frame(text, max_channels: int, max_depth: int):
    """Classify one client frame of a WebSocket on ``/channels@firehose``."""
    frame = _load_object(text, max_depth)
    if not isinstance(frame, dict):
        return frame
    if "ping" in frame:
        return _ping(frame)
    if "multiplex_subscribe" in frame:
        if len(frame) > 1:
            return Rejected(f"unknown keys {sorted(set(frame) - {'multiplex_subscribe'})}")
        entries = frame["multiplex_subscribe"]
        if not isinstance(entries, list):
            entries = [entries]
        if not entries:
            return Rejected("no channels to subscribe to")
        if len(entries) > max_channels:
            return Rejected(f"a subscription may name at most {max_channels} channels")
        subscriptions: dict = {}
        try:
            for entry in entries:
                sub = _subscription_entry(entry)
                subscriptions.setdefault(sub.channel, sub)
        except HttpError as exc:
            return Rejected(exc.reason)
        return Subscribe(tuple(subscriptions.values()))
    if "multiplex_unsubscribe" in frame:
        names = frame["multiplex_unsubscribe"]
        if isinstance(names, str):
            names = [names]
        if len(frame) > 1 or not isinstance(names, list) or \
                not all(isinstance(name, str) for name in names):
            return Ignored("multiplex_unsubscribe takes a channel name or a list of them")
        return Unsubscribe(tuple(dict.fromkeys(names)))
    return Ignored("the frame is neither a ping nor a (un)subscription")


def subscription_failed_frame(reason: str, channel=None) -> bytes:
    """``{"error":"Subscription failed","reason":...}`` (plus ``"channel"`` when known)."""
    if channel is None:
        return http.subscription_failed_json(reason)
    return json.dumps({"error": "Subscription failed", "channel": channel, "reason": reason},
                      separators=(",", ":"), ensure_ascii=False).encode()


# -- Server-Sent Events ----------------------------------------------------------

def _data_lines(text: str) -> str:
    return "".join(f"data: {line}\n" for line in _LINE_BREAK.split(text))


def channel_event(seq: int, data: bytes) -> bytes:
    """One event of a single-channel stream: ``id: <seq>`` and the payload's lines."""
    return f"id: {seq}\n{_data_lines(http.payload_text(data))}\n".encode("utf-8")


def multiplex_event_id(positions: dict) -> str:
    """Every channel's last sequence, ``/a!3,/b!0``, names percent-encoded."""
    return ",".join(f"{quote(channel, safe='/')}!{seq}" for channel, seq in positions.items())


def multiplex_event(event_id: str, message_json: bytes) -> bytes:
    """One event of a multiplexed stream; its data is the long-poll multiplexed JSON."""
    return b"id: " + event_id.encode("ascii") + b"\ndata: " + message_json + b"\n\n"


def retry_field(retry_ms: int) -> bytes:
    return f"retry: {retry_ms}\n\n".encode()
