"""The edge's HTTP rules (RFC 9112 and docs/protocol.md §1-5), in one place, without I/O.

Theory of operation
-------------------
Every request the edge serves, on its fast connections or through Tornado's
handlers, goes through this module twice:

1. **The head.** ``parse_head(raw)`` reads a request head off the wire (the fast
   path); ``head_from_fields(...)`` takes one Tornado already split. Both end in
   the same checks (``_check_framing``): one valid ``Host``, a ``Content-Length``
   of digits (repeats must agree), no ``Transfer-Encoding`` beside it and none but
   ``chunked``. A head that fails is an ``HttpError`` (400, or 431/505), and the
   connection closes after the answer.
2. **The decision.** ``Rules.decide(head)`` says what the request asks for: one
   of the action types below, or an ``HttpError`` with the status and one-line
   reason the client gets (channel names, sequences, publish headers, methods,
   reserved paths, upgrades, event streams, CORS). A POST to
   ``/channels@firehose`` needs its body first: ``ReadBody``, then
   ``Rules.decide_body``.

=================  ==========================================================
action             the connection ...
=================  ==========================================================
``Poll``           waits for one message (``Edge.poll``), answers ``poll_answer``
``Publish``        reads the body, publishes, answers ``published_answer``
``Delete``         deletes the channel, answers 204
``Health``         answers 200 or 503 for the owner of the channel
``Stream``         becomes an event stream
``Upgrade``        becomes a WebSocket (``upgrade_answer`` is its 101 head)
``Metrics``        answers the JSON time buckets
``ReadBody``       reads the body (at most ``limit`` bytes), asks ``decide_body``
``Answer``         answers at once (a CORS preflight)
``Authorize``      asks the authorization callout, then runs its ``action``
=================  ==========================================================

Answers are bytes built here (``Reply.render`` and the helpers around it):
status line, ``Content-Type``, ``Content-Length``, CORS, ``Vary`` and
``Connection``. A refused subscription (a GET that would wait for messages) is
answered ``{"error":"Subscription failed","reason":...}`` in JSON, which the
Firehose JavaScript client parses; a refused publish, in one line of plain text.
"""

import json
import re
from typing import NamedTuple, Optional
from urllib.parse import unquote_plus

from ..auth.tokens import AuthError
from . import names, websocket

MAX_SEQUENCE = 2**63 - 1
_MAX_DIGITS = len(str(MAX_SEQUENCE))  # a longer number is past every limit here
NEGATIVE_SEQUENCE_REASON = "The last_message_sequence parameter may not be less than zero"
MULTIPLEX_PATH = "/channels@firehose"
METRICS_PATH = "/metrics@firehose"
EVENT_STREAM_TYPE = "text/event-stream"
JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain; charset=utf-8"

_INTEGER = re.compile(r"[-+]?[0-9]+")
# RFC 9110 §5.6.2 and RFC 9112 §3: tokens, field values, the request line.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rf"({_TOKEN}) ([\x21-\x7e\x80-\xff]+) (HTTP/[0-9]\.[0-9])")
_FIELD = re.compile(rf"({_TOKEN}):[ \t]*((?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?)[ \t]*")
# RFC 3986 host (reg-name, IPv4 or IP-literal) and optional port; no comma (two
# Host fields joined, or a smuggling attempt).
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+;=%]*)(?::[0-9]*)?")
_REASONS = {
    101: "Switching Protocols", 200: "OK", 202: "Accepted", 204: "No Content",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
    413: "Content Too Large", 415: "Unsupported Media Type", 417: "Expectation Failed",
    426: "Upgrade Required", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
    505: "HTTP Version Not Supported", 507: "Insufficient Storage",
}


def digits_value(digits: str, past: int) -> int:
    """The value of a string of ASCII digits, or ``past`` when it has more significant
    digits than any bound here (``int()`` of thousands of digits fails)."""
    return past if len(digits.lstrip("0")) > _MAX_DIGITS else int(digits)


class HttpError(Exception):
    """An HTTP error answer: ``status``, a one-line ``reason``, extra ``headers``
    (``(name, value)`` pairs), whether the body is a JSON "Subscription failed"
    (``subscriber``), and whether the connection must close after it (``close``)."""

    def __init__(self, status: int, reason: str, headers: tuple = (),
                 subscriber: bool = False, close: bool = False):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers
        self.subscriber = subscriber
        self.close = close
        self.bodiless = False  # the answer to a HEAD request: no body


