"""The server side of RFC 6455 WebSocket framing, sans-I/O.

Nothing here touches a socket, an event loop or Tornado: the connection that
owns the transport hands this module bytes and headers, and writes the bytes it
gets back. The Firehose protocol on top (docs/protocol.md §6) lives in
``events``.

Opening handshake
-----------------
``handshake(method, headers) -> bytes``
    Validates an opening handshake (``headers``: a mapping with lower-case
    names) and returns its ``Sec-WebSocket-Accept`` value, or raises
    ``HandshakeError``: 400 for a request that is not a valid upgrade, 426 for
    a ``Sec-WebSocket-Version`` other than 13. The error's ``headers`` are the
    ``(name, value)`` pairs the answer must carry.
``response_head(accept) -> bytes``
    The whole ``101 Switching Protocols`` head. No extension and no subprotocol
    is ever accepted (a browser's ``permessage-deflate`` offer goes unanswered,
    which RFC 6455 allows), so every frame is plain.

Server frames (unmasked, FIN set, never fragmented)
---------------------------------------------------
``encode_text(payload)``, ``encode_ping(payload=b"")``,
``encode_pong(payload)``, ``encode_close(code=1000, reason="")`` and
``close_reply(close)`` (the answer to a client's ``Close``: its code echoed).
``encode_text`` runs once per published message and its bytes are shared by
every socket, so it is a table look-up and one concatenation.

Client frames
-------------
``FrameReader(max_message_bytes).feed(data) -> list`` of events, in order:

    ==========================  ===============================================
    event                       the connection ...
    ==========================  ===============================================
    ``Text(text)``              handles a whole message (fragments joined,
                                UTF-8 checked)
    ``Binary(data)``            handles (or ignores) a whole binary message
    ``Ping(payload)``           writes ``encode_pong(payload)``
    ``Pong(payload)``           notes that the peer is alive
    ``Close(code, reason)``     writes ``close_reply(close)`` (unless it sent a
                                close first) and closes the transport
    ``ProtocolError(code,       writes ``encode_close(code, reason)`` and closes
    reason)``                   the transport
    ==========================  ===============================================

``Close`` and ``ProtocolError`` are always the last event: the reader ignores
every byte after them. A protocol error is an event rather than an exception so
that the frames before it in the same chunk still take effect, in order.

Protocol errors (the close code the server sends):

    ========================================================  ====
    a client frame without the mask bit                       1002
    a reserved bit set (no extension is ever negotiated)       1002
    an unknown opcode                                          1002
    a control frame over 125 bytes or without FIN              1002
    a continuation with no message started                     1002
    a text or binary frame inside a fragmented message         1002
    a 64-bit length with its most significant bit set          1002
    a close payload of 1 byte, a code that may not be sent,    1002
    or a reason that is not UTF-8
    a text message that is not UTF-8 (checked when whole)      1007
    a message over ``max_message_bytes`` (checked on each      1009
    frame's declared length, before its payload is buffered;
    each continuation frame counts ``FRAGMENT_COST_BYTES`` more)
    ========================================================  ====

Helpers: ``unmask(mask, payload)`` (RFC 6455 §5.3), ``may_send_close_code(code)``.

Closing handshake: whoever closes first sends a close frame and waits (bounded)
for the other's; the server then closes the TCP connection (RFC 6455 §7.1.1).
"""

import base64
import binascii
import hashlib
import struct
from typing import Mapping, NamedTuple, Tuple

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_CONTROL_PAYLOAD_BYTES = 125

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005  # reported for a close frame without a code; never sent
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009

# Each continuation frame counts this much beyond its payload toward the message
# limit, so that a flood of empty fragments is bounded like a long message.
FRAGMENT_COST_BYTES = 16

_FIN = 0x80
_RSV = 0x70
_MASK = 0x80
_LENGTH_16 = 126
_LENGTH_64 = 127


