"""Every ZeroMQ frame format of firehose-zmq, and the only module that uses msgpack.

Version 1 of the wire format (docs/native-zeromq.md is the reader's copy).

Requests: DEALER (edge or native client) -> ROUTER (worker or edge)::

    +--------------------+----------------------------------------------+
    | [envelope ...]     | added by ROUTER/REQ sockets, echoed verbatim |
    | body               | msgpack map: {"v": 1, "id": <int|str|bytes>, |
    |                    |   "op": "publish"|"fetch"|"delete"|"ping",   |
    |                    |   ...op fields...}                           |
    +--------------------+----------------------------------------------+

    publish: channel (str), data (bytes), ttl (int >= 0, optional),
             persist (bool, optional), buffer_size (int >= 0, optional),
             publish_id (str or bytes of 1-128 bytes, optional: a retry with the
             same id is answered with the first publish's seq and epoch and
             ``duplicate: true``, and stores nothing; ids are remembered for the
             worker's publish id window, across restarts when storage is on),
             deadline_ms (int, optional: Unix time in ms after which the sender
             no longer waits; the worker then refuses with ``deadline`` instead
             of applying it late)
    fetch:   channel (str), since (int), limit (int >= 1, optional),
             after (bool, optional: every buffered message above ``since``
             instead of the docs/protocol.md §5 rules; used to fill gaps)
    delete:  channel (str)
    ping:    nothing

Between workers while channels move to a new ring (README, "Growing the
cluster"); the new owner's DEALER -> the old owner's ROUTER::

    handoff_take: ring (str: the asker's ring version; the holder refuses with
                  ring_mismatch unless it is its own), to (str: the asker's
                  worker id), channels (list of str, optional: just these, each
                  of which the ring must give to ``to``; without it, every
                  channel the holder has for ``to``, in name order),
                  after (str, optional: without ``channels``, only names above
                  it), limit (int >= 1, optional: at most this many channels),
                  done (list of str, optional: channels the asker has committed;
                  the holder drops its copies first)

                  failback (bool, optional: the asker is the channels' owner
                  taking them back from its replica after a failover; see
                  below)

From a channel's owner to its replicas (README, "When a host is lost"); the
owner's DEALER -> each replica's ROUTER, one request per loop turn with what the
owner's store committed in it, or an empty one every fifth of the lease::

    replicate: from (str: the owner's worker id), ring (str: its ring version),
               stream (str: this stream's id; a new one after every reconnect
               or refusal), n (int >= 1: the batch's number, consecutive within
               a stream), sync (bool, optional: the stream starts here; the
               replica's copies are replaced by the ``r`` ops that follow),
               synced (bool, optional: the snapshot is complete with this
               batch), ops (list of at most MAX_REPLICA_OPS), each one of
        ["p", name, epoch, seq, data, buffer_size, expires_at|nil,
              publish_id|nil, at]                              a publish
        ["d", name]                                            deleted or expired
        ["r", name, epoch, seq, expires_at|nil, [[seq, data], ...],
              [[publish_id, seq, epoch, at], ...]]             a channel's state

Batches: instead of one request's map, a body may be a msgpack array of at most
``MAX_BATCH`` request maps (each as above): what one loop turn of the edge has
for one worker travels as one ZeroMQ message. Each request in it is handled and
answered on its own (a bad one gets its own error reply, the others are served).
The replies to a batch's requests are batched too: what one turn of the worker
has of them for a peer leaves as one message whose body is an array of reply
maps (at most ``MAX_BATCH``, and no more bytes than one message's limit); a
request sent on its own is answered on its own. A worker's PUB sends the
messages one loop turn has for one channel as one message too: the topic, then
a body that is an array of message maps, oldest first (``decode_messages``);
the edge's native endpoint hands its subscribers one message per frame pair
(``split_messages``).

Replies: the same envelope, then one msgpack map::

    {"v": 1, "id": <echoed>, "ok": true, ...}
        publish -> seq, epoch (duplicate: true for a recognised retry)
        fetch   -> seq, epoch, messages: [[seq, data], ...]
        delete  -> existed;     ping  -> worker, ring
        replicate -> n (the batch acknowledged: committed with every earlier
                     one), synced (bool: the replica holds the whole snapshot; only
                     then does the acknowledgement renew the owner's lease)
        handoff_take -> channels: [[name, epoch, seq, expires_at (float|nil),
                        [[seq, data], ...]], ...] (the held ones; their buffers,
                        oldest first), absent: [names asked for and not held],
                        publish_ids: [[publish_id, name, seq, epoch], ...] of those
                        channels, more (bool: channels are left after ``last``),
                        last (str: the last name considered; "" for none)
    {"v": 1, "id": <echoed or nil>, "ok": false, "error": <code>, "reason": <str>,
     "ring": <ring version>, "owner": <worker id, with not_owner: whom to ask>}
    codes: bad_request, not_owner, unsupported_version, too_large, unavailable,
           deadline, overloaded, quota, ring_mismatch, fenced (replicate: the
           replica has taken the owner's channels over; take them back), resync
           (replicate: a batch out of order or on an unknown stream; start a
           new stream with a snapshot)

Messages: worker PUB/XPUB -> edge SUB (and native subscribers)::

    +---------------------------+------------------------------------------+
    | topic: channel + b"\\x00"  | the zero byte makes topic matching exact |
    | body                      | msgpack map: channel (str), seq (int),   |
    |                           | epoch (int), data (bytes), ttl (int|nil) |
    +---------------------------+------------------------------------------+

Subscriptions: subscriber -> XPUB, one frame ``0x01 + topic`` (subscribe) or
``0x00 + topic`` (unsubscribe), where ``topic`` is exactly ``channel + b"\\x00"``
for a channel name that ``names.check_channel`` accepts. Anything else (an empty
topic, a prefix, a reserved name) is refused: ``decode_subscription``.
"""

