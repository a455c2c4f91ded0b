"""Time-bucketed counters as Firehose 1.4 reported them."""

from firehose_zmq.metrics import TimeSeries


def test_counts_land_in_their_bucket():
    series = TimeSeries(bucket_s=5, keep=3)
    series.incr(100.0, "published", "/a")
    series.incr(101.0, "published", "/a")
    series.incr(106.0, "subscribed", "/b")
    report = series.report(107.0)
    assert [b["time"] for b in report] == [100, 105]
    assert report[0]["global"]["published"] == 2
    assert report[0]["channels"] == {"/a": {"published": 2}}
    assert report[0]["global"]["active_channels"] == 1
    assert report[1]["channels"] == {"/b": {"subscribed": 1}}


def test_only_the_newest_buckets_are_kept():
    series = TimeSeries(bucket_s=1, keep=3)
    for t in range(10):
        series.incr(float(t), "published")
    assert [b["time"] for b in series.report(9.5)] == [7, 8, 9]


def test_connections_gauge():
    series = TimeSeries()
    series.connection_opened(0.0)
    series.connection_opened(0.0)
    series.connection_closed(1.0)
    newest = series.report(2.0)[-1]["global"]
    assert (newest["connections"], newest["connections_opened"],
            newest["connections_closed"]) == (1, 2, 1)
