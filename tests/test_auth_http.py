"""Credentials on the HTTP edge: every publish, delete and subscription (long-poll,
multiplexed, event stream, WebSocket) needs a token that grants its channel, on both
serving paths; nothing is published or subscribed without one."""

import json
import time
import uuid

import jwt
import pytest

from .cluster import SERVING_PATHS, Cluster
from .http import request
from .streamclient import EventStreamReader, ws_connect, ws_recv

SECRET = "s" * 40


def token(publish=(), subscribe=(), exp_in_s=3600, nbf_in_s=None, secret=SECRET) -> str:
    claims = {"sub": "test", "exp": int(time.time()) + exp_in_s,
              "firehose": {"publish": list(publish), "subscribe": list(subscribe)}}
    if nbf_in_s is not None:
        claims["nbf"] = int(time.time()) + nbf_in_s
    return jwt.encode(claims, secret, algorithm="HS256")


def bearer(value: str) -> dict:
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture(scope="module", params=sorted(SERVING_PATHS))
def cluster(request, tmp_path_factory):
    tables = f'[auth]\npublish = "required"\nsubscribe = "required"\njwt_key = "{SECRET}"\n'
    with Cluster(tmp_path_factory.mktemp("auth"), long_poll_timeout_s=1.0, tables=tables,
                 edge_args=SERVING_PATHS[request.param]) as running:
        yield running


def fresh() -> str:
    return f"/auth/{uuid.uuid4().hex}"


WRITER = token(publish=["/auth/*"], subscribe=["/auth/*"])


def sequence_after_publish(cluster, channel) -> int:
    """Publish with a good token: the sequence shows how many were stored before."""
    answer = request(cluster.url(channel), "PUT", b"probe", headers=bearer(WRITER))
    assert answer.status == 202, answer
    return int(answer.header("X-Firehose-Sequence"))


@pytest.mark.parametrize("headers, status", [
    ({}, 401),
    (bearer("not-a-jwt"), 401),
    (bearer(token(publish=["/auth/*"], exp_in_s=-120)), 401),
    (bearer(token(publish=["/auth/*"], nbf_in_s=600)), 401),
    (bearer(token(publish=["/auth/*"], secret="t" * 40)), 401),
    (bearer(token(publish=["/other/*"])), 403),
    (bearer(token(subscribe=["/auth/*"])), 403),
])
def test_publish_without_the_right_token_is_refused_and_stores_nothing(cluster, headers,
                                                                        status):
    """Missing, invalid, expired, not yet valid, foreign or wrongly scoped: refused."""
    channel = fresh()
    answer = request(cluster.url(channel), "PUT", b"m", headers=headers)
    assert answer.status == status
    if status == 401:
        assert answer.header("WWW-Authenticate").startswith("Bearer")
    assert sequence_after_publish(cluster, channel) == 1


def test_delete_needs_a_publishing_token(cluster):
    channel = fresh()
    sequence_after_publish(cluster, channel)
    assert request(cluster.url(channel), "DELETE").status == 401
    assert request(cluster.url(channel), "DELETE",
                   headers=bearer(token(subscribe=["/auth/*"]))).status == 403
    assert sequence_after_publish(cluster, channel) == 2
    assert request(cluster.url(channel), "DELETE", headers=bearer(WRITER)).status == 204
    assert sequence_after_publish(cluster, channel) == 1


def test_long_poll_needs_a_subscribing_token_in_any_of_three_places(cluster):
    """Bearer header, cookie and query parameter all work; without, a JSON refusal."""
    channel = fresh()
    sequence_after_publish(cluster, channel)
    refused = request(cluster.url(channel))
    assert refused.status == 401
    assert json.loads(refused.body)["error"] == "Subscription failed"
    reader = token(subscribe=[channel])
    for answer in (request(cluster.url(channel), headers=bearer(reader)),
                   request(cluster.url(channel), headers={"Cookie": f"firehose_token={reader}"}),
                   request(cluster.url(f"{channel}?access_token={reader}"))):
        assert answer.status == 200, answer
        assert json.loads(answer.body) == {"message": "probe", "last_sequence": 1}
    other = request(cluster.url(channel), headers=bearer(token(subscribe=["/auth/x"])))
    assert other.status == 403


def test_multiplexed_long_poll_checks_every_channel(cluster):
    granted, withheld = fresh(), fresh()
    sequence_after_publish(cluster, granted)
    reader = bearer(token(subscribe=[granted]))
    url = cluster.url(f"/channels@firehose?subscribe={granted}!0,{withheld}!0")
    assert request(url, headers=reader).status == 403
    body = json.dumps({granted: 0}).encode()
    answer = request(cluster.url("/channels@firehose"), "POST", body, headers=reader)
    assert answer.status == 200
    assert json.loads(answer.body)["channel"] == granted
    body = json.dumps({granted: 0, withheld: 0}).encode()
    assert request(cluster.url("/channels@firehose"), "POST", body,
                   headers=reader).status == 403


