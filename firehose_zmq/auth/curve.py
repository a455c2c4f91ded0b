"""CURVE on every ZeroMQ link: the one place sockets get their keys, and the ZAP handler.

Which key each socket uses (``[curve]`` in the config; nothing happens unless
``enabled = true``)::

    worker ROUTER, XPUB          secure_server(sock, config, worker_id)
        server key pair curve.worker_secret_keys[worker_id];
        admits curve.edge_key and curve.worker_clients        (ZAP domain firehose-worker)
    edge native XPUB, ROUTER     secure_server(sock, config, NATIVE)
        server key pair curve.native_secret_key;
        admits every curve.native_clients key                 (ZAP domain firehose-native)
    edge DEALER, SUB, XSUB       secure_client(sock, config, worker_id)   before each connect
        client key pair curve.edge_secret_key; server key curve.worker_keys[worker_id]

A key file is ZeroMQ's certificate format as ``firehose-keys`` writes it:
``NAME.key`` holds the public key, ``NAME.key_secret`` both halves and must not
be readable by group or others. A key file that cannot be used raises
``KeyFileError`` (a ConfigError and an OSError, so both entry points report it
in one line).

ZAP: libzmq asks ``inproc://zeromq.zap.01`` of the socket's own context, so
there is one handler per context (pyzmq's ``ThreadAuthenticator``, a daemon
thread); it is made by the first server socket of a context and kept here,
keyed weakly by that context. It answers every CURVE handshake from the keys
configured for the socket's domain and logs refused keys (rate-limited).

A native client's key also carries channel rights (``NativeRights``): the
native ROUTER receives each request's sender key as the ``User-Id`` property
of its frames, and the native XPUB (in ``ZMQ_XPUB_MANUAL`` mode) each
subscription's.
"""

import logging
import os
import stat
import threading
import weakref

import zmq
from zmq.auth.thread import ThreadAuthenticator

from ..config import ConfigError
from .tokens import NO_RIGHTS, AuthError, Rights

log = logging.getLogger("firehose.curve")

NATIVE = "native"
WORKER_DOMAIN = "firehose-worker"
NATIVE_DOMAIN = "firehose-native"

# Monitor events of a failed handshake (libzmq >= 4.3).
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class KeyFileError(ConfigError, OSError):
    """A CURVE key file that cannot be used; the message names the file and why."""


def load_public_key(path: str) -> bytes:
    """The z85 public key of a key file (``NAME.key`` or ``NAME.key_secret``)."""
    return _load(path)[0]


def load_key_pair(path: str) -> tuple:
    """(public, secret) z85 keys of a ``NAME.key_secret`` file only its owner can read."""
    public, secret = _load(path)
    if secret is None:
        raise KeyFileError(f"CURVE key {path} holds no secret key: give the .key_secret file")
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"CURVE secret key {path} is readable by others "
                           f"(mode {stat.S_IMODE(mode):04o}): chmod 600 it")
    return public, secret


def _load(path: str) -> tuple:
    if not path:
        raise KeyFileError("a CURVE key file is not configured (see [curve])")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise KeyFileError(f"cannot read CURVE key {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise KeyFileError(f"CURVE key {path}: {exc}") from None
    for key in (public, secret):
        if key is not None and len(key) != 40:
            raise KeyFileError(f"CURVE key {path}: a key is 40 z85 characters")
    return public, secret


class ZapHandler:
    """The admitted client keys of every domain of one context, answering ZAP."""

    def __init__(self, context):
        self._admitted = {}  # domain -> {z85 public key: name}
        self._lock = threading.Lock()
        self.refused = 0
        self._authenticator = ThreadAuthenticator(context, log=logging.getLogger("firehose.zap"))
        self._authenticator.start()

    def admit(self, domain: str, keys: dict) -> None:
        """Admit ``keys`` ({z85 key: name}) on ``domain`` (in addition to earlier ones)."""
        with self._lock:
            known = self._admitted.setdefault(domain, {})
            known.update(keys)
        self._authenticator.configure_curve_callback(domain, self)

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the ZAP thread for each CURVE handshake."""
        with self._lock:
            allowed = key in self._admitted.get(domain, ())
            if not allowed:
                self.refused += 1
                count = self.refused
        if not allowed and (count <= 10 or count % 1000 == 0):
            log.warning("CURVE: refused client key %s on %s (%d refused so far): not in the "
                        "config", key.decode("ascii", "replace"), domain, count)
        return allowed

    def stop(self) -> None:
        self._authenticator.stop()


_handlers = weakref.WeakKeyDictionary()
_handlers_lock = threading.Lock()


def zap_handler(context) -> ZapHandler:
    """The ZAP handler of ``context``, started on first use."""
    with _handlers_lock:
        handler = _handlers.get(context)
        if handler is None:
            handler = _handlers[context] = ZapHandler(context)
        return handler


def _server_role(config, role: str) -> tuple:
    """(secret key file, ZAP domain, {admitted key: name}) of a server socket's role."""
    curve = config.curve
    if role == NATIVE:
        admitted = {load_public_key(c.key): c.key for c in curve.native_clients}
        return curve.native_secret_key, NATIVE_DOMAIN, admitted
    secrets = dict(curve.worker_secret_keys)
    if role not in secrets:
        raise KeyFileError(f"curve.worker_secret_keys has no key for worker {role}")
    admitted = {load_public_key(path): path for path in (curve.edge_key, *curve.worker_clients)}
    return secrets[role], WORKER_DOMAIN, admitted


def secure_server(sock, config, role: str) -> None:
    """Make ``sock`` (before it binds) a CURVE server for ``role``: a worker id or NATIVE.

    Raises KeyFileError when a key file cannot be used."""
    if not config.curve.enabled:
        return
    secret_file, domain, admitted = _server_role(config, role)
    public, secret = load_key_pair(secret_file)
    zap_handler(sock.context).admit(domain, admitted)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.CURVE_SERVER, 1)


