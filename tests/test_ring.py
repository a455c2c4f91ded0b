"""Consistent hashing: stable, spread, and minimal movement when a worker joins."""

import pytest

from firehose_zmq.ring import Ring, stable_hash64

CHANNELS = [f"/channel/{i}" for i in range(10000)]


def test_assignments_are_pinned():
    """The same names land on the same workers in every process and release.

    Recorded from this implementation: a change here moves channels between the
    workers of a live cluster, so it must be deliberate.
    """
    assert stable_hash64(b"/chat") == 0xd2849b8c0b7506c7
    ring = Ring(["w1", "w2", "w3"])
    assert [ring.owner(c) for c in ("/a", "/b", "/chat", "/rooms/1", "/x/y/z")] == \
        ["w3", "w1", "w3", "w2", "w1"]


def test_owner_does_not_depend_on_list_order():
    """Workers listed in any order give the same ring."""
    a, b = Ring(["w1", "w2", "w3"]), Ring(["w3", "w1", "w2"])
    assert all(a.owner(c) == b.owner(c) for c in CHANNELS[:500])
    assert a.version == b.version


def test_spread_is_even():
    """With 160 virtual nodes each of three workers gets roughly a third."""
    ring = Ring(["w1", "w2", "w3"])
    counts = {}
    for channel in CHANNELS:
        owner = ring.owner(channel)
        counts[owner] = counts.get(owner, 0) + 1
    assert set(counts) == {"w1", "w2", "w3"}
    assert all(2800 <= n <= 3900 for n in counts.values()), counts


def test_adding_a_fourth_worker_moves_about_a_quarter():
    """Going from 3 to 4 workers moves ~1/4 of the channels, all of them to the new one."""
    before, after = Ring(["w1", "w2", "w3"]), Ring(["w1", "w2", "w3", "w4"])
    moved = [c for c in CHANNELS if before.owner(c) != after.owner(c)]
    assert all(after.owner(c) == "w4" for c in moved)
    assert 0.18 <= len(moved) / len(CHANNELS) <= 0.30, len(moved)


def test_version_changes_with_membership():
    assert Ring(["w1", "w2"]).version != Ring(["w1", "w2", "w3"]).version


@pytest.mark.parametrize("ids", [[], ["w1", "w1"]])
def test_bad_worker_lists_are_refused(ids):
    with pytest.raises(ValueError):
        Ring(ids)
