"""The HTTP side of the contract (PROTOCOL.md §1-5), as pure functions.

Parsing raises ``HttpError`` with the status and the one-line reason the client
gets; formatting returns the exact response bytes. Nothing here does I/O.
"""

import json
import re
from typing import NamedTuple, Optional

from . import names

MAX_SEQUENCE = 2**63 - 1
_MAX_DIGITS = len(str(MAX_SEQUENCE))  # a longer number is past every limit here
NEGATIVE_SEQUENCE_REASON = "The last_message_sequence parameter may not be less than zero"

_INTEGER = re.compile(r"[-+]?[0-9]+")


def digits_value(digits: str, past: int) -> int:
    """The value of a string of ASCII digits, or ``past`` when it has more significant
    digits than any bound here (``int()`` of thousands of digits fails)."""
    return past if len(digits.lstrip("0")) > _MAX_DIGITS else int(digits)


class HttpError(Exception):
    """An HTTP error answer: ``status`` and a one-line ``reason``."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class PublishOptions(NamedTuple):
    ttl_s: Optional[int]  # None: persist, no expiry
    buffer_size: int


class Subscription(NamedTuple):
    channel: str
    last_sequence: int
    params: dict


def channel_from_path(raw_path: str) -> str:
    """Validate a raw request path (as Tornado gives it: latin-1) as a channel name."""
    return _named(names.validate_channel_bytes, raw_path.encode("latin-1", "replace"))


def validate_channel(name: str) -> str:
    """Validate a decoded channel name (from a query or JSON body); raises HttpError 400."""
    return _named(names.validate_channel, name)


def _named(check, value) -> str:
    try:
        return check(value)
    except names.InvalidName as exc:
        raise HttpError(400, exc.reason) from None


is_reserved = names.is_reserved


def parse_sequence(value, what: str = "last_message_sequence") -> int:
    """A client's last sequence: missing or empty is 0, negative or junk is a 400."""
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise HttpError(400, f"The {what} parameter must be an integer")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        text = value.strip()
        if len(text.lstrip("+-").lstrip("0")) > _MAX_DIGITS:
            # Past one bound or the other; int() of thousands of digits would fail.
            number = -1 if text.startswith("-") else MAX_SEQUENCE + 1
        else:
            number = int(text)
    else:
        raise HttpError(400, f"The {what} parameter must be an integer")
    if number < 0:
        raise HttpError(400, NEGATIVE_SEQUENCE_REASON.replace("last_message_sequence", what))
    if number > MAX_SEQUENCE:
        raise HttpError(400, f"The {what} parameter is too large")
    return number


def _ttl_value(text: str, source: str) -> int:
    text = text.strip().strip('"')
    if not text.isascii() or not text.isdigit():
        raise HttpError(400, f"{source} must be a non-negative integer number of seconds")
    return min(digits_value(text, MAX_SEQUENCE), MAX_SEQUENCE)


def parse_publish_headers(headers, default_ttl_s: int, default_buffer_size: int,
                          max_buffer_size: int) -> PublishOptions:
    """TTL, persistence and buffer size of a publish, from its request headers."""
    ttl_s = default_ttl_s
    cache_control = headers.get("Cache-Control")
    if cache_control:
        for directive in cache_control.split(","):
            name, _, value = directive.partition("=")
            if name.strip().lower() == "max-age":
                ttl_s = _ttl_value(value, "Cache-Control max-age")
    explicit_ttl = headers.get("X-Firehose-TTL")
    if explicit_ttl is not None:
        ttl_s = _ttl_value(explicit_ttl, "X-Firehose-TTL")

    persist = headers.get("X-Firehose-Persist")
    if persist is not None:
        flag = persist.strip().lower()
        if flag not in ("true", "false"):
            raise HttpError(400, "X-Firehose-Persist must be true or false")
        if flag == "true":
            ttl_s = None

    buffer_size = default_buffer_size
    size = headers.get("X-Firehose-Buffer-Size")
    if size is not None:
        size = size.strip()
        if (not size.isascii() or not size.isdigit()
                or digits_value(size, max_buffer_size + 1) > max_buffer_size):
            raise HttpError(400, "X-Firehose-Buffer-Size must be an integer from 0 to "
                                 f"{max_buffer_size}")
        buffer_size = int(size)
    return PublishOptions(ttl_s, buffer_size)


