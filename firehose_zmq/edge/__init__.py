"""firehose-edge: the HTTP, WebSocket, event-stream and native ZeroMQ face of a cluster.

``server`` is the process (``Edge``, ``main``); ``connection`` serves each client
connection; ``streams`` is the one WebSocket and event-stream implementation;
``fanout`` holds the waiting subscribers; ``backend`` is the link to the workers;
``native`` the ZeroMQ endpoints for programs.
"""
