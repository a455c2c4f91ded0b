"""Channel names (docs/protocol.md §1): the one rule every entry point applies.

The HTTP edge, the native ZeroMQ endpoints, the worker and the clients all call
``check_channel``; a name one of them refuses, every one of them refuses.
Nothing here does I/O or knows a transport.
"""

import re

MAX_CHANNEL_BYTES = 1024
RESERVED_MARK = "@firehose"

_FORBIDDEN_NAME_BYTES = re.compile(rb"[\x00-\x1f\x7f!,]")


class InvalidName(ValueError):
    """A channel name that is refused; ``reason`` is one line for the client."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def validate_channel_bytes(raw: bytes) -> str:
    """The channel name of ``raw`` bytes (a request path, undecoded); raises InvalidName."""
    if not raw.startswith(b"/"):
        raise InvalidName("Channel names must start with '/'")
    if len(raw) > MAX_CHANNEL_BYTES:
        raise InvalidName(f"Channel name is longer than {MAX_CHANNEL_BYTES} bytes")
    bad = _FORBIDDEN_NAME_BYTES.search(raw)
    if bad:
        raise InvalidName(f"Channel names may not contain {bad.group().decode('latin-1')!r}"
                          " (control characters, '!' and ',' are not allowed)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidName("Channel name is not valid UTF-8") from None


def validate_channel(name: str) -> str:
    """Validate a decoded channel name (from a query, a JSON body or a ZeroMQ frame)."""
    return validate_channel_bytes(name.encode("utf-8", "surrogateescape"))


def is_reserved(channel: str) -> bool:
    """True for the names the server keeps for itself (``/channels@firehose`` ...)."""
    return RESERVED_MARK in channel


def check_channel(name: str) -> str:
    """A name a message may be published to or subscribed on: valid and not reserved."""
    channel = validate_channel(name)
    if is_reserved(channel):
        raise InvalidName("Channel names containing @firehose are reserved")
    return channel