def secure_client(sock, config, worker_id: str) -> None:
    """Give ``sock`` the edge's client key pair and ``worker_id``'s server key; call it
    right before each ``connect`` (the server key is taken at connect time)."""
    if not config.curve.enabled:
        return
    public, secret = load_key_pair(config.curve.edge_secret_key)
    keys = dict(config.curve.worker_keys)
    if worker_id not in keys:
        raise KeyFileError(f"curve.worker_keys has no key for worker {worker_id}")
    sock.setsockopt(zmq.CURVE_SERVERKEY, load_public_key(keys[worker_id]))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)


def client_keys(sock, server_public: bytes, public: bytes, secret: bytes) -> None:
    """Set a client's own key pair and the server key it expects (native clients, tests)."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)


_HANDSHAKE_REASONS = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        "the CURVE handshake failed: the worker does not hold the secret half of "
        "curve.worker_keys[{worker}] (wrong server key?)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        "the handshake failed (ZMTP protocol error {value:#x}): is CURVE on at both ends?",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        "the worker refused this edge's key (ZAP status {value}): is curve.edge_key the public "
        "half of curve.edge_secret_key, and the same file the worker reads?",
}


class HandshakeWatch:
    """Logs the failed handshakes of an edge's links to the workers: the 1st, 10th,
    100th ... of each worker, so a link that keeps retrying does not flood the log."""

    def __init__(self, logger):
        self._log = logger
        self._failures = {}

    def failed(self, worker_id: str, event: dict) -> None:
        """``event`` is ``zmq.utils.monitor.parse_monitor_message``'s dict."""
        count = self._failures.get(worker_id, 0) + 1
        self._failures[worker_id] = count
        if count == 1 or count in (10, 100) or count % 1000 == 0:
            reason = _HANDSHAKE_REASONS.get(event["event"], "the handshake failed ({value})")
            self._log.warning("worker %s unreachable (%d failed handshakes): %s", worker_id, count,
                              reason.format(worker=worker_id, value=event["value"]))


_NATIVE_OPS = {"publish": "publish", "delete": "publish", "fetch": "subscribe"}


class NativeRights:
    """The channel rights of each native client key (``curve.native_clients``)."""

    def __init__(self, config):
        self._by_key = {}
        self.enabled = config.curve.enabled
        if self.enabled:
            for client in config.curve.native_clients:
                try:
                    rights = Rights(client.publish, client.subscribe)
                except ValueError as exc:
                    raise ConfigError(f"curve.native_clients {client.key}: {exc}") from None
                self._by_key[load_public_key(client.key).decode("ascii")] = rights

    def rights_of(self, user_id) -> Rights:
        """The rights of a frame's ``User-Id`` (the client's z85 key); none for others."""
        return self._by_key.get(user_id, NO_RIGHTS)

    def check_request(self, request: dict, frame) -> None:
        """Raise AuthError (403) unless the sender of ``frame`` (the body frame of a
        native request, received with copy=False on the ROUTER) may make the decoded
        ``request``: publish and delete need the publish right, fetch the subscribe
        right, ping nothing. Nothing is checked without CURVE."""
        op = _NATIVE_OPS.get(request["op"])
        if op is None or not self.enabled:
            return
        channel = request["channel"]
        if not self.rights_of(frame.get("User-Id")).allows(op, channel):
            verb = "publish to" if op == "publish" else "read"
            raise AuthError(403, f"this client key may not {verb} {channel}")

    def subscription_allowed(self, frame) -> bool:
        """True when the native XPUB may apply ``frame`` (received with copy=False):
        an unsubscription always; ``0x01 + channel + 0x00`` when the sender may subscribe
        to that channel; ``0x01 + prefix`` (every channel starting with it) only when a
        prefix right covers the whole prefix."""
        if not self.enabled:
            return True
        body = frame.bytes
        if body[:1] != b"\x01":
            return True
        patterns = self.rights_of(frame.get("User-Id")).by_op["subscribe"]
        topic = body[1:].decode("utf-8", "replace")
        if topic.endswith("\x00"):
            return patterns.allows(topic[:-1])
        return patterns.covers_prefix(topic)
