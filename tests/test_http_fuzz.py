"""Property tests of the edge's pure input readers: any request head gets an action or an
HttpError from wire.http (never another exception), any chunked body is read or
refused, and any byte stream fed to the WebSocket frame reader, in any split, gives
events or a protocol error, never an exception or more than the limit buffered."""

from hypothesis import example, given, settings, strategies as st

from firehose_zmq.config import EdgeConfig, Limits
from firehose_zmq.wire import http, websocket
from firehose_zmq.wire.http import HttpError

RULES = http.Rules(Limits(max_message_bytes=4096), EdgeConfig(stream_max_channels=8))
MAX_HEAD = 65536

methods = st.sampled_from(["GET", "PUT", "POST", "DELETE", "HEAD", "OPTIONS", "PATCH", "get",
                           "G ET", ""])
paths = st.one_of(st.sampled_from(["/a", "/channels@firehose", "/metrics@firehose", "*",
                                   "/x@firehose", "http://h/a", "/a%zz", "/caf\u00e9"]),
                  st.text(alphabet=st.characters(max_codepoint=0xff), max_size=30))
queries = st.one_of(st.just(""), st.sampled_from([
    "last_message_sequence=3", "last_message_sequence=-1", "subscribe=/a!1,/b",
    "subscribe=", "subscribe=/a!x", "a=b&c", "%zz=%zz"]),
    st.text(alphabet=st.characters(max_codepoint=0xff), max_size=30))
names = st.sampled_from(["Host", "Content-Length", "Transfer-Encoding", "Upgrade", "Connection",
                         "Accept", "Origin", "Expect", "Last-Event-ID", "Cache-Control",
                         "X-Firehose-TTL", "X-Firehose-Buffer-Size", "X-Firehose-Persist",
                         "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Bad Name", ""])
values = st.one_of(st.sampled_from(["x", "a,b", "5", "+5", "99999999999999999999999", "chunked",
                                    "gzip", "websocket", "Upgrade", "close",
                                    "text/event-stream", "100-continue", "13",
                                    "dGhlIHNhbXBsZSBub25jZQ==", "/a!1,/b!x", "max-age=5",
                                    "true", "-1"]),
                   st.text(alphabet=st.characters(max_codepoint=0xff), max_size=20))
heads = st.builds(lambda method, path, query, version, fields: (
    f"{method} {path}{'?' + query if query else ''} {version}\r\n"
    + "".join(f"{name}: {value}\r\n" for name, value in fields)).rstrip("\r\n").encode(
        "latin-1", "replace"),
    methods, paths, queries, st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1x"]),
    st.lists(st.tuples(names, values), max_size=8))


def _decided(raw: bytes):
    try:
        head = http.parse_head(raw, MAX_HEAD)
        action = RULES.decide(head)
    except HttpError as exc:
        assert 400 <= exc.status < 600 and "\n" not in exc.reason
        assert http.error_answer(exc).startswith(b"HTTP/1.1 %d " % exc.status)
        return None
    if type(action) is http.ReadBody:
        try:
            RULES.decide_body(head, b'{"/a": 1}')
        except HttpError:
            pass
    return action


@settings(max_examples=600, deadline=None)
@given(heads)
@example(b"PUT /a HTTP/1.1\r\nHost: a,b\r\nContent-Length: 1")
@example(b"GET /a?last_message_sequence=" + b"9" * 5000 + b" HTTP/1.1\r\nHost: x")
@example(b"POST /channels@firehose HTTP/1.1\r\nHost: x\r\nContent-Length: 9")
def test_any_head_gets_an_action_or_an_http_error(raw):
    """Every head is decided or refused with a status and a one-line reason."""
    _decided(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_as_a_head(raw):
    found = http.head_end(raw + b"\r\n\r\n")
    assert found is not None
    _decided(raw[:found[0]] if found[0] < len(raw) else raw)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=12))
@example([b"5\r\nhello\r\n0\r\n\r\n"])
@example([b"zz\r\n"])
def test_any_chunked_body_is_read_or_refused(pieces):
    """Fed in any split, a chunked body ends whole, stays incomplete, or is refused."""
    body = http.ChunkedBody(limit=64)
    buf = bytearray()
    for piece in pieces:
        buf += piece
        try:
            done = body.feed(buf)
        except HttpError as exc:
            assert exc.status in (400, 413)
            return
        if done is not None:
            assert len(done) <= 64
            return


def _frame(opcode: int, payload: bytes, fin: bool, masked: bool) -> bytes:
    head = bytes(((0x80 if fin else 0) | opcode,))
    mask_bit = 0x80 if masked else 0
    if len(payload) < 126:
        head += bytes((mask_bit | len(payload),))
    else:
        head += bytes((mask_bit | 126,)) + len(payload).to_bytes(2, "big")
    if masked:
        head += b"\x01\x02\x03\x04"
        payload = bytes(b ^ (1, 2, 3, 4)[i % 4] for i, b in enumerate(payload))
    return head + payload


frames_ = st.builds(_frame, st.integers(0, 15), st.binary(max_size=200), st.booleans(),
                    st.booleans())


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(frames_, st.binary(max_size=30)), max_size=20),
       st.integers(1, 64))
def test_any_stream_to_the_frame_reader(parts, split):
    """Any bytes, split anywhere: events in order, a final Close or ProtocolError at
    most once, and never more than the message limit held."""
    reader = websocket.FrameReader(max_message_bytes=256)
    stream = b"".join(parts)
    ended = False
    for start in range(0, len(stream), split):
        events = reader.feed(stream[start:start + split])
        if ended:
            assert events == []
        for event in events:
            assert not ended
            if type(event) in (websocket.Close, websocket.ProtocolError):
                ended = True
            elif type(event) in (websocket.Text, websocket.Binary):
                assert len(event[0]) <= 256