class PublishOptions(NamedTuple):
    ttl_s: Optional[int]  # None: persist, no expiry
    buffer_size: int


class Subscription(NamedTuple):
    channel: str
    last_sequence: int
    params: dict


def channel_from_path(raw_path: str) -> str:
    """Validate a raw request path (latin-1 decoded, as heads are) as a channel name."""
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
    """TTL, persistence and buffer size of a publish, from its request headers
    (a mapping with lower-case names)."""
    ttl_s = default_ttl_s
    cache_control = headers.get("cache-control")
    if cache_control:
        for directive in cache_control.split(","):
            name, _, value = directive.partition("=")
            if name.strip().lower() == "max-age":
                ttl_s = _ttl_value(value, "Cache-Control max-age")
    explicit_ttl = headers.get("x-firehose-ttl")
    if explicit_ttl is not None:
        ttl_s = _ttl_value(explicit_ttl, "X-Firehose-TTL")

    persist = headers.get("x-firehose-persist")
    if persist is not None:
        flag = persist.strip().lower()
        if flag not in ("true", "false"):
            raise HttpError(400, "X-Firehose-Persist must be true or false")
        if flag == "true":
            ttl_s = None

    buffer_size = default_buffer_size
    size = headers.get("x-firehose-buffer-size")
    if size is not None:
        size = size.strip()
        if (not size.isascii() or not size.isdigit()
                or digits_value(size, max_buffer_size + 1) > max_buffer_size):
            raise HttpError(400, "X-Firehose-Buffer-Size must be an integer from 0 to "
                                 f"{max_buffer_size}")
        buffer_size = int(size)
    return PublishOptions(ttl_s, buffer_size)


def _subscription_failed(reason: str) -> HttpError:
    return HttpError(400, reason, subscriber=True)


def subscribed_channel(name) -> str:
    """A channel name from a subscription (query, JSON body, WebSocket frame): valid and
    not reserved; raises HttpError."""
    if not isinstance(name, str) or not name:
        raise _subscription_failed("channel names must be non-empty strings")
    try:
        return names.check_channel(name)
    except names.InvalidName as exc:
        raise _subscription_failed(f"{name!r}: {exc.reason}") from None


def _too_many(max_channels: int) -> HttpError:
    return _subscription_failed(f"a subscription may name at most {max_channels} channels")


def parse_subscribe_query(value: Optional[str], max_channels: int) -> list:
    """``/a!3,/b!0,/c`` (already percent-decoded) -> subscriptions; raises HttpError."""
    if not value:
        raise _subscription_failed("no channels to subscribe to")
    if value.count(",") >= max_channels:
        raise _too_many(max_channels)
    subscriptions: dict = {}
    for entry in value.split(","):
        name, bang, seq_text = entry.partition("!")
        channel = subscribed_channel(name)
        if "!" in seq_text:
            raise _subscription_failed(f"{entry!r}: more than one '!'")
        try:
            seq = parse_sequence(seq_text if bang else None)
        except HttpError as exc:
            raise _subscription_failed(f"{entry!r}: {exc.reason}") from None
        subscriptions.setdefault(channel, Subscription(channel, seq, {}))
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


_NOT_STRUCTURE = bytes(range(256)).translate(None, b'[]{}"\\')


def json_depth_within(text: bytes, max_depth: int) -> bool:
    """True when the JSON ``text`` nests arrays and objects at most ``max_depth`` deep
    (checked before parsing: the parser recurses once per level)."""
    if text.count(b"[") + text.count(b"{") <= max_depth:
        return True
    depth = 0
    in_string = escaped = False
    for byte in text.translate(None, _NOT_STRUCTURE):
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > max_depth:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True