def may_send_close_code(code: int) -> bool:
    """True for the codes a close frame may carry (RFC 6455 §7.4, IANA registry)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


# -- Opening handshake ------------------------------------------------------------

class HandshakeError(ValueError):
    """An upgrade that is refused: ``status``, a one-line ``reason`` and the
    ``headers`` (``(name, value)`` pairs) the answer must carry."""

    def __init__(self, status: int, reason: str, headers: Tuple[Tuple[str, str], ...] = ()):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers


# RFC 7231 §6.5.15: a 426 names the protocol to upgrade to; RFC 6455 §4.4: and
# the versions the server speaks.
_VERSION_ADVICE = (("Upgrade", "websocket"), ("Connection", "Upgrade"),
                   ("Sec-WebSocket-Version", "13"))


def _tokens(value: str) -> set:
    return {token.strip().lower() for token in value.split(",")}


def handshake(method: str, headers: Mapping[str, str]) -> bytes:
    """The ``Sec-WebSocket-Accept`` value for a valid opening handshake.

    ``headers`` has lower-case names. Raises ``HandshakeError``.
    """
    if method != "GET":
        raise HandshakeError(400, f"A WebSocket upgrade must be a GET, not {method}")
    if "websocket" not in _tokens(headers.get("upgrade", "")):
        raise HandshakeError(400, "A WebSocket upgrade needs 'Upgrade: websocket'")
    if "upgrade" not in _tokens(headers.get("connection", "")):
        raise HandshakeError(400, "A WebSocket upgrade needs 'Connection: Upgrade'")
    if headers.get("sec-websocket-version", "").strip() != "13":
        raise HandshakeError(426, "Only WebSocket version 13 is supported", _VERSION_ADVICE)
    key = headers.get("sec-websocket-key", "").strip()
    try:
        nonce = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        nonce = b""
    if len(nonce) != 16:
        raise HandshakeError(400, "Sec-WebSocket-Key must be 16 bytes in base64")
    digest = hashlib.sha1(key.encode("ascii") + WEBSOCKET_GUID).digest()
    return base64.b64encode(digest)


def response_head(accept: bytes) -> bytes:
    """The ``101 Switching Protocols`` head, blank line included."""
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")


# -- Server frames ------------------------------------------------------------------

# encode_text at 60 bytes, CPython 3.11 (timeit, the call included): a table of
# 2-byte heads + concat 98 ns; bytes((0x81, n)) + concat 138 ns; int.to_bytes
# head 110 ns. Longer heads are one struct.pack.
_TEXT_HEADS = tuple(bytes((_FIN | OP_TEXT, n)) for n in range(_LENGTH_16))
_HEAD_16 = struct.Struct("!BBH").pack
_HEAD_64 = struct.Struct("!BBQ").pack


def encode_text(payload: bytes) -> bytes:
    """One text frame carrying ``payload`` (UTF-8 the caller vouches for)."""
    n = len(payload)
    if n < _LENGTH_16:
        return _TEXT_HEADS[n] + payload
    if n < 65536:
        return _HEAD_16(_FIN | OP_TEXT, _LENGTH_16, n) + payload
    return _HEAD_64(_FIN | OP_TEXT, _LENGTH_64, n) + payload


def _encode_control(opcode: int, payload: bytes) -> bytes:
    if len(payload) > MAX_CONTROL_PAYLOAD_BYTES:
        raise ValueError(f"a control frame carries at most {MAX_CONTROL_PAYLOAD_BYTES} bytes")
    return bytes((_FIN | opcode, len(payload))) + payload


def encode_ping(payload: bytes = b"") -> bytes:
    return _encode_control(OP_PING, payload)


def encode_pong(payload: bytes) -> bytes:
    """The answer to ``Ping(payload)``."""
    return _encode_control(OP_PONG, payload)


def encode_close(code: int = CLOSE_NORMAL, reason: str = "") -> bytes:
    """A close frame; a reason over 123 UTF-8 bytes is cut at a character boundary."""
    if not may_send_close_code(code):
        raise ValueError(f"{code} may not be sent in a close frame")
    room = MAX_CONTROL_PAYLOAD_BYTES - 2
    reason_bytes = reason.encode("utf-8")[:room].decode("utf-8", "ignore").encode("utf-8")
    return _encode_control(OP_CLOSE, code.to_bytes(2, "big") + reason_bytes)


def close_reply(close: "Close") -> bytes:
    """The close frame answering a client's ``Close``: its code, echoed (RFC 6455 §5.5.1)."""
    if close.code == CLOSE_NO_STATUS:
        return bytes((_FIN | OP_CLOSE, 0))
    return encode_close(close.code)