from typing import NamedTuple, Optional

import msgpack

from .names import MAX_CHANNEL_BYTES, InvalidName, check_channel

VERSION = 1

# Error codes carried in ``error`` of a failed reply.
BAD_REQUEST = "bad_request"
NOT_OWNER = "not_owner"
UNSUPPORTED_VERSION = "unsupported_version"
TOO_LARGE = "too_large"
UNAVAILABLE = "unavailable"
DEADLINE = "deadline"        # the request's deadline_ms had passed when it was read
OVERLOADED = "overloaded"    # the worker's store is too far behind to take more
QUOTA = "quota"              # the worker holds as much as its quotas allow
FORBIDDEN = "forbidden"      # the client's CURVE key does not grant that channel
RING_MISMATCH = "ring_mismatch"  # a handoff_take from a worker on another ring version
FENCED = "fenced"            # replicate: the replica serves the owner's channels now
RESYNC = "resync"            # replicate: out of order or unknown stream; send a snapshot

MAX_BATCH = 1024          # requests or replies one batch body may carry
MAX_HANDOFF_NAMES = 10000  # channel names one handoff_take may carry in each list
MAX_REPLICA_OPS = 100000   # operations one replicate may carry

_ENVELOPE_SLACK_BYTES = 64 * 1024

# One Packer for every encode: ``msgpack.packb`` builds a new one (and its buffer)
# per call. Sharing it is safe under the GIL: ``pack`` runs in C without calling
# back into Python for the plain types we pack, and resets its buffer on error.
_pack = msgpack.Packer(use_bin_type=True).pack


class ProtocolError(ValueError):
    """A frame that does not follow the wire format; ``code`` is the error code."""

    def __init__(self, reason: str, code: str = BAD_REQUEST, request_id=None, owner=None):
        super().__init__(reason)
        self.code = code
        self.request_id = request_id
        self.owner = owner  # with NOT_OWNER: the worker to ask instead


class PubMessage(NamedTuple):
    """A channel message as it travels on the PUB sockets."""

    channel: str
    seq: int
    epoch: int
    data: bytes
    ttl: Optional[int]