def load_json(text, max_depth: int):
    """``json.loads`` of a client's document, refused (HttpError 400) when it is not
    JSON or nests deeper than ``max_depth``."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if not json_depth_within(raw, max_depth):
        raise _subscription_failed(f"the JSON nests deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _subscription_failed("the body is not valid JSON") from None


def parse_subscribe_body(body: bytes, max_channels: int, max_depth: int) -> list:
    """A JSON object ``{"/a": 3, "/b": {"last_message_sequence": 1}}`` -> subscriptions."""
    document = load_json(body, max_depth)
    if not isinstance(document, dict):
        raise _subscription_failed("the body must be a JSON object of channel: sequence")
    if not document:
        raise _subscription_failed("no channels to subscribe to")
    if len(document) > max_channels:
        raise _too_many(max_channels)
    subscriptions: dict = {}
    for name, spec in document.items():
        channel = subscribed_channel(name)
        subscriptions.setdefault(channel, subscription_from_value(channel, spec))
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
                      separators=(",", ":"), ensure_ascii=False).encode()



# -- Request heads ------------------------------------------------------------------

class Head:
    """A request head: method, target (split into ``path`` and ``query``), version and
    fields by lower-case name (repeated fields joined with ``,``, as RFC 9110 §5.3
    allows and as Tornado does)."""

    __slots__ = ("method", "target", "path", "query", "version", "fields", "size")

    def __init__(self, method: str, target: str, version: str, fields: dict, size: int):
        self.method = method
        self.target = target
        self.path, _, self.query = target.partition("?")
        self.version = version
        self.fields = fields
        self.size = size

    def get(self, name: str, default=None):
        """A field by lower-case name."""
        return self.fields.get(name, default)

    @property
    def keep_alive(self) -> bool:
        tokens = _tokens(self.fields.get("connection", ""))
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


def _tokens(value: str) -> set:
    return {token.strip().lower() for token in value.split(",")} if value else set()


def _bad(reason: str) -> HttpError:
    return HttpError(400, reason, close=True)


def head_too_large(max_bytes: int) -> HttpError:
    return HttpError(431, f"The request head is longer than {max_bytes} bytes", close=True)


_HEAD_END = re.compile(rb"\n\r?\n")


def head_end(buf) -> tuple:
    """(where the head in ``buf`` ends, where its body starts), or None while the head
    is incomplete. Lines end in CRLF or, as RFC 9112 §2.2 allows, a bare LF."""
    found = _HEAD_END.search(buf)
    if found is None:
        return None
    end = found.start()
    return (end - 1 if end and buf[end - 1] == 0x0D else end), found.end()


def parse_head(raw: bytes, max_bytes: int) -> Head:
    """A request head read off the wire (without its blank line); raises HttpError."""
    if len(raw) > max_bytes:
        raise head_too_large(max_bytes)
    text = raw.decode("latin-1")
    lines = text.replace("\r\n", "\n").split("\n")
    request_line = _REQUEST_LINE.fullmatch(lines[0])
    if request_line is None:
        raise _bad("Malformed request line")
    method, target, version = request_line.groups()
    fields: dict = {}
    for line in lines[1:]:
        field = _FIELD.fullmatch(line)
        if field is None:
            if line[:1] in (" ", "\t"):
                raise _bad("Folded header lines (obs-fold) are not accepted")
            raise _bad("Malformed header field")
        name, value = field.group(1).lower(), field.group(2)
        fields[name] = f"{fields[name]},{value}" if name in fields else value
    return checked_head(method, target, version, fields, len(raw), max_bytes)


def head_from_fields(method: str, target: str, version: str, pairs, max_bytes: int) -> Head:
    """A head Tornado has parsed: ``pairs`` are its (name, value) fields in order."""
    fields: dict = {}
    size = len(method) + len(target) + len(version) + 2
    for name, value in pairs:
        name = name.lower()
        fields[name] = f"{fields[name]},{value}" if name in fields else value
        size += len(name) + len(value) + 4
    return checked_head(method, target, version, fields, size, max_bytes)


def checked_head(method: str, target: str, version: str, fields: dict, size: int,
                 max_bytes: int) -> Head:
    """The checks of RFC 9112 every head passes, whoever parsed it."""
    if size > max_bytes:
        raise head_too_large(max_bytes)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        # Tornado refuses what is not HTTP/1.x before any handler sees it: 400 too.
        raise HttpError(505 if version.startswith("HTTP/1.") else 400,
                        f"{version} is not supported; use HTTP/1.1", close=True)
    host = fields.get("host")
    if host is None:
        if version == "HTTP/1.1":
            raise _bad("Missing Host header")
    elif not _HOST.fullmatch(host) or "," in host:
        raise _bad("Invalid Host header (exactly one host[:port] is allowed)")
    length = fields.get("content-length")
    if length is not None:
        values = {value.strip() for value in length.split(",")}
        if len(values) != 1:
            raise _bad("Multiple unequal Content-Length values")
        length = values.pop()
        if not (length.isascii() and length.isdigit()):
            raise _bad("Content-Length must be a non-negative integer")
        fields["content-length"] = length
    coding = fields.get("transfer-encoding")
    if coding is not None:
        if length is not None:
            raise _bad("A request may not carry both Transfer-Encoding and Content-Length")
        if coding.strip().lower() != "chunked":
            raise _bad(f"Unsupported Transfer-Encoding {coding!r}")
    return Head(method, target, version, fields, size)


# -- What a request asks for ---------------------------------------------------------

class Poll(NamedTuple):
    subscriptions: list
    multiplexed: bool


class Publish(NamedTuple):
    channel: str
    options: PublishOptions
    length: Optional[int]  # None: a chunked body


class Delete(NamedTuple):
    channel: str


class Health(NamedTuple):
    channel: str


class Stream(NamedTuple):
    subscriptions: list
    multiplexed: bool


class Upgrade(NamedTuple):
    channel: Optional[str]  # None: multiplexed
    subscriptions: list      # subscribed at once (``?subscribe=`` of a multiplexed socket)
    url_params: dict
    accept: bytes            # the Sec-WebSocket-Accept value
    credential: Optional[str] = None  # what later subscribe frames are checked with


class Authorize(NamedTuple):
    """``action`` once the authorization callout consents to each of ``asks``
    (``(operation, channel, credential)``)."""
    action: tuple
    asks: list


class Metrics(NamedTuple):
    pass


class ReadBody(NamedTuple):
    limit: int


class Answer(NamedTuple):
    status: int
    headers: tuple = ()  # (name, value) pairs


_SEQUENCE_PARAM = "last_message_sequence"
_PUBLISH = "publish"      # the operations of auth.tokens
_SUBSCRIBE = "subscribe"
# A body up to this many times the message limit is read and dropped before its 413.
DISCARD_LIMIT_FACTOR = 4
_METHODS = ("GET", "PUT", "POST", "DELETE", "HEAD", "OPTIONS")
_SUBSCRIBER_METHODS = ("GET", "HEAD")


class Rules:
    """The decisions and answers of one edge's configuration (``limits``: the
    cluster's ``Limits``; ``edge``: its ``EdgeConfig``)."""

    def __init__(self, limits, edge, authorizer=None, subscription_filter=None):
        self.limits = limits
        self.authorizer = authorizer  # auth.tokens.Authorizer: credentials, when required
        # PROTOCOL §8's hook: ``filter(channel, params, credential)`` returns None to
        # accept a subscription, or the reason it is refused.
        self.subscription_filter = subscription_filter
        self.checks_credentials = subscription_filter is not None or (
            authorizer is not None and any(authorizer.required(op)
                                           for op in (_PUBLISH, _SUBSCRIBE)))
        self.max_head_bytes = edge.max_head_bytes
        self.max_channels = edge.stream_max_channels
        self.max_json_depth = edge.max_json_depth
        self.max_query_params = edge.max_query_params
        self.allowed_origins = frozenset(edge.cors_allow_origins)

    # -- CORS ----------------------------------------------------------------------

    def allows_origin(self, origin: str) -> bool:
        """True when a page from ``origin`` may read answers and open WebSockets."""
        return not self.allowed_origins or origin in self.allowed_origins

    def extra_headers(self, head: Head) -> bytes:
        """The header lines every answer to ``head`` carries: CORS and ``Connection``."""
        extra = b""
        if not head.keep_alive:
            extra = b"Connection: close\r\n"
        origin = head.get("origin")
        if origin and self.allows_origin(origin):
            extra += b"Access-Control-Allow-Origin: " + origin.encode("latin-1") + \
                b"\r\nVary: Origin\r\n"
        return extra

    def _preflight(self, head: Head) -> Answer:
        origin = head.get("origin")
        if self.allowed_origins and origin in self.allowed_origins:
            methods = "GET, PUT, POST, DELETE, HEAD, OPTIONS"
        else:
            methods = "GET, HEAD, OPTIONS"  # without an allow-list, no cross-origin writes
        headers = [("Access-Control-Allow-Methods", methods),
                   ("Access-Control-Expose-Headers", "X-Firehose-Sequence"),
                   ("Access-Control-Max-Age", "86400")]
        requested = head.get("access-control-request-headers")
        if requested:
            headers.append(("Access-Control-Allow-Headers", requested))
        return Answer(204, tuple(headers))

    # -- decisions -----------------------------------------------------------------

    def decide(self, head: Head):
        """What ``head`` asks for: an action (see the module docstring); raises HttpError."""
        action = self._decide(head)
        if self.checks_credentials:
            return self._authorized(head, action)
        return action

    # -- credentials -----------------------------------------------------------------

    def credential(self, head: Head):
        """The credential ``head`` carries (header, cookie or query parameter), or None."""
        params = None

        def query(name):
            nonlocal params
            if params is None:
                params = self._query(head) if head.query else {}
            return params.get(name)
        return self.authorizer.credential_from(lambda name: head.get(name.lower()), query)

    def filter_subscription(self, channel: str, params: dict, credential) -> None:
        """Ask the subscription filter, if one is configured; raises HttpError (400 with
        its reason, or 503 when it fails: closed)."""
        accept = self.subscription_filter
        if accept is None:
            return
        try:
            reason = accept(channel, params, credential)
        except Exception as exc:  # the operator's code: it fails closed
            raise HttpError(503, f"Service unavailable: the subscription filter failed "
                                 f"({type(exc).__name__})", subscriber=True) from exc
        if reason is not None:
            raise _subscription_failed(f"{channel!r}: {reason}")

    def authorize(self, op: str, channel: str, credential) -> list:
        """Check ``credential`` for ``op`` on ``channel``: raises HttpError (401/403/503);
        returns the callout questions still to ask ([] when none)."""
        authorizer = self.authorizer
        if authorizer is None or not authorizer.required(op):
            return []
        try:
            authorizer.check(op, channel, credential)
            if authorizer.callout_pending(op, channel, credential):
                return [(op, channel, credential)]
        except AuthError as exc:
            raise auth_refusal(exc, subscriber=op == _SUBSCRIBE) from None
        return []

    def _authorized(self, head: Head, action):
        kind = type(action)
        if kind is Publish or kind is Delete:
            checks = [(_PUBLISH, action.channel)]
        elif kind is Poll or kind is Stream:
            checks = [(_SUBSCRIBE, sub.channel) for sub in action.subscriptions]
        elif kind is Upgrade:
            channels = [action.channel] if action.channel is not None else []
            checks = [(_SUBSCRIBE, channel) for channel in channels] + \
                [(_SUBSCRIBE, sub.channel) for sub in action.subscriptions]
            if self.authorizer is not None:
                action = action._replace(credential=self.credential(head))
        else:
            return action  # health, metrics, preflight; a POST body is checked in decide_body
        credential = self.credential(head) if self.authorizer is not None else None
        asks = []
        for op, channel in checks:
            asks += self.authorize(op, channel, credential)
        if kind is not Publish and kind is not Delete:
            for sub in action.subscriptions:
                self.filter_subscription(sub.channel, sub.params, credential)
        return Authorize(action, asks) if asks else action

    def _decide(self, head: Head):
        method, path = head.method, head.path
        length = head.get("content-length")
        if length is not None:
            limit = self.limits.max_message_bytes
            size = digits_value(length, DISCARD_LIMIT_FACTOR * limit + 1)
            if size > limit:
                # A body a few times too large is read and dropped before the 413:
                # a client still sending when the connection closes sees a reset.
                raise self.too_large(close=size > DISCARD_LIMIT_FACTOR * limit)
        if not path.startswith("/"):
            if head.target == "*" and method == "OPTIONS":
                return self._preflight(head)
            raise _bad("The request target must be an absolute path")
        if method == "OPTIONS":
            return self._preflight(head)
        if path == MULTIPLEX_PATH:
            return self._decide_multiplex(head)
        if names.RESERVED_MARK in path:
            if method == "HEAD":
                return Health(path)
            if method == "PUT":
                raise HttpError(400, "Channel names containing @firehose are reserved")
            if path == METRICS_PATH and "websocket" not in _tokens(head.get("upgrade", "")):
                return Metrics()
            raise HttpError(404, f"Unknown endpoint {path}")
        if method == "GET":
            return self._decide_get(head, path)
        if method == "PUT":
            return self._decide_publish(head, path)
        channel = channel_from_path(path)
        if method == "DELETE":
            return Delete(channel)
        if method == "HEAD":
            return Health(channel)
        raise self.method_not_allowed(method, "GET")

    @staticmethod
    def method_not_allowed(method: str, allow: str) -> HttpError:
        return HttpError(405, f"Method {method} is not allowed here; use {allow}",
                         (("Allow", allow),))

    def _query(self, head: Head) -> dict:
        """The query's parameters, percent-decoded (the last of a repeated one wins)."""
        query = head.query
        if not query:
            return {}
        if query.count("&") >= self.max_query_params:
            raise _subscription_failed(
                f"a request may carry at most {self.max_query_params} query parameters")
        params = {}
        for pair in query.split("&"):
            if pair:
                name, _, value = pair.partition("=")
                params[_unquote(name)] = _unquote(value)
        return params

    def _subscription_params(self, head: Head) -> dict:
        """The query's parameters less the credential's."""
        params = self._query(head)
        if self.authorizer is not None:
            params.pop(self.authorizer.config.query_param, None)
        return params

    def _decide_get(self, head: Head, path: str):
        try:
            channel = channel_from_path(path)
        except HttpError as exc:
            exc.subscriber = True
            raise
        query = head.query
        if not query:
            seq, params = 0, {}
        elif (query.startswith("last_message_sequence=") and "&" not in query
              and query[22:].isdigit() and query[22:].isascii() and len(query) < 40):
            seq, params = int(query[22:]), {}  # the re-poll of every caught-up client
        else:
            params = self._subscription_params(head)
            seq = parse_sequence(params.pop(_SEQUENCE_PARAM, None))
        upgrade = self._websocket(head)
        if upgrade:
            return Upgrade(channel, [], params, upgrade)
        if EVENT_STREAM_TYPE in head.get("accept", ""):
            _no_body(head)
            resume = parse_last_event_id(head.get("last-event-id"))
            return Stream([Subscription(channel, seq if resume is None else resume, params)],
                          False)
        return Poll([Subscription(channel, seq, params)], False)

    def _websocket(self, head: Head):
        """The accept value when ``head`` asks for a WebSocket, else None."""
        if "websocket" not in _tokens(head.get("upgrade", "")):
            return None
        _no_body(head)
        origin = head.get("origin")
        if origin and not self.allows_origin(origin):
            raise HttpError(403, f"WebSockets from {origin} are not allowed")
        try:
            return websocket.handshake(head.method, head.fields)
        except websocket.HandshakeError as exc:
            raise HttpError(exc.status, exc.reason, exc.headers) from None

    def _decide_publish(self, head: Head, path: str) -> Publish:
        channel = channel_from_path(path)
        limits = self.limits
        _expectation(head)
        length = head.get("content-length")
        if length is None and "transfer-encoding" not in head.fields:
            length = "0"  # a PUT without a body publishes an empty message
        options = parse_publish_headers(head.fields, limits.default_ttl_s,
                                        limits.default_buffer_size, limits.max_buffer_size)
        return Publish(channel, options, None if length is None else int(length))

    def too_large(self, close: bool = True) -> HttpError:
        return HttpError(413, f"Message body is larger than {self.limits.max_message_bytes}"
                              " bytes", close=close)

    def _decide_multiplex(self, head: Head):
        method = head.method
        if method == "HEAD":
            return Health(head.path)
        if method == "PUT":
            raise HttpError(400, "Channel names containing @firehose are reserved")
        if method == "POST":
            _expectation(head)
            return ReadBody(self.limits.max_message_bytes)
        if method != "GET":
            raise self.method_not_allowed(method, "GET, POST")
        params = self._query(head)
        upgrade = self._websocket(head)
        value = params.get("subscribe")
        if upgrade:
            subscriptions = parse_subscribe_query(value, self.max_channels) if value else []
            return Upgrade(None, subscriptions, {}, upgrade)
        subscriptions = parse_subscribe_query(value, self.max_channels)
        if EVENT_STREAM_TYPE in head.get("accept", ""):
            _no_body(head)
            resume = parse_multiplex_event_id(head.get("last-event-id"), self.max_channels)
            return Stream([sub._replace(last_sequence=resume.get(sub.channel, sub.last_sequence))
                           for sub in subscriptions], True)
        return Poll(subscriptions, True)

    def decide_body(self, head: Head, body: bytes):
        """The long-poll a POST to ``/channels@firehose`` asks for, from its body."""
        action = Poll(parse_subscribe_body(body, self.max_channels, self.max_json_depth), True)
        return self._authorized(head, action) if self.checks_credentials else action


