"""The client's sans-I/O parts: the native subscriber's rules, table by table, no sockets."""

import random

import pytest

from firehose_zmq import client
from firehose_zmq.wire import frames
from firehose_zmq.client import Message, SubscriberCore

EPOCH = 1000


def live(channel, seq, epoch=EPOCH, data=None):
    return frames.encode_message(frames.PubMessage(
        channel, seq, epoch, data if data is not None else b"m%d" % seq, None))


def decode(parts):
    return frames.decode_request(parts[0], 1 << 20)


def answer(core, now=0.0, seq=0, epoch=EPOCH, messages=(), ok=True):
    """Answer the oldest request in the core's outbox; returns that request."""
    request = decode(core.outbox.pop(0))
    if ok:
        body = frames.encode_reply(request["id"], seq=seq, epoch=epoch,
                                     messages=[[s, b"m%d" % s] for s in messages])
    else:
        body = frames.encode_error(request["id"], "unavailable", "down", "r")
    core.on_reply([body], now)
    return request


def events(core):
    out = list(core.events)
    core.events.clear()
    return [(e.seq, e.data) if isinstance(e, Message) else (e.first_seq, e.last_seq)
            for e in out]


def started(since=0, seq=3, messages=(3,), **options):
    core = SubscriberCore({"/a": since}, rng=random.Random(1), **options)
    core.start(0.0)
    answer(core, seq=seq, messages=messages)
    core.events.clear()
    return core


def test_new_subscriber_gets_newest_then_live_in_order():
    """since 0: the newest message (§5), then each live message once."""
    core = SubscriberCore({"/a": 0})
    core.start(0.0)
    request = answer(core, seq=5, messages=[5])
    assert request["since"] == 0 and "after" not in request
    for seq in (5, 6, 7, 7):
        core.on_message(live("/a", seq), 0.0)
    assert events(core) == [(5, b"m5"), (6, b"m6"), (7, b"m7")]
    assert core.duplicates == 2


def test_resume_fetches_everything_after_and_reports_what_fell_out():
    """since c > 0: every buffered message above c, and a Gap for the ones no longer kept."""
    core = SubscriberCore({"/a": 2})
    core.start(0.0)
    request = answer(core, seq=8, messages=[6, 7, 8])
    assert request["since"] == 2 and request["after"] is True
    assert events(core) == [(3, 5), (6, b"m6"), (7, b"m7"), (8, b"m8")]


def test_live_messages_during_the_first_fetch_are_held_and_deduplicated():
    """Subscribe then fetch: a message that arrives before the fetch answer is not lost."""
    core = SubscriberCore({"/a": 0})
    core.start(0.0)
    core.on_message(live("/a", 4), 0.0)
    core.on_message(live("/a", 5), 0.0)
    answer(core, seq=4, messages=[4])
    assert events(core) == [(4, b"m4"), (5, b"m5")]


@pytest.mark.parametrize("fill, expected", [
    ([4, 5, 6], [(4, b"m4"), (5, b"m5"), (6, b"m6"), (7, b"m7")]),
    ([5, 6], [(4, 4), (5, b"m5"), (6, b"m6"), (7, b"m7")]),
    ([], [(4, 6), (7, b"m7")]),
])
def test_a_gap_is_filled_by_fetch_after_or_reported(fill, expected):
    """A sequence jump fetches every message above floor; what is gone is one Gap."""
    core = started()
    core.on_message(live("/a", 7), 0.0)
    assert events(core) == []
    request = answer(core, seq=7, messages=fill + [7] if fill else [])
    assert request["since"] == 3 and request["after"] is True
    assert events(core) == expected
    core.on_message(live("/a", 8), 0.0)
    assert events(core) == [(8, b"m8")]


def test_new_epoch_starts_over_and_stale_epoch_is_dropped():
    """A channel that started over is followed from sequence 1; its old incarnation ignored."""
    core = started()
    core.on_message(live("/a", 1, epoch=EPOCH + 1), 0.0)
    core.on_message(live("/a", 4, epoch=EPOCH), 0.0)
    core.on_message(live("/a", 2, epoch=EPOCH + 1), 0.0)
    assert events(core) == [(1, b"m1"), (2, b"m2")]


def test_quiet_channel_is_probed_with_back_off_and_tail_loss_found():
    """After probe_interval_s without traffic the owner is asked; nothing new doubles the wait."""
    core = started(probe_interval_s=1.0, probe_max_s=4.0)
    assert core.next_timeout_s(0.0) == pytest.approx(1.0)
    core.tick(1.0)
    answer(core, now=1.0, seq=3)
    assert core.next_timeout_s(1.0) == pytest.approx(2.0)
    core.tick(3.0)
    answer(core, now=3.0, seq=5, messages=[4, 5])  # the newest two were dropped by the HWM
    assert events(core) == [(4, b"m4"), (5, b"m5")]
    assert core.filled == 2