def topic(channel: str) -> bytes:
    """The exact SUB topic of a channel."""
    return channel.encode("utf-8", "surrogateescape") + b"\x00"


def frame_limit(max_bytes: int) -> int:
    """The largest frame a peer may send when messages are at most ``max_bytes``
    (the message, its fields and a reply's framing); ``ZMQ_MAXMSGSIZE`` on every
    socket that reads requests, replies or messages."""
    return max_bytes + _ENVELOPE_SLACK_BYTES


# 0x01/0x00, the channel name, its zero byte (ZMQ_MAXMSGSIZE of XPUB sockets).
SUBSCRIPTION_FRAME_LIMIT = MAX_CHANNEL_BYTES + 2


def decode_subscription(frame: bytes) -> tuple:
    """``(subscribe, channel)`` of an XPUB's subscription frame; raises ProtocolError
    unless it is 0x01/0x00 followed by exactly ``topic(channel)`` of a channel
    that may be subscribed to."""
    if len(frame) < 2 or frame[0] > 1:
        raise ProtocolError(f"a {len(frame)}-byte frame that is not a subscription")
    if len(frame) > SUBSCRIPTION_FRAME_LIMIT or frame[-1] != 0:
        raise ProtocolError("a subscription whose topic is not a channel name and its zero byte "
                            "(prefix subscriptions are refused)")
    try:
        name = bytes(frame[1:-1]).decode("utf-8")
        channel = check_channel(name)
    except UnicodeDecodeError:
        raise ProtocolError("a subscription whose topic is not UTF-8") from None
    except InvalidName as exc:
        raise ProtocolError(f"a subscription to a refused name: {exc.reason}") from None
    return frame[0] == 1, channel


def _unpack(frame: bytes, max_bytes: int):
    if len(frame) > frame_limit(max_bytes):
        raise ProtocolError(f"frame of {len(frame)} bytes is over the limit", TOO_LARGE)
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=True,
                               max_bin_len=max_bytes, max_str_len=max_bytes)
    except Exception as exc:  # msgpack raises several unrelated types
        if isinstance(exc, ValueError) and "exceeds max" in str(exc):
            raise ProtocolError(f"a field is over the {max_bytes}-byte limit", TOO_LARGE) from None
        raise ProtocolError(f"body is not msgpack: {exc.__class__.__name__}") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _nonneg_int(value) -> bool:
    return _is_int(value) and value >= 0


def _positive_int(value) -> bool:
    return _is_int(value) and value >= 1


def _is_str(value) -> bool:
    return isinstance(value, str)


def _is_bytes(value) -> bool:
    return isinstance(value, bytes)


def _is_bool(value) -> bool:
    return isinstance(value, bool)


MAX_PUBLISH_ID_BYTES = 128


def _is_publish_id(value) -> bool:
    if isinstance(value, str):
        return 0 < len(value.encode("utf-8", "surrogatepass")) <= MAX_PUBLISH_ID_BYTES
    return isinstance(value, bytes) and 0 < len(value) <= MAX_PUBLISH_ID_BYTES


def _is_names(value) -> bool:
    return (isinstance(value, list) and len(value) <= MAX_HANDOFF_NAMES
            and all(isinstance(name, str) for name in value))