def _expectation(head: Head) -> None:
    if "expect" in head.fields and head.get("expect").lower() != "100-continue":
        raise HttpError(417, "Only 'Expect: 100-continue' is understood")


def _no_body(head: Head) -> None:
    """A request that becomes a stream carries no body: what follows its head is the
    stream's (a WebSocket's frames)."""
    if "transfer-encoding" in head.fields or (head.get("content-length") or "0").strip("0"):
        raise HttpError(400, "A WebSocket or event-stream request may not carry a body",
                        close=True)


def auth_refusal(exc, subscriber: bool) -> HttpError:
    """The HTTP answer to an ``auth.tokens.AuthError``."""
    headers = tuple(exc.headers().items())
    return HttpError(exc.status, exc.reason, headers, subscriber=subscriber)


def _unquote(text: str) -> str:
    """Percent-decoding of a query component (``+`` is a space); bytes as UTF-8."""
    return unquote_plus(text, encoding="utf-8", errors="surrogateescape")


def parse_last_event_id(value):
    """A single-channel stream's ``Last-Event-ID``: None when absent or empty."""
    if value is None or not value.strip():
        return None
    return parse_sequence(value, "Last-Event-ID")


def parse_multiplex_event_id(value, max_channels: int = 1000) -> dict:
    """A multiplexed stream's ``Last-Event-ID`` -> ``{channel: sequence}`` ({} when absent)."""
    if value is None or not value.strip():
        return {}
    try:
        subscriptions = parse_subscribe_query(_unquote(value.strip()), max_channels)
    except HttpError as exc:
        raise _subscription_failed(f"Last-Event-ID: {exc.reason}") from None
    return {sub.channel: sub.last_sequence for sub in subscriptions}