def test_failed_fetch_is_retried_and_late_reply_ignored():
    """A fetch that times out or fails is retried later; its late answer changes nothing."""
    core = SubscriberCore({"/a": 0}, request_timeout_s=1.0, rng=random.Random(1))
    core.start(0.0)
    lost = core.outbox.pop(0)
    core.tick(1.5)
    assert core.outbox == []
    core.tick(1.5 + core.next_timeout_s(1.5))
    answer(core, now=2.0, ok=False)
    core.tick(2.0 + core.next_timeout_s(2.0))
    answer(core, now=3.0, seq=2, messages=[2])
    late = frames.encode_reply(decode(lost)["id"], seq=9, epoch=EPOCH, messages=[[9, b"x"]])
    core.on_reply([late], 3.0)
    assert events(core) == [(2, b"m2")]


def test_long_fills_are_paged():
    """A fill of more than fill_limit messages continues where the last page ended."""
    core = started(seq=1, messages=[1], fill_limit=2)
    core.on_message(live("/a", 6), 0.0)
    answer(core, seq=6, messages=[2, 3])
    request = answer(core, seq=6, messages=[4, 5])
    assert request["since"] == 3
    assert answer(core, seq=6, messages=[6])["since"] == 5
    assert [seq for seq, _ in events(core)] == [2, 3, 4, 5, 6]


def test_bad_frames_are_counted_not_raised():
    """A malformed message or reply is dropped and counted."""
    core = started()
    core.on_message([b"/a\x00", b"junk"], 0.0)
    core.on_reply([b"\xc1"], 0.0)
    core.on_reply([b"a", b"b"], 0.0)
    assert core.rejected_frames == 3 and events(core) == []


def test_invalid_channel_or_sequence_is_refused_at_once():
    """Channel names follow docs/protocol.md §1; resume sequences are ints >= 0."""
    with pytest.raises(ValueError):
        SubscriberCore({"no-slash": 0})
    with pytest.raises(ValueError):
        SubscriberCore({"/a": -1})


def test_backoff_has_full_jitter_and_a_cap():
    """Attempt n waits between 0 and min(cap, base * 2**n)."""
    backoff = client.Backoff(base_s=0.1, cap_s=1.0, rng=random.Random(3))
    delays = [backoff.next_delay_s() for _ in range(8)]
    bounds = [min(1.0, 0.1 * 2 ** n) for n in range(8)]
    assert all(0 <= d <= b for d, b in zip(delays, bounds))
    assert len(set(delays)) == 8


def test_consumer_program_resumes_backs_off_and_stops_on_4xx():
    """The long-poll program resumes by sequence, re-polls on 204, sleeps on 503, raises on 400."""
    program = client.consume_program("http://h/a", since=2,
                                     backoff=client.Backoff(rng=random.Random(0)))
    call = next(program)
    assert call.url == "http://h/a?last_message_sequence=2"
    emitted = program.send(client.HttpResponse(200, {}, b'{"message":"x","last_sequence":3}'))
    assert emitted.value == Message("/a", 3, "x")
    assert next(program).url.endswith("=3")
    assert program.send(client.HttpResponse(204, {}, b"")).url.endswith("=3")
    assert isinstance(program.send(client.HttpResponse(503, {}, b"down")), client.Sleep)
    assert isinstance(program.send(None), client.HttpCall)
    assert isinstance(program.throw(client.TransportError("refused")), client.Sleep)
    assert program.send(None).url.endswith("=3")
    with pytest.raises(client.ConsumeError):
        program.send(client.HttpResponse(400, {}, b"bad"))


def test_publish_program_sends_options_and_requires_202():
    """ttl, buffer size and persist become headers; anything but 202 raises PublishError."""
    program = client.publish_program("http://h/a", "hé", ttl_s=5, buffer_size=7, persist=True)
    call = next(program)
    assert (call.method, call.body) == ("PUT", "hé".encode())
    assert call.headers["X-Firehose-TTL"] == "5"
    assert call.headers["X-Firehose-Buffer-Size"] == "7"
    assert call.headers["X-Firehose-Persist"] == "true"
    with pytest.raises(client.PublishError) as error:
        program.send(client.HttpResponse(400, {}, b"X-Firehose-Buffer-Size too big\n"))
    assert error.value.status == 400 and "too big" in str(error.value)