def _subscription_failed(reason: str) -> HttpError:
    return HttpError(400, reason)


def _checked_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise _subscription_failed("channel names must be non-empty strings")
    try:
        channel = validate_channel(name)
    except HttpError as exc:
        raise _subscription_failed(f"{name!r}: {exc.reason}") from None
    if is_reserved(channel):
        raise _subscription_failed(f"{name!r}: channel names containing @firehose are reserved")
    return channel


def subscription_channel(name) -> str:
    """A channel name from a subscription (query, JSON body, WebSocket frame); raises HttpError."""
    return _checked_name(name)


def _add(subscriptions: dict, channel: str, seq: int, params: dict) -> None:
    subscriptions.setdefault(channel, Subscription(channel, seq, params))


def parse_subscribe_query(value: Optional[str]) -> list:
    """``/a!3,/b!0,/c`` (already percent-decoded) -> subscriptions; raises HttpError."""
    if not value:
        raise _subscription_failed("no channels to subscribe to")
    subscriptions: dict = {}
    for entry in value.split(","):
        name, bang, seq_text = entry.partition("!")
        channel = _checked_name(name)
        if "!" in seq_text:
            raise _subscription_failed(f"{entry!r}: more than one '!'")
        try:
            seq = parse_sequence(seq_text if bang else None)
        except HttpError as exc:
            raise _subscription_failed(f"{entry!r}: {exc.reason}") from None
        _add(subscriptions, channel, seq, {})
    return list(subscriptions.values())


def subscription_from_value(channel: str, spec) -> Subscription:
    """One channel's entry of a JSON subscription: a sequence or an object."""
    params: dict = {}
    if isinstance(spec, dict):
        unknown = set(spec) - {"last_message_sequence", "message_sequence", "params"}
        if unknown:
            raise _subscription_failed(f"{channel!r}: unknown keys {sorted(unknown)}")
        params = spec.get("params") or {}
        if not isinstance(params, dict):
            raise _subscription_failed(f"{channel!r}: params must be an object")
        spec = spec.get("last_message_sequence", spec.get("message_sequence"))
    if spec is not None and not isinstance(spec, (int, str)):
        raise _subscription_failed(f"{channel!r}: the sequence must be an integer")
    try:
        seq = parse_sequence(spec)
    except HttpError as exc:
        raise _subscription_failed(f"{channel!r}: {exc.reason}") from None
    return Subscription(channel, seq, params)


def parse_subscribe_body(body: bytes) -> list:
    """A JSON object ``{"/a": 3, "/b": {"last_message_sequence": 1}}`` -> subscriptions."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _subscription_failed("the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise _subscription_failed("the body must be a JSON object of channel: sequence")
    if not document:
        raise _subscription_failed("no channels to subscribe to")
    subscriptions: dict = {}
    for name, spec in document.items():
        channel = _checked_name(name)
        sub = subscription_from_value(channel, spec)
        _add(subscriptions, channel, sub.last_sequence, sub.params)
    return list(subscriptions.values())


def payload_text(data: bytes) -> str:
    """A payload as the JSON transports carry it: invalid UTF-8 becomes U+FFFD."""
    return data.decode("utf-8", "replace")


def message_json(data: bytes, seq: int, channel: Optional[str] = None) -> bytes:
    """``{"message":...,"last_sequence":N}`` (with ``"channel"`` first when multiplexed)."""
    message = json.dumps(payload_text(data), ensure_ascii=False)
    if channel is None:
        text = f'{{"message":{message},"last_sequence":{seq}}}'
    else:
        name = json.dumps(channel, ensure_ascii=False)
        text = f'{{"channel":{name},"message":{message},"last_sequence":{seq}}}'
    return text.encode("utf-8")


def subscription_failed_json(reason: str) -> bytes:
    return json.dumps({"error": "Subscription failed", "reason": reason},
                      separators=(",", ":")).encode()
