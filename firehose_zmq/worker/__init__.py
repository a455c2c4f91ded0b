"""firehose-worker: owns the channels the ring gives it.

``server`` is the process (its ZeroMQ loop, sequencing, ``main``); ``channel`` the
pure per-channel state and buffer rules; ``store`` the durable SQLite store.
"""
