"""What crosses the wire, without I/O: ZeroMQ frames (``frames``), channel names
(``names``), HTTP rules (``http``), WebSocket framing (``websocket``), and the
Firehose stream frames and event-stream format (``events``)."""
