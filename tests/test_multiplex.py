"""Multiplexed long-poll on /channels@firehose (docs/protocol.md §4)."""

import itertools
import json

import pytest

from .http import request


@pytest.fixture(scope="module")
def cluster(cluster_on_both_paths):
    """This module's tests run on both serving paths."""
    return cluster_on_both_paths

_names = itertools.count()


def fresh():
    return f"/mx/{next(_names)}"


def publish(cluster, channel, body):
    assert request(cluster.url(channel), "PUT", body).status == 202


def test_get_subscribe_returns_first_available_with_channel(cluster):
    """?subscribe=/a!1,/b!0 answers with a message carrying its channel."""
    a, b = fresh(), fresh()
    publish(cluster, a, b"a1")
    r = request(cluster.url(f"/channels@firehose?subscribe={a}!1,{b}!0"))
    assert r.status == 204  # a is caught up at 1, b is empty
    publish(cluster, b, b"b1")
    r = request(cluster.url(f"/channels@firehose?subscribe={a}!1,{b}"))
    assert r.status == 200
    assert json.loads(r.body) == {"channel": b, "message": "b1", "last_sequence": 1}
    assert r.body.startswith(b'{"channel":')


def test_post_body_with_sequences_and_objects(cluster):
    """A JSON body maps channels to sequences, numeric strings, or objects."""
    a, b = fresh(), fresh()
    publish(cluster, a, b"a1")
    publish(cluster, a, b"a2")
    body = json.dumps({a: "1", b: {"last_message_sequence": 0}}).encode()
    r = request(cluster.url("/channels@firehose"), "POST", body,
                {"Content-Type": "text/plain"})
    assert json.loads(r.body) == {"channel": a, "message": "a2", "last_sequence": 2}


@pytest.mark.parametrize("body", [b"", b"[]", b"{}", b"not json", b'{"/a": -1}', b'{"nope": 1}',
                                  b'{"/a": [1]}'])
def test_bad_subscriptions_are_400_json(cluster, body):
    """Empty, non-object or unparseable subscriptions get 400 Subscription failed."""
    r = request(cluster.url("/channels@firehose"), "POST", body)
    assert r.status == 400
    document = json.loads(r.body)
    assert document["error"] == "Subscription failed"
    assert document["reason"]


def test_bad_query_subscription_is_400(cluster):
    """A missing or malformed ?subscribe= is 400."""
    for query in ("", "?subscribe=", "?subscribe=/a!x", "?subscribe=nope"):
        r = request(cluster.url("/channels@firehose" + query))
        assert r.status == 400, query
        assert json.loads(r.body)["error"] == "Subscription failed"


def test_percent_decoded_names_in_query(cluster):
    """Names in ?subscribe= are percent-decoded."""
    channel = fresh() + "/x y"
    publish(cluster, channel.replace(" ", "%20"), b"raw")
    publish(cluster, channel, b"decoded") if False else None
    r = request(cluster.url("/channels@firehose?subscribe=" + channel.replace(" ", "%2520")))
    assert json.loads(r.body)["message"] == "raw"