# op -> {field: (check, what it must be, required)}
_REQUEST_FIELDS = {
    "publish": {
        "channel": (_is_str, "a string", True),
        "data": (_is_bytes, "bytes", True),
        "ttl": (_nonneg_int, "an integer >= 0", False),
        "persist": (_is_bool, "a boolean", False),
        "buffer_size": (_nonneg_int, "an integer >= 0", False),
        "publish_id": (_is_publish_id, f"a string or bytes of 1-{MAX_PUBLISH_ID_BYTES} bytes",
                       False),
        "deadline_ms": (_nonneg_int, "an integer >= 0", False),
    },
    "fetch": {
        "channel": (_is_str, "a string", True),
        "since": (_is_int, "an integer", True),
        "limit": (_positive_int, "an integer >= 1", False),
        "after": (_is_bool, "a boolean", False),
    },
    "delete": {"channel": (_is_str, "a string", True)},
    "ping": {},
    "handoff_take": {
        "ring": (_is_str, "a string", True),
        "to": (_is_str, "a string", True),
        "channels": (_is_names, f"a list of at most {MAX_HANDOFF_NAMES} strings", False),
        "after": (_is_str, "a string", False),
        "limit": (_positive_int, "an integer >= 1", False),
        "done": (_is_names, f"a list of at most {MAX_HANDOFF_NAMES} strings", False),
        "failback": (_is_bool, "a boolean", False),
    },
    "replicate": {
        "from": (_is_str, "a string", True),
        "ring": (_is_str, "a string", True),
        "stream": (_is_str, "a string", True),
        "n": (_positive_int, "an integer >= 1", True),
        "sync": (_is_bool, "a boolean", False),
        "synced": (_is_bool, "a boolean", False),
        "ops": (lambda v: isinstance(v, list) and len(v) <= MAX_REPLICA_OPS,
                f"a list of at most {MAX_REPLICA_OPS} operations", True),
    },
}
_COMMON_FIELDS = ("v", "id", "op")
_MISSING = object()
# op -> (every field name it may carry, its required fields, (name, check, what) per field)
_REQUEST_SHAPES = {
    op: (frozenset(fields) | frozenset(_COMMON_FIELDS),
         tuple(name for name, (_, _, required) in fields.items() if required),
         tuple((name, check, what) for name, (check, what, _) in fields.items()))
    for op, fields in _REQUEST_FIELDS.items()
}


def encode_request(request: dict) -> bytes:
    """The body frame of a request (``v`` is added)."""
    return _pack({"v": VERSION, **request})


def decode_request(frame: bytes, max_bytes: int) -> dict:
    """Check a request body field by field; raises ProtocolError."""
    return check_request(_unpack(frame, max_bytes))


def check_request(request) -> dict:
    """Check an unpacked request field by field; raises ProtocolError."""
    if not isinstance(request, dict):
        raise ProtocolError("body must be a msgpack map")
    request_id = request.get("id")
    if not (_is_int(request_id) or isinstance(request_id, (str, bytes))):
        raise ProtocolError("'id' must be an integer, string or bytes")
    if request.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {request.get('v')!r}; this is {VERSION}",
                            UNSUPPORTED_VERSION, request_id)
    op = request.get("op")
    shape = _REQUEST_SHAPES.get(op) if isinstance(op, str) else None
    if shape is None:
        raise ProtocolError(f"unknown op {op!r}", request_id=request_id)
    allowed, required, checks = shape
    if not request.keys() <= allowed:
        name = next(name for name in request if name not in allowed)
        raise ProtocolError(f"unknown field {name!r} for op {op!r}", request_id=request_id)
    for name, check, what in checks:
        value = request.get(name, _MISSING)
        if value is _MISSING:
            if name in required:
                raise ProtocolError(f"{op!r} needs {name!r}", request_id=request_id)
        elif not check(value):
            raise ProtocolError(f"{name!r} must be {what}", request_id=request_id)
    return request


# The first byte of a msgpack array: fixarray, array 16, array 32.
_ARRAY_FIRST_BYTES = frozenset(range(0x90, 0xa0)) | {0xdc, 0xdd}


def is_batch(frame) -> bool:
    """True when a request or reply body is a batch (a msgpack array)."""
    return len(frame) > 0 and frame[0] in _ARRAY_FIRST_BYTES


def encode_batch(bodies: list) -> bytes:
    """One body carrying several encoded request or reply bodies (at most MAX_BATCH):
    a msgpack array header, then the bodies as they are."""
    count = len(bodies)
    if count < 16:
        header = bytes((0x90 | count,))
    else:
        header = b"\xdc" + count.to_bytes(2, "big")
    return header + b"".join(bodies)