# -- Answers -------------------------------------------------------------------------

def render(status: int, body: bytes = b"", content_type: Optional[str] = None,
           headers=(), extra: bytes = b"", sized: bool = True) -> bytes:
    """A whole answer: status line, ``Content-Type``, ``Content-Length`` (unless
    ``sized`` is false, and never on 1xx and 204), ``headers`` (``(name, value)``
    pairs), ``extra`` lines, body."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, "Error").encode())]
    if content_type:
        lines.append(b"Content-Type: %s\r\n" % content_type.encode())
    if sized and status >= 200 and status != 204:
        lines.append(b"Content-Length: %d\r\n" % len(body))
    for name, value in headers:
        lines.append(f"{name}: {value}\r\n".encode("latin-1", "replace"))
    lines.append(extra)
    lines.append(b"\r\n")
    lines.append(body)
    return b"".join(lines)


def error_answer(exc: HttpError, extra: bytes = b"") -> bytes:
    """The answer to a refused request: a JSON "Subscription failed" for a subscriber,
    one line of plain text otherwise."""
    if exc.close and b"Connection: close" not in extra:
        extra = b"Connection: close\r\n" + extra
    if exc.bodiless:
        return render(exc.status, b"", None, exc.headers, extra)
    if exc.subscriber:
        return render(exc.status, subscription_failed_json(exc.reason), JSON_TYPE,
                      exc.headers, extra)
    return render(exc.status, exc.reason.replace("\n", " ").encode("utf-8", "replace"),
                  TEXT_TYPE, exc.headers, extra)


_OK_JSON = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "


def poll_answer(body: bytes, extra: bytes = b"") -> bytes:
    """The 200 of a long-poll; with no ``extra`` it is the same for every waiter."""
    return b"%s%d\r\n%s\r\n%s" % (_OK_JSON, len(body), extra, body)


def poll_answer_head(length: int, extra: bytes) -> bytes:
    """The head of a 200 whose body (shared by every waiter) is written after it."""
    return b"%s%d\r\n%s\r\n" % (_OK_JSON, length, extra)


def published_answer(seq: int, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nX-Firehose-Sequence: %d\r\n%s\r\n" \
        % (seq, extra)


def no_content_answer(extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 204 No Content\r\n%s\r\n" % extra


def json_answer(body: bytes, extra: bytes = b"") -> bytes:
    return render(200, body, JSON_TYPE, (), extra)


def health_answer(up: bool, extra: bytes = b"") -> bytes:
    return render(200 if up else 503, b"", None, (), extra)


EVENT_STREAM_HEADERS = (("Content-Type", EVENT_STREAM_TYPE + "; charset=utf-8"),
                        ("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no"),
                        ("Transfer-Encoding", "chunked"))


def event_stream_head(extra: bytes = b"") -> bytes:
    """The head of an event stream's 200 (its body is chunked)."""
    return render(200, b"", None, EVENT_STREAM_HEADERS, extra, sized=False)


