"""Who may do what: credentials (``tokens``), the authorization callout (``callout``),
CURVE on the ZeroMQ links (``curve``) and the ``firehose-keys`` command (``keys``)."""
