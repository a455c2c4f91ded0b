"""RFC 6455 framing (wsframe.py), without sockets; and once against Tornado's client."""

import asyncio
import base64
import os
import random

import pytest
import tornado.websocket

from firehose_zmq.wire import websocket as wf

RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 §1.3


def upgrade_headers(**changes):
    headers = {"host": "example.com", "upgrade": "websocket", "connection": "Upgrade",
               "sec-websocket-key": RFC_KEY, "sec-websocket-version": "13"}
    for name, value in changes.items():
        name = name.replace("_", "-")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return headers


def client_frame(opcode, payload=b"", fin=True, rsv=0, masked=True, mask=b"\x37\xfa\x21\x3d",
                 length=None):
    """A client frame built independently of the module; ``length`` overrides the head's."""
    n = len(payload) if length is None else length
    head = bytes((fin << 7 | rsv << 4 | opcode,))
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes((mask_bit | n,))
    elif n < 65536:
        head += bytes((mask_bit | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((mask_bit | 127,)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_frame(frame):
    """(fin, opcode, payload) of one whole unmasked server frame; checks the minimal length."""
    fin, opcode, n = frame[0] >> 7, frame[0] & 0x0F, frame[1] & 0x7F
    assert frame[0] & 0x70 == 0 and frame[1] & 0x80 == 0
    start = 2
    if n == 126:
        n, start = int.from_bytes(frame[2:4], "big"), 4
        assert n >= 126
    elif n == 127:
        n, start = int.from_bytes(frame[2:10], "big"), 10
        assert n >= 65536
    assert len(frame) == start + n
    return fin, opcode, frame[start:]


def feed_all(reader, data, chunk_sizes=None):
    """Every event of ``data`` fed in chunks (all at once by default)."""
    if chunk_sizes is None:
        return reader.feed(data)
    events, pos = [], 0
    for size in chunk_sizes:
        events += reader.feed(data[pos:pos + size])
        pos += size
    return events + reader.feed(data[pos:])


# -- Opening handshake ------------------------------------------------------------

def test_handshake_accepts_the_rfc_example_key():
    """The RFC 6455 §1.3 example key gives the RFC's accept value."""
    assert wf.handshake("GET", upgrade_headers()) == RFC_ACCEPT


@pytest.mark.parametrize("changes", [
    {"upgrade": "WebSocket"}, {"upgrade": "websocket, h2c"},
    {"connection": "keep-alive, Upgrade"}, {"connection": "upgrade"},
    {"sec_websocket_version": " 13 "},
    {"sec_websocket_extensions": "permessage-deflate; client_max_window_bits"},
])
def test_handshake_accepts_what_browsers_send(changes):
    """Header values are case-insensitive token lists; extension offers are not an error."""
    assert wf.handshake("GET", upgrade_headers(**changes)) == RFC_ACCEPT


@pytest.mark.parametrize("method, changes", [
    ("POST", {}),
    ("get", {}),
    ("GET", {"upgrade": None}),
    ("GET", {"upgrade": "h2c"}),
    ("GET", {"connection": None}),
    ("GET", {"connection": "keep-alive"}),
    ("GET", {"connection": "upgrade-insecure"}),
    ("GET", {"sec_websocket_key": None}),
    ("GET", {"sec_websocket_key": "not base64!"}),
    ("GET", {"sec_websocket_key": base64.b64encode(b"x" * 15).decode()}),
    ("GET", {"sec_websocket_key": base64.b64encode(b"x" * 17).decode()}),
    ("GET", {"sec_websocket_key": "dGhlIHNhbXBsZSBub25jZQ"}),  # padding missing
    ("GET", {"sec_websocket_key": "dGhlIHNhbXBsZSBub25jZQ==é"}),
])
def test_handshake_rejects_bad_requests_with_400(method, changes):
    """A request that is not a valid upgrade gets a 400 with a one-line reason."""
    with pytest.raises(wf.HandshakeError) as caught:
        wf.handshake(method, upgrade_headers(**changes))
    assert caught.value.status == 400
    assert caught.value.reason and "\n" not in caught.value.reason
    assert caught.value.headers == ()


@pytest.mark.parametrize("version", [None, "8", "12", "14", "13, 8", ""])
def test_handshake_answers_other_versions_with_426_and_advice(version):
    """Any version but 13 gets 426 and the headers that name version 13."""
    with pytest.raises(wf.HandshakeError) as caught:
        wf.handshake("GET", upgrade_headers(sec_websocket_version=version))
    assert caught.value.status == 426
    assert "\n" not in caught.value.reason
    assert ("Sec-WebSocket-Version", "13") in caught.value.headers
    assert ("Upgrade", "websocket") in caught.value.headers


def test_response_head():
    """The 101 head: accept value, no extension or subprotocol, blank line."""
    assert wf.response_head(RFC_ACCEPT) == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")


# -- Server frames ----------------------------------------------------------------

BOUNDARY_SIZES = [0, 1, 125, 126, 127, 4095, 4096, 65535, 65536, 65537]


@pytest.mark.parametrize("size", BOUNDARY_SIZES + random.Random(6455).sample(range(70000), 8))
def test_encode_text_round_trips_across_length_boundaries(size):
    """Text frames use the shortest length form and carry the payload unchanged."""
    payload = bytes(random.Random(size).choices(b"abc{}\":,", k=size))
    frame = wf.encode_text(payload)
    assert server_frame(frame) == (1, wf.OP_TEXT, payload)
    assert len(frame) - size == (2 if size < 126 else 4 if size < 65536 else 10)


def test_encode_text_accepts_bytearray_and_memoryview():
    """Payloads built in a buffer need no copy to bytes first."""
    assert wf.encode_text(bytearray(b"hi")) == wf.encode_text(memoryview(b"hi")) == b"\x81\x02hi"


def test_control_frames():
    """Ping, pong and close frames; control payloads over 125 bytes are refused."""
    assert wf.encode_ping() == b"\x89\x00"
    assert wf.encode_ping(b"p") == b"\x89\x01p"
    assert wf.encode_pong(b"x" * 125) == b"\x8a\x7d" + b"x" * 125
    assert wf.encode_close() == b"\x88\x02\x03\xe8"
    assert wf.encode_close(1008, "slow") == b"\x88\x06\x03\xf0slow"
    with pytest.raises(ValueError):
        wf.encode_ping(b"x" * 126)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000])
def test_encode_close_refuses_codes_that_may_not_be_sent(code):
    """Reserved and unassigned codes never go on the wire."""
    with pytest.raises(ValueError):
        wf.encode_close(code)


def test_encode_close_cuts_a_long_reason_at_a_character_boundary():
    """A close reason is cut to fit 125 bytes without splitting a UTF-8 sequence."""
    frame = wf.encode_close(1011, "é" * 100)
    fin, opcode, payload = server_frame(frame)
    assert opcode == wf.OP_CLOSE and len(payload) <= 125
    assert payload[2:].decode("utf-8") == "é" * 61


def test_close_reply_echoes_the_code():
    """The answer to a close echoes its code; a close without a code gets an empty one."""
    assert wf.close_reply(wf.Close(4001, "bye")) == b"\x88\x02\x0f\xa1"
    assert wf.close_reply(wf.Close(wf.CLOSE_NO_STATUS, "")) == b"\x88\x00"


# -- Client frames ----------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 4095, 4096, 4097, 70001])
def test_unmask_matches_the_rfc_definition(size):
    """Both unmasking methods (small and large payloads) give payload XOR mask."""
    payload, mask = random.Random(size).randbytes(size), b"\x01\x80\xfe\x7f"
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert wf.unmask(mask, payload) == expected
    assert wf.unmask(mask, bytearray(payload)) == expected


@pytest.mark.parametrize("size", BOUNDARY_SIZES + random.Random(17).sample(range(70000), 8))
def test_reader_round_trips_across_length_boundaries(size):
    """Text and binary frames of every length form come back whole."""
    rng = random.Random(size)
    text = "".join(rng.choices("aé€𝄞{}", k=size // 3))
    data = rng.randbytes(size)
    reader = wf.FrameReader(max_message_bytes=1 << 20)
    frames = client_frame(wf.OP_TEXT, text.encode(), mask=os.urandom(4)) + \
        client_frame(wf.OP_BINARY, data, mask=os.urandom(4))
    assert reader.feed(frames) == [wf.Text(text), wf.Binary(data)]


def conversation():
    """Client frames of every kind, ending with a close, and the events they give."""
    frames = b"".join([
        client_frame(wf.OP_TEXT, b'{"ping":"PING"}'),
        client_frame(wf.OP_PING, b"are you there"),
        client_frame(wf.OP_TEXT, "caf".encode(), fin=False),
        client_frame(wf.OP_PONG, b""),
        client_frame(wf.OP_CONTINUATION, "é".encode()[:1], fin=False),
        client_frame(wf.OP_PING, b""),
        client_frame(wf.OP_CONTINUATION, "é".encode()[1:] + b"!"),
        client_frame(wf.OP_BINARY, bytes(300), fin=False),
        client_frame(wf.OP_CONTINUATION, b"", fin=False),
        client_frame(wf.OP_CONTINUATION, bytes(70000)),
        client_frame(wf.OP_TEXT, b""),
        client_frame(wf.OP_CLOSE, b"\x03\xe8done"),
    ])
    events = [wf.Text('{"ping":"PING"}'), wf.Ping(b"are you there"), wf.Pong(b""),
              wf.Ping(b""), wf.Text("café!"), wf.Binary(bytes(70300)), wf.Text(""),
              wf.Close(1000, "done")]
    return frames, events


def test_many_frames_in_one_chunk():
    """One chunk holding many frames gives every event, in order."""
    frames, events = conversation()
    assert wf.FrameReader().feed(frames) == events


def test_byte_by_byte():
    """Frames split at every byte boundary give the same events."""
    frames, events = conversation()
    reader = wf.FrameReader()
    assert feed_all(reader, frames, [1] * len(frames)) == events


@pytest.mark.parametrize("seed", range(20))
def test_random_chunks(seed):
    """Frames split at random places give the same events."""
    frames, events = conversation()
    rng = random.Random(seed)
    sizes = [rng.choice([1, 2, 3, 7, 14, 100, 4000, 65536]) for _ in range(len(frames))]
    assert feed_all(wf.FrameReader(), frames, sizes) == events


def test_control_frames_inside_a_fragmented_message_come_first():
    """A ping between fragments is answered before the message is whole."""
    reader = wf.FrameReader()
    assert reader.feed(client_frame(wf.OP_TEXT, b"a", fin=False)) == []
    assert reader.feed(client_frame(wf.OP_PING, b"1")) == [wf.Ping(b"1")]
    assert reader.feed(client_frame(wf.OP_CONTINUATION, b"b", fin=False)) == []
    assert reader.feed(client_frame(wf.OP_CONTINUATION, b"c")) == [wf.Text("abc")]
    assert reader.feed(client_frame(wf.OP_TEXT, b"d")) == [wf.Text("d")]


def test_close_frames():
    """A close without payload reports 1005; a code and reason come through."""
    assert wf.FrameReader().feed(client_frame(wf.OP_CLOSE)) == [wf.Close(wf.CLOSE_NO_STATUS, "")]
    assert wf.FrameReader().feed(client_frame(wf.OP_CLOSE, b"\x0f\xa1bye \xe2\x82\xac")) == \
        [wf.Close(4001, "bye €")]


def test_nothing_after_a_close():
    """Bytes after a close frame, even broken ones, are ignored."""
    reader = wf.FrameReader()
    chunk = client_frame(wf.OP_TEXT, b"a") + client_frame(wf.OP_CLOSE) + \
        client_frame(wf.OP_TEXT, b"b")
    assert reader.feed(chunk) == [wf.Text("a"), wf.Close(wf.CLOSE_NO_STATUS, "")]
    assert reader.feed(client_frame(wf.OP_TEXT, b"c", masked=False)) == []


def start(opcode):
    """A fragment that starts a message."""
    return client_frame(opcode, b"part", fin=False)


PROTOCOL_ERRORS = [
    ("unmasked text", client_frame(wf.OP_TEXT, b"hi", masked=False), 1002),
    ("unmasked close", client_frame(wf.OP_CLOSE, b"", masked=False), 1002),
    ("rsv1 (no permessage-deflate)", client_frame(wf.OP_TEXT, b"hi", rsv=4), 1002),
    ("rsv2", client_frame(wf.OP_TEXT, b"hi", rsv=2), 1002),
    ("rsv3", client_frame(wf.OP_PING, b"", rsv=1), 1002),
    ("opcode 3", client_frame(3, b""), 1002),
    ("opcode 7", client_frame(7, b""), 1002),
    ("opcode 0xb", client_frame(0xB, b""), 1002),
    ("opcode 0xf", client_frame(0xF, b""), 1002),
    ("ping of 126 bytes", client_frame(wf.OP_PING, bytes(126)), 1002),
    ("close of 126 bytes", client_frame(wf.OP_CLOSE, b"\x03\xe8" + bytes(124)), 1002),
    ("fragmented ping", client_frame(wf.OP_PING, b"", fin=False), 1002),
    ("fragmented close", client_frame(wf.OP_CLOSE, b"", fin=False), 1002),
    ("continuation first", client_frame(wf.OP_CONTINUATION, b"x"), 1002),
    ("continuation after a whole message",
     client_frame(wf.OP_TEXT, b"x") + client_frame(wf.OP_CONTINUATION, b"y"), 1002),
    ("text inside a fragmented text", start(wf.OP_TEXT) + client_frame(wf.OP_TEXT, b"x"), 1002),
    ("binary inside a fragmented text",
     start(wf.OP_TEXT) + client_frame(wf.OP_BINARY, b"x"), 1002),
    ("text inside a fragmented binary",
     start(wf.OP_BINARY) + client_frame(wf.OP_TEXT, b"x", fin=False), 1002),
    ("64-bit length with the high bit set",
     client_frame(wf.OP_BINARY, b"", length=1 << 63)[:14], 1002),
    ("close with a 1-byte payload", client_frame(wf.OP_CLOSE, b"\x03"), 1002),
    ("close code 999", client_frame(wf.OP_CLOSE, (999).to_bytes(2, "big")), 1002),
    ("close code 1004", client_frame(wf.OP_CLOSE, (1004).to_bytes(2, "big")), 1002),
    ("close code 1005", client_frame(wf.OP_CLOSE, (1005).to_bytes(2, "big")), 1002),
    ("close code 1006", client_frame(wf.OP_CLOSE, (1006).to_bytes(2, "big")), 1002),
    ("close code 1015", client_frame(wf.OP_CLOSE, (1015).to_bytes(2, "big")), 1002),
    ("close code 2999", client_frame(wf.OP_CLOSE, (2999).to_bytes(2, "big")), 1002),
    ("close code 5000", client_frame(wf.OP_CLOSE, (5000).to_bytes(2, "big")), 1002),
    ("close reason not UTF-8", client_frame(wf.OP_CLOSE, b"\x03\xe8\xff"), 1002),
    ("text not UTF-8", client_frame(wf.OP_TEXT, b"\xff"), 1007),
    ("text with a surrogate", client_frame(wf.OP_TEXT, b"\xed\xa0\x80"), 1007),
    ("text cut inside a character", client_frame(wf.OP_TEXT, "é".encode()[:1]), 1007),
    ("fragmented text not UTF-8 when whole",
     client_frame(wf.OP_TEXT, b"ok", fin=False) + client_frame(wf.OP_CONTINUATION, b"\xc3"),
     1007),
    ("one frame over the limit", client_frame(wf.OP_BINARY, bytes(101)), 1009),
    ("a fragmented message over the limit",
     client_frame(wf.OP_TEXT, bytes(60), fin=False)
     + client_frame(wf.OP_CONTINUATION, bytes(41)), 1009),
    ("a declared length over the limit, payload not sent",
     client_frame(wf.OP_TEXT, b"", length=1 << 40)[:14], 1009),
    ("a 16-bit declared length over the limit, payload not sent",
     client_frame(wf.OP_TEXT, b"", length=200)[:8], 1009),
]


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "byte-by-byte"])
@pytest.mark.parametrize("name, frames, code", PROTOCOL_ERRORS, ids=[r[0] for r in PROTOCOL_ERRORS])
def test_protocol_errors(name, frames, code, chunked):
    """Each violation ends the events with a ProtocolError carrying its close code."""
    reader = wf.FrameReader(max_message_bytes=100)
    events = feed_all(reader, frames, [1] * len(frames) if chunked else None)
    assert isinstance(events[-1], wf.ProtocolError)
    assert events[-1].code == code and events[-1].reason
    assert wf.encode_close(events[-1].code, events[-1].reason)  # a code the server may send
    assert all(not isinstance(event, wf.ProtocolError) for event in events[:-1])


def test_events_before_a_protocol_error_are_kept_and_later_bytes_ignored():
    """Frames before the bad one take effect; the reader then stays silent."""
    reader = wf.FrameReader()
    chunk = client_frame(wf.OP_TEXT, b"a") + client_frame(wf.OP_PING, b"p") + \
        client_frame(wf.OP_TEXT, b"b", masked=False) + client_frame(wf.OP_TEXT, b"c")
    assert reader.feed(chunk) == [wf.Text("a"), wf.Ping(b"p"),
                                  wf.ProtocolError(1002, "client frames must be masked")]
    assert reader.feed(client_frame(wf.OP_TEXT, b"d")) == []


def test_message_exactly_at_the_limit_is_accepted():
    """max_message_bytes is the largest message allowed, fragments summed."""
    reader = wf.FrameReader(max_message_bytes=100)
    assert reader.feed(client_frame(wf.OP_BINARY, bytes(100))) == [wf.Binary(bytes(100))]
    assert reader.feed(client_frame(wf.OP_TEXT, b"a" * 60, fin=False)
                       + client_frame(wf.OP_PING, b"x" * 125)
                       + client_frame(wf.OP_CONTINUATION, b"b" * 40)) == \
        [wf.Ping(b"x" * 125), wf.Text("a" * 60 + "b" * 40)]


def test_declared_length_over_the_limit_fails_before_the_payload():
    """A too-long frame is refused from its head, without waiting for its payload."""
    reader = wf.FrameReader(max_message_bytes=1000)
    head = client_frame(wf.OP_BINARY, b"", length=5000)[:8]
    assert reader.feed(head[:4]) == []
    assert reader.feed(head[4:]) == [wf.ProtocolError(1009, "a message over 1000 bytes")]


# -- Against Tornado's client -------------------------------------------------------

async def echo_server_connection(reader, writer, log):
    """A WebSocket echo server built on wsframe: text echoed, pings answered,
    ``close-me`` closes with 4002; every event is appended to ``log``."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
        method = request_line.split(" ")[0]
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        try:
            accept = wf.handshake(method, headers)
        except wf.HandshakeError as exc:
            extra = "".join(f"{name}: {value}\r\n" for name, value in exc.headers)
            writer.write(f"HTTP/1.1 {exc.status} No\r\n{extra}Content-Length: 0\r\n\r\n"
                         .encode())
            return
        writer.write(wf.response_head(accept))
        frames = wf.FrameReader(max_message_bytes=1 << 20)
        closing = False
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for event in frames.feed(data):
                log.append(event)
                if type(event) is wf.Text:
                    if event.text == "close-me":
                        writer.write(wf.encode_close(4002, "asked"))
                        closing = True
                    elif not closing:
                        writer.write(wf.encode_text(event.text.encode()))
                elif type(event) is wf.Ping:
                    writer.write(wf.encode_pong(event.payload))
                elif type(event) is wf.Close:
                    if not closing:
                        writer.write(wf.close_reply(event))
                    return
                elif type(event) is wf.ProtocolError:
                    writer.write(wf.encode_close(event.code, event.reason))
                    return
    finally:
        writer.close()


async def tornado_client_session(timeout_s=10.0):
    """Tornado's client talks to the echo server; returns what both sides saw."""
    log = []
    handlers = set()

    async def on_connection(reader, writer):
        handlers.add(asyncio.current_task())
        await echo_server_connection(reader, writer, log)

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"ws://127.0.0.1:{port}/channel"
    seen = {}
    try:
        # The client offers permessage-deflate; the server does not accept it.
        conn = await asyncio.wait_for(tornado.websocket.websocket_connect(
            url, compression_options={}), timeout_s)
        pongs = asyncio.Queue()
        conn.on_pong = pongs.put_nowait
        big = "x€" * 23334  # 70 KB of UTF-8: a 64-bit length, several reads
        for text in ["hello", "", "é" * 63, big]:
            await conn.write_message(text)
            assert await asyncio.wait_for(conn.read_message(), timeout_s) == text
        conn.ping(b"are you there")
        assert await asyncio.wait_for(pongs.get(), timeout_s) == b"are you there"
        conn.close(4001, "bye")
        assert await asyncio.wait_for(conn.read_message(), timeout_s) is None
        seen["client_close"] = (conn.close_code, conn.close_reason)

        conn = await asyncio.wait_for(tornado.websocket.websocket_connect(url), timeout_s)
        await conn.write_message("close-me")
        assert await asyncio.wait_for(conn.read_message(), timeout_s) is None
        seen["server_close"] = (conn.close_code, conn.close_reason)
        conn.close()  # already closed by the server: only releases the client's side
        await asyncio.wait_for(asyncio.gather(*handlers), timeout_s)
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), timeout_s)
    seen["server_log"] = log
    return seen


def test_tornado_client_interoperates(run):
    """Tornado's websocket_connect: handshake, echoes up to 70 KB, ping, both closes."""
    seen = run(tornado_client_session(), timeout_s=30)
    assert seen["client_close"] == (4001, None)  # the server echoes the code only
    assert seen["server_close"] == (4002, "asked")
    log = seen["server_log"]
    assert wf.Close(4001, "bye") in log
    assert log[-1] == wf.Close(4002, "")  # Tornado echoes the server's code
    assert not any(isinstance(event, wf.ProtocolError) for event in log)