def test_event_stream_with_a_token_in_its_url(cluster):
    """EventSource cannot set headers: the token rides in the query."""
    channel = fresh()
    sequence_after_publish(cluster, channel)
    assert request(cluster.url(channel), headers={"Accept": "text/event-stream"}).status == 401
    reader = token(subscribe=[channel])
    stream = EventStreamReader(cluster.url(f"{channel}?access_token={reader}"))
    try:
        assert stream.status == 200
        event = stream.read_event()
    finally:
        stream.close()
    assert event == {"id": "1", "data": "probe"}


def test_websocket_subscriptions_are_checked_per_channel(cluster, run):
    """A socket's upgrade carries the token; a multiplexed subscribe frame for a
    channel it does not grant gets a "Subscription failed" frame, the rest work."""
    granted, withheld = fresh(), fresh()
    sequence_after_publish(cluster, granted)
    sequence_after_publish(cluster, withheld)
    reader = token(subscribe=[granted])

    async def go():
        ws = await ws_connect(cluster, f"/channels@firehose?access_token={reader}")
        try:
            ws.write_message(json.dumps({"multiplex_subscribe": [
                {"channel": withheld, "message_sequence": 0},
                {"channel": granted, "message_sequence": 0}]}))
            frames = [await ws_recv(ws) for _ in range(2)]
        finally:
            ws.close()
        return frames
    refused, delivered = run(go())
    assert refused["error"] == "Subscription failed" and refused["channel"] == withheld
    assert delivered == {"channel": granted, "message": "probe", "last_sequence": 1}


def test_single_channel_websocket_upgrade_needs_the_token(cluster, run):
    channel = fresh()

    async def refused():
        try:
            await ws_connect(cluster, channel)
        except Exception as exc:  # the upgrade is answered 401
            return getattr(exc, "code", None) or str(exc)
        return None
    outcome = run(refused())
    assert outcome is not None
    sequence_after_publish(cluster, channel)

    async def allowed():
        ws = await ws_connect(cluster, f"{channel}?access_token={token(subscribe=[channel])}")
        try:
            ws.write_message(json.dumps({"message_sequence": 0}))
            return await ws_recv(ws)
        finally:
            ws.close()
    assert run(allowed()) == {"message": "probe", "last_sequence": 1}


def test_preflight_allows_writes_only_to_listed_origins(tmp_path):
    """With a CORS allow-list, a listed origin may PUT and DELETE; others get nothing."""
    config = 'cors_allow_origins = ["https://app.example"]'
    with Cluster(tmp_path, extra_config=config) as cluster:
        def preflight(origin):
            return request(cluster.url(fresh()), "OPTIONS", headers={
                "Origin": origin, "Access-Control-Request-Method": "PUT"})
        listed, other = preflight("https://app.example"), preflight("https://evil.example")
    assert listed.status == other.status == 204
    assert "PUT" in listed.header("Access-Control-Allow-Methods")
    assert listed.header("Access-Control-Allow-Origin") == "https://app.example"
    assert "PUT" not in other.header("Access-Control-Allow-Methods")
    assert other.header("Access-Control-Allow-Origin") is None


FILTER = '''
def accept(channel, params, credential):
    if channel.startswith("/boom"):
        raise RuntimeError("the filter broke")
    if channel.startswith("/private") and params.get("key") != "ok":
        return "private channels need key=ok"
    return None
'''


def test_subscription_filter_refuses_and_fails_closed(tmp_path, run):
    """PROTOCOL §8's hook: the operator's function refuses a long-poll (400, JSON), an
    event stream and a WebSocket subscribe frame; a filter that raises refuses (503)."""
    (tmp_path / "opfilter.py").write_text(FILTER)
    cluster = Cluster(tmp_path, long_poll_timeout_s=1.0,
                      tables='[auth]\nsubscription_filter = "opfilter:accept"\n')
    cluster.env["PYTHONPATH"] = str(tmp_path)
    with cluster:
        assert request(cluster.url("/private/a"), "PUT", b"p").status == 202
        refused = request(cluster.url("/private/a"))
        assert refused.status == 400
        assert json.loads(refused.body) == {"error": "Subscription failed",
                                            "reason": "'/private/a': private channels need key=ok"}
        assert request(cluster.url("/private/a"),
                       headers={"Accept": "text/event-stream"}).status == 400
        allowed = request(cluster.url("/private/a?key=ok"))
        assert allowed.status == 200 and json.loads(allowed.body)["message"] == "p"
        assert request(cluster.url("/boom/x")).status == 503
        assert request(cluster.url("/public/x?last_message_sequence=0"), "PUT", b"x").status \
            == 202

        async def frames():
            ws = await ws_connect(cluster, "/channels@firehose")
            try:
                ws.write_message(json.dumps({"multiplex_subscribe": [
                    {"channel": "/private/a", "message_sequence": 0},
                    {"channel": "/private/a2", "message_sequence": 0,
                     "params": {"key": "ok"}}]}))
                return [await ws_recv(ws)]
            finally:
                ws.close()
        (refused_frame,) = run(frames())
        assert refused_frame["error"] == "Subscription failed"
        assert refused_frame["channel"] == "/private/a"