def upgrade_answer(accept: bytes) -> bytes:
    """The ``101 Switching Protocols`` of a WebSocket."""
    return websocket.response_head(accept)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"

# Each chunk of a chunked request body counts at least this much toward the body
# limit, so that a body sent one byte per chunk is bounded like a long one.
CHUNK_COST_BYTES = 64
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[^\r\n]*)?\r?\n")


class ChunkedBody:
    """A chunked request body (RFC 9112 §7.1), read incrementally from the buffer a
    connection owns: ``feed(buf)`` takes what it can use off the front of ``buf``
    and returns the whole body once its last chunk and trailer section are there,
    else None. A body over ``limit`` is read to its end and dropped (413 then),
    one over ``DISCARD_LIMIT_FACTOR`` times the limit is refused at once (413,
    close); a malformed one is a 400 (close)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.parts: list = []
        self.cost = 0
        self.trailer = False  # the last chunk was read: trailer fields until a blank line
        self.charged = False  # the chunk being read was counted already

    def _too_large(self, close: bool) -> HttpError:
        return HttpError(413, f"Message body is larger than {self.limit} bytes", close=close)

    def _count(self, cost: int) -> None:
        self.cost += cost
        if self.cost > self.limit:
            self.parts = []  # dropped from now on
            if self.cost > DISCARD_LIMIT_FACTOR * self.limit:
                raise self._too_large(close=True)

    def feed(self, buf: bytearray) -> Optional[bytes]:
        pos = 0
        try:
            while True:
                if self.trailer:
                    end = buf.find(b"\n", pos)
                    if end < 0:
                        if len(buf) - pos > 8192:
                            raise HttpError(400, "A trailer field is too long", close=True)
                        return None
                    line = bytes(buf[pos:end]).rstrip(b"\r")
                    pos = end + 1
                    self._count(len(line) + CHUNK_COST_BYTES)
                    if not line:
                        if self.cost > self.limit:
                            raise self._too_large(close=False)
                        return b"".join(self.parts)
                    continue
                size_line = _CHUNK_SIZE.match(buf, pos)
                if size_line is None:
                    if buf.find(b"\n", pos) >= 0 or len(buf) - pos > 1024:
                        raise HttpError(400, "Malformed chunk size line", close=True)
                    return None
                size = int(size_line.group(1), 16)
                start = size_line.end()
                if size == 0:
                    pos = start
                    self.trailer = True
                    continue
                if not self.charged:  # a chunk's declared size counts before its data
                    self._count(max(size, CHUNK_COST_BYTES))
                    self.charged = True
                end = start + size
                if len(buf) < end + 2 and buf[end:end + 1] != b"\n":
                    return None
                tail = 2 if buf[end:end + 2] == b"\r\n" else 1 if buf[end:end + 1] == b"\n" \
                    else 0
                if not tail:
                    raise HttpError(400, "A chunk does not end where its size says", close=True)
                if self.cost <= self.limit:
                    self.parts.append(bytes(buf[start:end]))
                self.charged = False
                pos = end + tail
        finally:
            del buf[:pos]
