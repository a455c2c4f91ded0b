"""The requests Tornado reads (``firehose-edge --no-fast-path``): one handler for all.

Tornado's ``HTTP1ServerConnection`` parses the request line, the fields and the
body; ``RequestHandler`` asks ``wire.http.Rules`` what the request means (the
same call a fast connection makes), reads a publish's body within the message
limit, then takes the connection (``detach()``) and gives the decided request to
a ``connection.Connection``, which answers it, becomes a stream, or gives the
socket back to Tornado for the next request. So every answer, error and stream
is the same code whichever side read the request.
"""

import tornado.web

from ..wire import http
from ..wire.http import HttpError


class _EveryMethod(tuple):
    """Tornado refuses a method not in ``SUPPORTED_METHODS`` before the handler runs;
    here the rules decide (``prepare`` answers every method they refuse)."""

    def __contains__(self, method) -> bool:
        return True


@tornado.web.stream_request_body
class RequestHandler(tornado.web.RequestHandler):
    """Every method on every path."""

    SUPPORTED_METHODS = _EveryMethod(("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT",
                                      "OPTIONS"))

    def initialize(self, server):
        self.server = server
        self.decided = None
        self.parsed_head = None
        self.parts: list = []
        self.size = 0
        self.collect = False

    def prepare(self):
        request = self.request
        rules = self.server.rules
        limit = self.server.edge.limits.max_message_bytes
        try:
            self.parsed_head = http.head_from_fields(
                request.method, request.uri, request.version, request.headers.get_all(),
                rules.max_head_bytes)
            self.decided = rules.decide(self.parsed_head)
        except HttpError as exc:
            self.decided = exc
            has_body = "Content-Length" in request.headers or \
                "Transfer-Encoding" in request.headers
            if exc.close or not has_body or request.method.lower() not in self._METHODS:
                exc.close = exc.close or has_body  # a body not read ends the connection
                return self._serve()
        self.collect = type(self.decided) in (http.Publish, http.ReadBody)
        # The bodies of other requests are read and dropped, within the same bound.
        request.connection.set_max_body_size(http.DISCARD_LIMIT_FACTOR * limit)

    def data_received(self, chunk):
        if not self.collect:
            return
        self.size += len(chunk)
        if self.size > self.server.edge.limits.max_message_bytes:
            self.collect = False
            self.parts = []
            self.decided = self.server.rules.too_large(close=False)
            return
        self.parts.append(chunk)

    def _serve(self, *args):
        stream = self.detach()
        conn = self.server.adopt(stream, (self.request.remote_ip, 0))
        conn.serve_decided(self.parsed_head, self.decided, b"".join(self.parts))

    get = head = post = delete = patch = put = options = _serve
    _METHODS = ("get", "head", "post", "delete", "patch", "put", "options")


def make_app(server) -> tornado.web.Application:
    return tornado.web.Application([(r".*", RequestHandler, {"server": server})],
                                   compress_response=False, log_function=lambda handler: None)