# -- Client frames ------------------------------------------------------------------

class Text(NamedTuple):
    text: str


class Binary(NamedTuple):
    data: bytes


class Ping(NamedTuple):
    payload: bytes


class Pong(NamedTuple):
    payload: bytes


class Close(NamedTuple):
    code: int  # CLOSE_NO_STATUS when the frame had none
    reason: str


class ProtocolError(NamedTuple):
    """The client broke RFC 6455: close with ``code`` and ``reason``."""
    code: int
    reason: str


# Unmasking, CPython 3.11 (timeit per call):
#   payload bytes            16      100     1000    70000
#   int.from_bytes XOR     0.25 µs  0.40 µs  1.7 µs  158 µs
#   4 strided translates   0.85 µs  0.95 µs  2.3 µs   73 µs
#   map(xor, cycle(mask))  0.55 µs  1.9 µs   16 µs  1157 µs
#   bytearray loop         0.98 µs  4.5 µs   45 µs  3301 µs
# The XOR of two big ints wins up to a few KB (client frames are small JSON);
# above that, translating every fourth byte through a 256-byte table does.
_TRANSLATE_FROM_BYTES = 4096
_XOR_TABLES = tuple(bytes(byte ^ key for byte in range(256)) for key in range(256))


def unmask(mask: bytes, payload) -> bytes:
    """``payload`` XOR the 4-byte ``mask`` repeated (RFC 6455 §5.3)."""
    n = len(payload)
    if n < _TRANSLATE_FROM_BYTES:
        key = int.from_bytes((mask * ((n + 3) >> 2))[:n], "little")
        return (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little")
    out = bytearray(payload)
    for i in range(4):
        out[i::4] = payload[i::4].translate(_XOR_TABLES[mask[i]])
    return bytes(out)


class FrameReader:
    """Client frames in, events out; see the module docstring for the events."""

    def __init__(self, max_message_bytes: int = 1024 * 1024):
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray()  # the start of a frame not yet whole
        self._wanted_bytes = 2  # the buffer length worth parsing again
        self._fragments: list = []  # payloads of the unfinished message
        self._fragments_opcode = None  # its opcode; None between messages
        self._fragments_bytes = 0
        self._done = False  # after Close or ProtocolError

    def feed(self, data: bytes) -> list:
        """The events completed by ``data`` (bytes or bytearray), in order.

        Returns [] once a ``Close`` or ``ProtocolError`` has been returned.
        """
        if self._done:
            return []
        if self._buffer:
            self._buffer += data
            if len(self._buffer) < self._wanted_bytes:
                return []
            data = self._buffer
            self._buffer = bytearray()
        events: list = []
        end = len(data)
        pos = 0
        while end - pos >= 2:
            head0 = data[pos]
            head1 = data[pos + 1]
            opcode = head0 & 0x0F
            length = head1 & 0x7F
            if length < _LENGTH_16:
                start = pos + 6
            elif length == _LENGTH_16:
                start = pos + 8
                if end < start:
                    self._wanted_bytes = start - pos
                    break
                length = int.from_bytes(data[pos + 2:pos + 4], "big")
            else:
                start = pos + 14
                if end < start:
                    self._wanted_bytes = start - pos
                    break
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
            fault = self._check_head(head0, head1, opcode, length)
            if fault is not None:
                return self._fail(events, fault)
            stop = start + length
            if end < stop:
                self._wanted_bytes = stop - pos
                break
            payload = unmask(data[start - 4:start], data[start:stop]) if length else b""
            pos = stop
            if opcode == OP_TEXT or opcode == OP_BINARY:
                if head0 & _FIN:
                    event = self._message(opcode, payload)
                else:
                    self._fragments_opcode = opcode
                    self._fragments = [payload]
                    self._fragments_bytes = length
                    continue
            elif opcode == OP_CONTINUATION:
                self._fragments.append(payload)
                self._fragments_bytes += length + FRAGMENT_COST_BYTES
                if not head0 & _FIN:
                    continue
                event = self._message(self._fragments_opcode, b"".join(self._fragments))
                self._fragments_opcode = None
                self._fragments = []
                self._fragments_bytes = 0
            elif opcode == OP_PING:
                event = Ping(payload)
            elif opcode == OP_PONG:
                event = Pong(payload)
            else:
                event = _close_event(payload)
            if type(event) is ProtocolError:
                return self._fail(events, event)
            events.append(event)
            if type(event) is Close:
                self._done = True
                return events
        else:
            self._wanted_bytes = 2
        if pos < end:
            self._buffer = data[pos:] if pos else data
            if type(self._buffer) is not bytearray:
                self._buffer = bytearray(self._buffer)
        return events

    def _check_head(self, head0: int, head1: int, opcode: int, length: int):
        """The ``ProtocolError`` a frame's head shows, or None."""
        if not head1 & _MASK:
            return ProtocolError(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
        if head0 & _RSV:
            return ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set without an extension")
        if opcode >= OP_CLOSE:
            if opcode > OP_PONG:
                return ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
            if length > MAX_CONTROL_PAYLOAD_BYTES:
                return ProtocolError(CLOSE_PROTOCOL_ERROR, "a control frame over 125 bytes")
            if not head0 & _FIN:
                return ProtocolError(CLOSE_PROTOCOL_ERROR, "a fragmented control frame")
            return None
        if opcode == OP_CONTINUATION:
            if self._fragments_opcode is None:
                return ProtocolError(CLOSE_PROTOCOL_ERROR, "a continuation frame with no message")
        elif opcode > OP_BINARY:
            return ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        elif self._fragments_opcode is not None:
            return ProtocolError(CLOSE_PROTOCOL_ERROR, "a new message inside a fragmented one")
        if length >> 63:
            return ProtocolError(CLOSE_PROTOCOL_ERROR, "a 64-bit length with the high bit set")
        if self._fragments_bytes + length > self.max_message_bytes:
            return ProtocolError(CLOSE_TOO_BIG,
                                 f"a message over {self.max_message_bytes} bytes")
        return None

    @staticmethod
    def _message(opcode: int, payload: bytes):
        if opcode == OP_BINARY:
            return Binary(payload)
        try:
            return Text(payload.decode("utf-8"))
        except UnicodeDecodeError:
            return ProtocolError(CLOSE_INVALID_DATA, "a text message that is not UTF-8")

    def _fail(self, events: list, error: ProtocolError) -> list:
        self._done = True
        self._buffer = bytearray()
        self._fragments = []
        events.append(error)
        return events


def _close_event(payload: bytes):
    """A client's close frame as a ``Close``, or the ``ProtocolError`` it is."""
    if not payload:
        return Close(CLOSE_NO_STATUS, "")
    if len(payload) == 1:
        return ProtocolError(CLOSE_PROTOCOL_ERROR, "a close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not may_send_close_code(code):
        return ProtocolError(CLOSE_PROTOCOL_ERROR, f"a close frame with code {code}")
    try:
        return Close(code, payload[2:].decode("utf-8"))
    except UnicodeDecodeError:
        return ProtocolError(CLOSE_PROTOCOL_ERROR, "a close reason that is not UTF-8")
