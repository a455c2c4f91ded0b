"""firehose-zmq: a Firehose-compatible pub/sub server on Tornado and ZeroMQ."""

__version__ = "0.1.0"