def batches(bodies: list, max_bytes: int):
    """``bodies`` cut into lists of at most MAX_BATCH bodies and, unless one body
    alone is larger, at most ``max_bytes`` bytes, in order."""
    batch: list = []
    size = 0
    for body in bodies:
        if batch and (len(batch) == MAX_BATCH or size + len(body) > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(body)
        size += len(body)
    if batch:
        yield batch


def _unpack_batch(frame, max_bytes: int) -> list:
    items = _unpack(frame, max_bytes)
    if not isinstance(items, list):
        raise ProtocolError("a batch must be a msgpack array")
    if not 0 < len(items) <= MAX_BATCH:
        raise ProtocolError(f"a batch of {len(items)} bodies (1 to {MAX_BATCH} are allowed)")
    return items


def decode_request_batch(frame, max_bytes: int) -> list:
    """The requests of a batch body, each a checked request map or, for one that
    is not, the ProtocolError to answer it with; raises ProtocolError when the
    body is not a batch at all."""
    return _checked_batch(frame, max_bytes, check_request)


def _checked_batch(frame, max_bytes: int, check) -> list:
    """Each item of a batch body as ``check`` returns it, or the ProtocolError it raised."""
    checked = []
    for item in _unpack_batch(frame, max_bytes):
        try:
            checked.append(check(item))
        except ProtocolError as exc:
            checked.append(exc)
    return checked


def encode_reply(request_id, **fields) -> bytes:
    """A successful reply body."""
    return _pack({"v": VERSION, "id": request_id, "ok": True, **fields})


def reply_fields(reply: dict) -> dict:
    """The op fields of a decoded successful reply (without ``v``, ``id`` and ``ok``)."""
    return {k: v for k, v in reply.items() if k not in ("v", "id", "ok")}


def encode_error(request_id, code: str, reason: str, ring_version: str, owner=None) -> bytes:
    """A failed reply body (``owner``: with not_owner, the worker to ask instead)."""
    body = {"v": VERSION, "id": request_id, "ok": False, "error": code, "reason": reason,
            "ring": ring_version}
    if owner is not None:
        body["owner"] = owner
    return _pack(body)


def decode_reply(frame: bytes, max_bytes: int) -> dict:
    """Check a reply body; raises ProtocolError."""
    return check_reply(_unpack(frame, max_bytes))


def decode_replies(frame, max_bytes: int) -> list:
    """The replies of a reply body, single or batched: each a checked reply map or,
    in a batch, the ProtocolError of one that is not; raises ProtocolError when
    the body as a whole is refused."""
    if not is_batch(frame):
        return [decode_reply(frame, max_bytes)]
    return _checked_batch(frame, max_bytes, check_reply)


def check_reply(reply) -> dict:
    """Check an unpacked reply; raises ProtocolError."""
    if not isinstance(reply, dict) or "id" not in reply or not _is_bool(reply.get("ok")):
        raise ProtocolError("reply must be a map with 'id' and boolean 'ok'")
    request_id = reply["id"]
    if not (request_id is None or _is_int(request_id) or isinstance(request_id, (str, bytes))):
        raise ProtocolError("'id' must be an integer, string, bytes or nil")
    if reply.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {reply.get('v')!r}", UNSUPPORTED_VERSION)
    if reply["ok"]:
        messages = reply.get("messages")
        if messages is not None and not (
            isinstance(messages, list)
            and all(isinstance(m, list) and len(m) == 2 and _is_int(m[0]) and _is_bytes(m[1])
                    for m in messages)
        ):
            raise ProtocolError("'messages' must be a list of [seq, data] pairs")
    elif not (_is_str(reply.get("error")) and _is_str(reply.get("reason"))):
        raise ProtocolError("a failed reply needs string 'error' and 'reason'")
    return reply


def encode_message(message: PubMessage) -> list:
    """The two frames of a channel message on a PUB socket."""
    return [topic(message.channel), _pack({"channel": message.channel, "seq": message.seq,
                                           "epoch": message.epoch, "data": message.data,
                                           "ttl": message.ttl})]


def decode_message(frames: list, max_bytes: int) -> PubMessage:
    """Check a PUB message of one channel message; raises ProtocolError."""
    topic_frame, body = _message_frames(frames)
    return _checked_message(_unpack(body, max_bytes), topic_frame)


def decode_messages(frames: list, max_bytes: int) -> list:
    """The channel messages of a PUB message, one or a batch (a worker's, of one
    channel: ``encode_batch`` of message bodies), oldest first; raises ProtocolError
    when any of them is refused."""
    topic_frame, body = _message_frames(frames)
    if not is_batch(body):
        return [_checked_message(_unpack(body, max_bytes), topic_frame)]
    return [_checked_message(fields, topic_frame) for fields in _unpack_batch(body, max_bytes)]


def split_messages(frames: list, max_bytes: int) -> list:
    """A PUB message as the two-frame messages of one channel message each (what
    native subscribers take); raises ProtocolError when any of them is refused."""
    topic_frame, body = _message_frames(frames)
    if not is_batch(body):
        return [frames]
    items = _unpack_batch(body, max_bytes)
    for fields in items:
        _checked_message(fields, topic_frame)
    return [[topic_frame, _pack(fields)] for fields in items]


def _message_frames(frames: list) -> tuple:
    if len(frames) != 2:
        raise ProtocolError(f"a message has 2 frames, not {len(frames)}")
    return frames[0], frames[1]


def _checked_message(fields, topic_frame) -> PubMessage:
    if not isinstance(fields, dict):
        raise ProtocolError("message body must be a msgpack map")
    channel, seq, epoch = fields.get("channel"), fields.get("seq"), fields.get("epoch")
    data, ttl = fields.get("data"), fields.get("ttl")
    if not (_is_str(channel) and _positive_int(seq) and _nonneg_int(epoch) and _is_bytes(data)
            and (ttl is None or _nonneg_int(ttl))):
        raise ProtocolError("message needs channel (str), seq (int >= 1), epoch (int), "
                            "data (bytes), ttl (int or nil)")
    if topic(channel) != bytes(topic_frame):
        raise ProtocolError("message topic does not match its channel")
    return PubMessage(channel, seq, epoch, data, ttl)


class HandoffChannel(NamedTuple):
    """One channel's state as a handoff_take reply carries it."""

    name: str
    epoch: int
    seq: int
    expires_at: Optional[float]
    messages: list  # [(seq, data)], oldest first, contiguous, ending at seq


class Handoff(NamedTuple):
    """A decoded handoff_take reply."""

    channels: list      # [HandoffChannel]
    absent: list        # [name]
    publish_ids: list   # [(publish_id, name, seq, epoch)]
    more: bool
    last: str


def encode_handoff(request_id, channels, absent, publish_ids, more: bool, last: str) -> bytes:
    """The reply to a handoff_take (``channels`` are HandoffChannel)."""
    return encode_reply(request_id,
                        channels=[[c.name, c.epoch, c.seq, c.expires_at,
                                   [list(m) for m in c.messages]] for c in channels],
                        absent=list(absent), publish_ids=[list(p) for p in publish_ids],
                        more=more, last=last)


def _is_expiry(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _handoff_channel(entry) -> HandoffChannel:
    if not (isinstance(entry, list) and len(entry) == 5 and _is_str(entry[0])
            and _positive_int(entry[1]) and _nonneg_int(entry[2]) and _is_expiry(entry[3])
            and isinstance(entry[4], list)):
        raise ProtocolError("a handoff channel is [name, epoch, seq, expires_at, messages]")
    name, epoch, seq, expires_at, messages = entry
    for i, message in enumerate(messages):
        if not (isinstance(message, list) and len(message) == 2 and _is_bytes(message[1])
                and message[0] == seq - len(messages) + 1 + i):
            raise ProtocolError(f"the messages of handoff channel {name!r} are not "
                                f"[seq, data] pairs contiguous up to {seq}")
    return HandoffChannel(name, epoch, seq, None if expires_at is None else float(expires_at),
                          [(s, d) for s, d in messages])


def decode_handoff(reply: dict) -> Handoff:
    """Check the fields of a successful handoff_take reply; raises ProtocolError."""
    channels, absent = reply.get("channels"), reply.get("absent")
    publish_ids, more, last = reply.get("publish_ids"), reply.get("more"), reply.get("last")
    if not (isinstance(channels, list) and _is_names(absent) and isinstance(publish_ids, list)
            and _is_bool(more) and _is_str(last)):
        raise ProtocolError("a handoff reply needs channels, absent, publish_ids, more, last")
    ids = []
    for entry in publish_ids:
        if not (isinstance(entry, list) and len(entry) == 4 and _is_publish_id(entry[0])
                and _is_str(entry[1]) and _positive_int(entry[2]) and _positive_int(entry[3])):
            raise ProtocolError("a handoff publish id is [publish_id, name, seq, epoch]")
        ids.append(tuple(entry))
    return Handoff([_handoff_channel(entry) for entry in channels], list(absent), ids, more,
                   last)


# -- replication ------------------------------------------------------------------------

def _is_message_list(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, list) and len(m) == 2 and _positive_int(m[0]) and _is_bytes(m[1])
        for m in value)


def _is_replica_id(value) -> bool:
    return (isinstance(value, list) and len(value) == 4 and _is_publish_id(value[0])
            and _positive_int(value[1]) and _positive_int(value[2]) and _is_expiry(value[3])
            and value[3] is not None)


# tag -> (length, check of the fields after the tag, what they must be)
_REPLICA_OPS = {
    "p": (9, lambda f: (_is_str(f[0]) and _positive_int(f[1]) and _positive_int(f[2])
                        and _is_bytes(f[3]) and _nonneg_int(f[4]) and _is_expiry(f[5])
                        and (f[6] is None or _is_publish_id(f[6])) and _is_expiry(f[7])
                        and f[7] is not None),
          '["p", name, epoch, seq, data, buffer_size, expires_at, publish_id, at]'),
    "d": (2, lambda f: _is_str(f[0]), '["d", name]'),
    "r": (7, lambda f: (_is_str(f[0]) and _positive_int(f[1]) and _nonneg_int(f[2])
                        and _is_expiry(f[3]) and _is_message_list(f[4])
                        and isinstance(f[5], list) and all(_is_replica_id(i) for i in f[5])),
          '["r", name, epoch, seq, expires_at, messages, publish_ids]'),
}


def encode_replica_publish(name, epoch, seq, data, buffer_size, expires_at, publish_id, at):
    return ["p", name, epoch, seq, data, buffer_size, expires_at, publish_id, at]


def encode_replica_delete(name: str) -> list:
    return ["d", name]


def encode_replica_restore(name, epoch, seq, expires_at, messages, publish_ids) -> list:
    """``messages``: ``(seq, data)`` oldest first, contiguous up to ``seq``;
    ``publish_ids``: ``(publish_id, seq, epoch, at)``."""
    return ["r", name, epoch, seq, expires_at, [list(m) for m in messages],
            [list(i) for i in publish_ids]]


def decode_replica_ops(ops: list) -> list:
    """Check every operation of a replicate request; returns them as tuples
    (``("p", ...)``, ``("d", name)``, ``("r", ...)``, fields as in the module
    docstring); raises ProtocolError naming the first bad one."""
    checked = []
    for i, op in enumerate(ops):
        shape = _REPLICA_OPS.get(op[0]) if isinstance(op, list) and op and isinstance(
            op[0], str) else None
        if shape is None or len(op) != shape[0] or not shape[1](op[1:]):
            raise ProtocolError(f"replicate operation {i} is not one of "
                                + ", ".join(what for _, _, what in _REPLICA_OPS.values()))
        if op[0] == "r":
            messages = op[5]
            for k, (seq, _) in enumerate(messages):
                if seq != op[3] - len(messages) + 1 + k:
                    raise ProtocolError(f"replicate operation {i}: the messages of {op[1]!r} "
                                        f"are not contiguous up to {op[3]}")
        checked.append(tuple(op))
    return checked
