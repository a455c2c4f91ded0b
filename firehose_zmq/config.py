"""The cluster configuration: an embedded default, a TOML file, environment overrides.

Every process of a cluster reads the same file, so edges and workers agree on the
worker list (and so on the ring). ``conf/cluster.example.toml`` is the annotated
reference; ``default_config()`` is what ``make run`` uses when no file is given.

Where a value comes from, lowest precedence first: the dataclass default (or the
embedded default config, whose ports start at ``FIREHOSE_PORT_BASE``, 7474), the
file, the older aliases ``PORT``, ``FIREHOSE_LONG_POLL_TIMEOUT`` and
``FIREHOSE_DATA_DIR``, the generated variables, command-line flags. The variables
are generated from the fields: ``FIREHOSE_<SECTION>_<KEY>`` for every key of
``[edge]``, ``[limits]``, ``[storage]`` and ``[admin]``, ``FIREHOSE_RING_VNODES``,
and ``FIREHOSE_WORKERS_<ID>_<KEY>`` for a key of the worker with that id
(upper case, other characters than letters and digits as ``_``). Every value,
whatever its source, goes through the same check as the file's.
"""

from dataclasses import dataclass, field, fields, replace
import os
import tomllib
from typing import Optional


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key and why."""


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 5 * 1024 * 1024
    default_buffer_size: int = 100
    max_buffer_size: int = 10000
    default_ttl_s: int = 86400
    # Per worker (README, "Limits"): past these a publish that would grow the
    # worker is refused with error "quota" (HTTP 507).
    max_channels_per_worker: int = 1_000_000
    max_buffered_bytes_per_worker: int = 1024 * 1024 * 1024  # data + ~100 bytes per message
    max_store_bytes_per_worker: int = 4 * 1024 * 1024 * 1024  # SQLite pages in use
    # A subscription makes the worker re-send the channel's newest message at most
    # once per channel per interval (later ones within it get one re-send at its end).
    resend_newest_interval_ms: int = 1000
    # Messages a worker's XPUB queues per subscriber (an edge, a native client)
    # before it drops for that subscriber.
    worker_send_hwm: int = 10000
    # Requests a worker holds while their channels are being taken from their
    # previous owner (a ring change); beyond, they are refused "unavailable" (503).
    max_parked_requests: int = 10000


@dataclass(frozen=True)
class EdgeConfig:
    host: str = "127.0.0.1"
    port: int = 7474
    long_poll_timeout_s: float = 20.0
    request_timeout_s: float = 3.0
    # An owner that answers no heartbeat for interval * liveness (1.5 s) is down.
    heartbeat_interval_ms: int = 300
    heartbeat_liveness: int = 5
    subscription_linger_s: float = 5.0
    cors_allow_origins: tuple = ()
    metrics_bucket_s: int = 5
    metrics_buckets: int = 60
    # Native ZeroMQ (docs/protocol.md §10): the edge binds both; clients connect.
    native_pub_bind: str = "tcp://127.0.0.1:7475"  # XPUB: native SUB sockets connect here
    native_router_bind: str = "tcp://127.0.0.1:7476"  # ROUTER: native DEALER/REQ connect here
    native_send_hwm: int = 10000  # messages queued per native subscriber before drops
    # WebSocket and Server-Sent Events (docs/protocol.md §6-7)
    ws_ping_interval_s: float = 20.0  # protocol-level pings ...
    ws_ping_timeout_s: float = 20.0  # ... a socket without a pong this long after one is closed
    ws_max_frame_bytes: int = 1024 * 1024  # a larger client frame closes the socket (1009)
    stream_queue_limit_bytes: int = 4 * 1024 * 1024  # a reader further behind is disconnected
    ws_max_frames_per_s: int = 100  # client frames a WebSocket may send (bursts of 10 s' worth)
    stream_max_channels: int = 1000  # channels one subscription may name (any transport)
    sse_keepalive_s: float = 15.0  # a comment line this often keeps idle event streams open
    sse_retry_ms: int = 2000  # the reconnect delay sent to browsers (EventSource "retry:")
    # Hostile clients
    max_connections: int = 0  # open client connections; 0: the descriptor limit less a reserve
    max_head_bytes: int = 65536  # a longer request head is answered 431
    header_timeout_s: float = 10.0  # a head (or a body's next bytes) slower than this: 408
    idle_timeout_s: float = 60.0  # a keep-alive connection with nothing in flight is closed
    max_json_depth: int = 32  # deeper JSON (a POST body, a WebSocket frame) is refused
    max_query_params: int = 64  # query parameters one request may carry
    publish_rate_per_s: int = 0  # publishes per second per client address; 0: no limit
    publish_burst: int = 0  # publishes a client may send at once (0: one second's worth)
    # TLS: HTTPS and WSS on the edge's port when both are set (PEM files)
    tls_cert: str = ""
    tls_key: str = ""


DURABILITY_MODES = ("sync", "async", "memory")
MAX_COMMIT_WINDOW_MS = 1000


@dataclass(frozen=True)
class StorageConfig:
    """How a worker keeps its channels (see README, "Durability and failures").

    ``durability``: ``sync`` (a publish is acknowledged once it is committed to
    disk), ``async`` (acknowledged at once, committed within ``flush_interval_ms``)
    or ``memory`` (nothing on disk). ``data_dir`` holds one SQLite file per worker;
    a relative path is relative to the working directory. ``publish_id_window_s``
    is how long a publish id is remembered at least (at most twice that, and less
    when a worker holds over a million) to answer a retry: an edge's own, which
    comes before its request timeout, so it must be at least twice ``[edge]
    request_timeout_s``, or a native client's (docs/native-zeromq.md).
    ``commit_window_ms`` (``sync`` only): how long the worker lets publishes
    gather before a commit; each waits up to that much longer for its 202, and
    fewer commits carry them (0, the default, commits as soon as one waits).
    ``commit_on`` (``sync`` only): ``loop``, the worker's event loop commits at the
    end of each turn (the least CPU; while a commit runs the worker answers
    nothing, so one that stalls past the edges' liveness window gets the worker
    marked down, as a stopped one); ``thread``, a writer thread commits and the
    loop goes on answering meanwhile (heartbeats included), for disks whose
    commits can stall for seconds.
    ``replicas``: how many workers after a channel's owner on the ring keep a copy
    of it (README, "When a host is lost"); 0 keeps channels on their owner only.
    ``replica_ack`` (``sync`` only): ``one``, a 202 also waits for the channel's
    first replica to have committed the message; ``none``, it does not (a
    failover then gives the channel a new epoch). ``replica_lease_ms``: how long an
    owner may serve after its first replica last acknowledged it, and so how long a
    silent owner keeps its replica from taking over.
    """

    durability: str = "sync"
    data_dir: str = "var"
    flush_interval_ms: int = 100
    publish_id_window_s: int = 600
    max_unflushed_ops: int = 50000
    commit_window_ms: int = 0
    commit_on: str = "loop"
    replicas: int = 0
    replica_ack: str = "one"
    replica_lease_ms: int = 1000


REPLICA_ACKS = ("one", "none")
COMMIT_ON = ("loop", "thread")

AUTH_MODES = ("open", "required")
AUTH_OPS = ("publish", "subscribe")


@dataclass(frozen=True)
class AuthConfig:
    """Who may publish and subscribe (README, "Security"; ``firehose_zmq.auth``).

    ``publish`` / ``subscribe``: ``open`` (no credential) or ``required`` (a JWT
    whose claim ``jwt_claim`` grants the channel, and the callout's consent when
    ``callout_url`` is set). Keys come from ``jwt_key`` or ``jwt_key_file``, never
    from the command line. An edge whose HTTP listener or native request endpoint
    is reachable from other hosts refuses to start with ``publish = "open"``
    unless ``allow_open_publish`` is true.
    """

    publish: str = "open"
    subscribe: str = "open"
    allow_open_publish: bool = False
    jwt_algorithms: tuple = ("HS256",)
    jwt_key: str = ""  # the HS256 shared secret itself
    jwt_key_file: str = ""  # a PEM public key (RS256/ES256) or a file holding the shared secret
    jwt_claim: str = "firehose"
    jwt_audience: str = ""
    jwt_issuer: str = ""
    jwt_leeway_s: int = 30
    token_cache_size: int = 4096
    cookie_name: str = "firehose_token"
    query_param: str = "access_token"
    realm: str = "firehose"
    callout_url: str = ""
    callout_ops: tuple = AUTH_OPS
    callout_timeout_s: float = 2.0
    callout_cache_ttl_s: int = 5
    callout_cache_size: int = 1024
    callout_max_in_flight: int = 64
    callout_fail_open: bool = False
    subscription_filter: str = ""  # "module:function", PROTOCOL §8's hook (auth/hooks.py)


@dataclass(frozen=True)
class NativeClient:
    """A native client's CURVE public key file and the channels it may use."""

    key: str
    publish: tuple = ()
    subscribe: tuple = ()


@dataclass(frozen=True)
class CurveConfig:
    """CURVE on every ZeroMQ link (``firehose_zmq.auth.curve``). Files are written
    by ``firehose-keys``: ``NAME.key`` (public) and ``NAME.key_secret`` (both halves)."""

    enabled: bool = False
    worker_keys: tuple = ()  # (worker id, public key file): every edge reads these
    worker_secret_keys: tuple = ()  # (worker id, secret key file): each worker reads its own
    edge_key: str = ""  # the edges' client public key: the workers admit it
    edge_secret_key: str = ""  # the edges' client key pair: every edge presents it
    worker_clients: tuple = ()  # more public key files the workers admit
    native_secret_key: str = ""  # the native endpoints' server key pair
    native_clients: tuple = ()  # NativeClient entries: the keys the native endpoints admit


@dataclass(frozen=True)
class AdminConfig:
    """The admin listener (``firehose_zmq.admin``): metrics, health, status page.

    ``bind`` is the edge's ``host:port``; each worker's is its ``[[workers]] admin``.
    An empty string turns it off. A drained edge answers ``/readyz`` with 503 for
    ``drain_grace_s`` before it stops. A worker is not ready while its store has
    more than ``ready_backlog_ratio`` of ``storage.max_unflushed_ops`` waiting.
    """

    bind: str = "127.0.0.1:7477"
    drain_grace_s: float = 5.0
    status_timeout_s: float = 1.0  # the edge's wait for each worker's admin status
    ready_backlog_ratio: float = 0.9


@dataclass(frozen=True)
class WorkerConfig:
    id: str
    router_bind: str
    router_connect: str
    pub_bind: str
    pub_connect: str
    admin: str = ""  # host:port of this worker's admin listener; empty: none
    # Out of the ring: it serves no channel and hands what it holds to the ring's
    # owners (README, "Growing the cluster"); stop it once it holds none.
    leaving: bool = False


_WORKER_KEYS = ("id", "router_bind", "router_connect", "pub_bind", "pub_connect")
_WORKER_OPTIONAL = ("admin", "leaving")
_WORKER_TYPES = {"admin": str, "leaving": bool}
# Keys whose empty string means "off".
_MAY_BE_EMPTY = {("admin", "bind"), ("workers", "admin"), ("edge", "tls_cert"), ("edge", "tls_key"), ("auth", "jwt_key"),
                 ("auth", "jwt_key_file"), ("auth", "jwt_audience"), ("auth", "jwt_issuer"),
                 ("auth", "callout_url"), ("auth", "subscription_filter")}


@dataclass(frozen=True)
class ClusterConfig:
    workers: tuple
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    limits: Limits = field(default_factory=Limits)
    ring_vnodes: int = 160
    storage: StorageConfig = field(default_factory=StorageConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    curve: CurveConfig = field(default_factory=CurveConfig)
    # The worker ids of the ring being replaced while channels move to the new one
    # (README, "Growing the cluster"); empty when no move is under way.
    ring_previous: tuple = ()

    @property
    def ring_members(self) -> tuple:
        """The ids of the ring's workers: every ``[[workers]]`` entry not ``leaving``."""
        return tuple(w.id for w in self.workers if not w.leaving)

    def worker(self, worker_id: str) -> WorkerConfig:
        for worker in self.workers:
            if worker.id == worker_id:
                return worker
        known = ", ".join(w.id for w in self.workers)
        raise ConfigError(f"no worker with id {worker_id!r} in the config (known: {known})")


# Sections whose every field has a generated variable, and their dataclasses.
SECTIONS = {"edge": EdgeConfig, "limits": Limits, "storage": StorageConfig, "admin": AdminConfig,
            "auth": AuthConfig}
DEFAULT_PORT_BASE = 7474


def local_worker(worker_id: str, router_port: int, pub_port: int, host: str = "127.0.0.1",
                 admin_port=None):
    """A worker that binds and is reached on ``host``."""
    router = f"tcp://{host}:{router_port}"
    pub = f"tcp://{host}:{pub_port}"
    admin = f"{host}:{admin_port}" if admin_port else ""
    return WorkerConfig(worker_id, router, router, pub, pub, admin)


def default_config(port_base: int = DEFAULT_PORT_BASE) -> ClusterConfig:
    """The embedded default: an edge on 127.0.0.1:7474 and two local workers.

    Every port is ``port_base`` plus a fixed offset: HTTP +0, native XPUB +1 and
    ROUTER +2, the edge's admin +3, the workers' admin +4 and +5, w1 +7 and +8,
    w2 +9 and +10 (with the base 7474: 7474-7479 and 7481-7484)."""
    b = port_base
    edge = EdgeConfig(port=b, native_pub_bind=f"tcp://127.0.0.1:{b + 1}",
                      native_router_bind=f"tcp://127.0.0.1:{b + 2}")
    return ClusterConfig(workers=(local_worker("w1", b + 7, b + 8, admin_port=b + 4),
                                  local_worker("w2", b + 9, b + 10, admin_port=b + 5)),
                         edge=edge, admin=AdminConfig(bind=f"127.0.0.1:{b + 3}"))


def _check_value(where: str, key: str, value, expected: type, may_be_empty: bool = False):
    """``value`` as a value of type ``expected``; raises ConfigError naming ``where.key``."""
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}.{key} must be true or false")
    elif expected is str:
        if not isinstance(value, str) or not (value or may_be_empty):
            raise ConfigError(f"{where}.{key} must be a non-empty string")
    elif expected is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}.{key} must be a list of strings")
        value = tuple(value)
    elif expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{where}.{key} must be a positive number")
        value = float(value)
    elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}.{key} must be a non-negative integer")
    return value


def _check_table(table, cls, where: str) -> dict:
    """Check a table of ``cls``'s fields against the types of their defaults."""
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table")
    known = {f.name: type(f.default) for f in fields(cls)}
    values = {}
    for key, value in table.items():
        expected = known.get(key)
        if expected is None:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        values[key] = _check_value(where, key, value, expected, (where, key) in _MAY_BE_EMPTY)
    return values


def _parse_worker(i: int, table) -> WorkerConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"workers[{i}] must be a table")
    extra = set(table) - set(_WORKER_KEYS) - set(_WORKER_OPTIONAL)
    if extra:
        raise ConfigError(f"workers[{i}]: unknown keys {', '.join(sorted(extra))}")
    values = {}
    for key in _WORKER_KEYS:
        value = table.get(key)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"workers[{i}].{key} must be a non-empty string")
        values[key] = value
    for key in _WORKER_OPTIONAL:
        if key in table:
            values[key] = _check_value(f"workers[{i}]", key, table[key], _WORKER_TYPES[key], True)
    return WorkerConfig(**values)


def parse_config(document: dict) -> ClusterConfig:
    """Build a config from a parsed TOML document; raises ConfigError."""
    unknown = set(document) - {"workers", "ring_vnodes", "ring_previous", "curve", *SECTIONS}
    if unknown:
        raise ConfigError(f"unknown top-level keys: {', '.join(sorted(unknown))}")
    raw_workers = document.get("workers")
    if not isinstance(raw_workers, list) or not raw_workers:
        raise ConfigError("the config needs at least one [[workers]] entry")
    workers = tuple(_parse_worker(i, table) for i, table in enumerate(raw_workers))
    sections = {name: cls(**_check_table(document.get(name, {}), cls, name))
                for name, cls in SECTIONS.items()}
    vnodes = document.get("ring_vnodes", 160)
    if isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1:
        raise ConfigError("ring_vnodes must be a positive integer")
    curve = parse_curve(document.get("curve", {}), [w.id for w in workers])
    previous = _check_value("config", "ring_previous", document.get("ring_previous", []), tuple)
    return check_config(ClusterConfig(workers, ring_vnodes=vnodes, curve=curve,
                                      ring_previous=previous, **sections))


def check_config(config: ClusterConfig) -> ClusterConfig:
    """The rules between keys; raises ConfigError, returns ``config``."""
    ids = [w.id for w in config.workers]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"worker ids must be unique: {ids}")
    if config.ring_vnodes < 1:
        raise ConfigError("ring_vnodes must be a positive integer")
    if not config.ring_members:
        raise ConfigError("every worker is leaving: the ring needs at least one")
    unknown = [w for w in config.ring_previous if w not in ids]
    if unknown:
        raise ConfigError(f"ring_previous names {', '.join(unknown)}, not in [[workers]]: keep a "
                          "worker's entry (leaving = true) until its channels are handed over")
    if len(set(config.ring_previous)) != len(config.ring_previous):
        raise ConfigError(f"ring_previous has duplicate ids: {list(config.ring_previous)}")
    limits, edge, storage = config.limits, config.edge, config.storage
    if limits.default_buffer_size > limits.max_buffer_size:
        raise ConfigError("limits.default_buffer_size is above limits.max_buffer_size")
    if not 0 < edge.port < 65536:
        raise ConfigError(f"edge.port must be a TCP port number, not {edge.port}")
    check_storage(storage)
    if bool(edge.tls_cert) != bool(edge.tls_key):
        raise ConfigError("edge.tls_cert and edge.tls_key go together: set both or neither")
    if storage.publish_id_window_s < 2 * edge.request_timeout_s:
        raise ConfigError(f"storage.publish_id_window_s ({storage.publish_id_window_s:g}) must be "
                          f"at least twice edge.request_timeout_s ({edge.request_timeout_s:g}): "
                          "an edge retries a publish until its request timeout")
    if storage.replicas >= len(config.ring_members):
        raise ConfigError(f"storage.replicas ({storage.replicas}) must be below the number of "
                          f"workers in the ring ({len(config.ring_members)})")
    if storage.commit_window_ms * 2 >= edge.request_timeout_s * 1000:
        raise ConfigError(f"storage.commit_window_ms ({storage.commit_window_ms:g}) must be below "
                          f"half of edge.request_timeout_s ({edge.request_timeout_s:g} s)")
    for where, address in [("admin.bind", config.admin.bind)] + [
            (f"workers.{w.id}.admin", w.admin) for w in config.workers]:
        if address:
            split_host_port(address, where)
    if config.admin.ready_backlog_ratio > 1:
        raise ConfigError("admin.ready_backlog_ratio must be at most 1")
    check_auth(config.auth)
    check_exposure(config)
    return config


def split_host_port(address: str, where: str = "address") -> tuple:
    """``"host:port"`` as ``(host, port)``; raises ConfigError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where} must be host:port, not {address!r}")
    return host.strip("[]"), int(port)


def check_auth(auth: AuthConfig) -> AuthConfig:
    """Raise ConfigError unless ``auth`` can be used; returns it."""
    for op in AUTH_OPS:
        if getattr(auth, op) not in AUTH_MODES:
            raise ConfigError(f"auth.{op} must be one of {', '.join(AUTH_MODES)}, "
                              f"not {getattr(auth, op)!r}")
    unknown = set(auth.callout_ops) - set(AUTH_OPS)
    if unknown:
        raise ConfigError(f"auth.callout_ops: unknown operations {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(AUTH_OPS)})")
    supported = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384",
                 "ES512", "PS256", "PS384", "PS512", "EdDSA")
    bad = [a for a in auth.jwt_algorithms if a not in supported]
    if bad or not auth.jwt_algorithms:
        raise ConfigError(f"auth.jwt_algorithms must name some of {', '.join(supported)}"
                          + (f", not {', '.join(bad)}" if bad else ""))
    if len({a.startswith("HS") for a in auth.jwt_algorithms}) > 1:
        raise ConfigError("auth.jwt_algorithms cannot mix HMAC (HS*) with public-key algorithms: "
                          "one key verifies them all")
    if auth.jwt_key and auth.jwt_key_file:
        raise ConfigError("auth: set jwt_key or jwt_key_file, not both")
    if auth.jwt_key and not auth.jwt_algorithms[0].startswith("HS"):
        raise ConfigError("auth.jwt_key is a shared secret for HS* algorithms; "
                          "put a public key in jwt_key_file")
    has_key = bool(auth.jwt_key or auth.jwt_key_file)
    for op in AUTH_OPS:
        if getattr(auth, op) == "required" and not has_key and not (
                auth.callout_url and op in auth.callout_ops):
            raise ConfigError(f"auth.{op} is required but nothing can grant it: set jwt_key, "
                              "jwt_key_file or callout_url")
    if auth.callout_url and not auth.callout_url.startswith(("http://", "https://")):
        raise ConfigError(f"auth.callout_url must be an http:// or https:// URL, "
                          f"not {auth.callout_url!r}")
    for key in ("token_cache_size", "callout_cache_size", "callout_max_in_flight"):
        if getattr(auth, key) < 1:
            raise ConfigError(f"auth.{key} must be at least 1")
    return auth


def _string_list(value, where: str) -> tuple:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where} must be a list of non-empty strings")
    return tuple(value)


def parse_curve(table, worker_ids) -> CurveConfig:
    """The ``[curve]`` table; the key files are read when the sockets are made."""
    if not isinstance(table, dict):
        raise ConfigError("[curve] must be a table")
    table = dict(table)
    values = {}
    for key in ("worker_keys", "worker_secret_keys"):
        by_id = table.pop(key, {})
        if not isinstance(by_id, dict) or not all(isinstance(v, str) and v
                                                  for v in by_id.values()):
            raise ConfigError(f"curve.{key} must be a table of worker id = \"key file\"")
        unknown = set(by_id) - set(worker_ids)
        if unknown:
            raise ConfigError(f"curve.{key}: no worker {', '.join(sorted(unknown))} in the config")
        values[key] = tuple(sorted(by_id.items()))
    clients = []
    for i, entry in enumerate(table.pop("native_clients", [])):
        where = f"curve.native_clients[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or not entry["key"]:
            raise ConfigError(f"{where} needs key = \"a public key file\"")
        extra = set(entry) - {"key", "publish", "subscribe"}
        if extra:
            raise ConfigError(f"{where}: unknown keys {', '.join(sorted(extra))}")
        clients.append(NativeClient(entry["key"],
                                    _string_list(entry.get("publish", []), f"{where}.publish"),
                                    _string_list(entry.get("subscribe", []),
                                                 f"{where}.subscribe")))
    values["native_clients"] = tuple(clients)
    values.update(_check_table(table, CurveConfig, "curve"))
    curve = CurveConfig(**values)
    if curve.enabled:
        missing = sorted(set(worker_ids) - {w for w, _ in curve.worker_keys})
        if missing:
            raise ConfigError(f"curve.worker_keys has no key for worker {', '.join(missing)}")
        for key in ("edge_key", "edge_secret_key", "native_secret_key"):
            if not getattr(curve, key):
                raise ConfigError(f"curve.{key} must name a key file when curve.enabled is true")
    return curve


def is_loopback(address: str) -> bool:
    """True for a host or ZeroMQ endpoint that only this host can reach."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    host = address
    if "://" in address:  # tcp://host:port, or tcp://source;host:port
        host = address.split("://", 1)[1].split(";")[-1].rpartition(":")[0]
    host = host.strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def check_exposure(config: ClusterConfig) -> None:
    """Refuse publishing without a credential from other hosts, unless allowed.

    The HTTP listener is open when ``auth.publish`` is; without CURVE the native
    request endpoint and every worker's ROUTER take publishes from anyone who
    reaches them, whatever ``auth.publish`` says."""
    if config.auth.allow_open_publish:
        return
    exposed = []
    if config.auth.publish == "open" and not is_loopback(config.edge.host):
        exposed.append(f"edge.host {config.edge.host}")
    if not config.curve.enabled:
        binds = [("edge.native_router_bind", config.edge.native_router_bind)]
        binds += [(f"worker {w.id} router_bind", w.router_bind) for w in config.workers]
        exposed += [f"{name} {bind}" for name, bind in binds if not is_loopback(bind)]
    if exposed:
        raise ConfigError(f"publishing needs no credential on {', '.join(exposed)}: set "
                          "auth.publish = \"required\" and curve.enabled = true, bind to "
                          "loopback, or set auth.allow_open_publish = true")


def check_storage(storage: StorageConfig) -> StorageConfig:
    """Raise ConfigError unless ``storage`` can be used; returns it."""
    if storage.durability not in DURABILITY_MODES:
        raise ConfigError(f"storage.durability must be one of {', '.join(DURABILITY_MODES)}, "
                          f"not {storage.durability!r}")
    if storage.flush_interval_ms < 1:
        raise ConfigError("storage.flush_interval_ms must be at least 1")
    if storage.publish_id_window_s <= 0:
        raise ConfigError("storage.publish_id_window_s must be positive")
    if storage.max_unflushed_ops < 1:
        raise ConfigError("storage.max_unflushed_ops must be at least 1")
    if not 0 <= storage.commit_window_ms <= MAX_COMMIT_WINDOW_MS:
        raise ConfigError(f"storage.commit_window_ms must be from 0 to {MAX_COMMIT_WINDOW_MS}")
    if storage.commit_on not in COMMIT_ON:
        raise ConfigError(f"storage.commit_on must be one of {', '.join(COMMIT_ON)}, "
                          f"not {storage.commit_on!r}")
    if storage.replicas < 0:
        raise ConfigError("storage.replicas must be 0 or more")
    if storage.replica_ack not in REPLICA_ACKS:
        raise ConfigError(f"storage.replica_ack must be one of {', '.join(REPLICA_ACKS)}, "
                          f"not {storage.replica_ack!r}")
    if not 100 <= storage.replica_lease_ms <= 60000:
        raise ConfigError("storage.replica_lease_ms must be from 100 to 60000")
    return storage


# -- the environment -----------------------------------------------------------

# Older names, kept: variable -> (section, key).
ALIASES = {"PORT": ("edge", "port"),
           "FIREHOSE_LONG_POLL_TIMEOUT": ("edge", "long_poll_timeout_s"),
           "FIREHOSE_DATA_DIR": ("storage", "data_dir")}
PORT_BASE_VARIABLE = "FIREHOSE_PORT_BASE"


def _env_token(name: str) -> str:
    return "".join(c if c.isascii() and c.isalnum() else "_" for c in name).upper()


def variable_name(section: str, key: str) -> str:
    """The environment variable of ``section.key`` (``section`` may be ``workers.<id>``)."""
    if section.startswith("workers."):
        return f"FIREHOSE_WORKERS_{_env_token(section[8:])}_{_env_token(key)}"
    if section == "":
        return f"FIREHOSE_{_env_token(key)}"
    return f"FIREHOSE_{_env_token(section)}_{_env_token(key)}"


def _from_text(variable: str, text: str, expected: type):
    """An environment string as the raw value a TOML file would give."""
    try:
        if expected is int:
            return int(text.strip())
        if expected is float:
            return float(text.strip())
    except ValueError:
        what = "an integer" if expected is int else "a number"
        raise ConfigError(f"{variable} must be {what}, not {text!r}") from None
    if expected is tuple:
        return [part.strip() for part in text.split(",") if part.strip()]
    if expected is bool:
        flag = text.strip().lower()
        if flag not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{variable} must be true or false, not {text!r}")
        return flag in ("true", "1", "yes")
    return text


def _override(config: ClusterConfig, section: str, key: str, value) -> ClusterConfig:
    if section.startswith("workers."):
        worker_id = section[8:]
        return replace(config, workers=tuple(replace(w, **{key: value}) if w.id == worker_id
                                             else w for w in config.workers))
    if section == "":
        return replace(config, **{key: value})
    return replace(config, **{section: replace(getattr(config, section), **{key: value})})


def _settable(config: ClusterConfig) -> dict:
    """``variable -> (section, key, type)`` for every key of ``config``."""
    table = {variable_name("", "ring_vnodes"): ("", "ring_vnodes", int),
             variable_name("", "ring_previous"): ("", "ring_previous", tuple)}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            table[variable_name(section, f.name)] = (section, f.name, type(f.default))
    for worker in config.workers:
        for key in _WORKER_KEYS[1:] + _WORKER_OPTIONAL:
            table[variable_name(f"workers.{worker.id}", key)] = (f"workers.{worker.id}", key,
                                                                _WORKER_TYPES.get(key, str))
    return table


def apply_environment(config: ClusterConfig, environ, sources=None) -> ClusterConfig:
    """The file's config with the environment's overrides (see the module docstring).

    ``sources``, when given, gets ``"section.key" -> "env VARIABLE"`` for each value
    taken from the environment. Raises ConfigError for a bad value or an unknown
    ``FIREHOSE_<SECTION>_...`` variable."""
    settable = _settable(config)
    chosen = {}
    for variable, (section, key) in ALIASES.items():
        if environ.get(variable):
            chosen[(section, key)] = variable
    for variable in sorted(environ):
        if variable in settable:
            section, key, _ = settable[variable]
            chosen[(section, key)] = variable
        elif variable.startswith(tuple(f"FIREHOSE_{_env_token(s)}_"
                                       for s in (*SECTIONS, "workers"))):
            raise ConfigError(f"unknown configuration variable {variable} "
                              "(FIREHOSE_<SECTION>_<KEY>; firehose-edge --print-config lists them)")
    types = {(section, key): expected for section, key, expected in settable.values()}
    for (section, key), variable in chosen.items():
        expected = types[(section, key)]
        where = section or "config"
        raw = _from_text(variable, environ[variable], expected)
        try:
            value = _check_value(where, key, raw, expected,
                                 (section.split(".")[0], key) in _MAY_BE_EMPTY)
        except ConfigError as exc:
            raise ConfigError(f"{variable}={environ[variable]!r}: {exc}") from None
        if (section, key) == ("edge", "port") and not 0 < value < 65536:
            raise ConfigError(f"{variable} must be a TCP port number, not {environ[variable]!r}")
        config = _override(config, section, key, value)
        if sources is not None:
            sources[f"{section}.{key}" if section else key] = f"env {variable}"
    return config


def apply_overrides(config: ClusterConfig, overrides: dict, sources=None) -> ClusterConfig:
    """``{("section", "key"): (value, "where it came from")}`` on top of ``config``."""
    for (section, key), (value, origin) in overrides.items():
        config = _override(config, section, key, value)
        if sources is not None:
            sources[f"{section}.{key}"] = origin
    return config


def _port_base(environ) -> int:
    text = environ.get(PORT_BASE_VARIABLE)
    if not text:
        return DEFAULT_PORT_BASE
    if not text.isdigit() or not 0 < int(text) < 65536 - 10:
        raise ConfigError(f"{PORT_BASE_VARIABLE} must be a TCP port number below 65526, "
                          f"not {text!r}")
    return int(text)


def load_config_with_sources(path: Optional[str] = None, environ=None, overrides=None) -> tuple:
    """``(config, sources)``: the file at ``path`` (or the embedded default), then the
    environment, then ``overrides`` (see ``apply_overrides``). ``sources`` maps
    ``"section.key"`` to where a value that is not the built-in default came from."""
    environ = os.environ if environ is None else environ
    sources: dict = {}
    if path is None:
        base = _port_base(environ)
        config = default_config(base)
        if base != DEFAULT_PORT_BASE:
            sources["ports"] = f"env {PORT_BASE_VARIABLE}"
    else:
        try:
            with open(path, "rb") as f:
                document = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
        config = parse_config(document)
        for section in SECTIONS:
            for key in document.get(section, {}):
                sources[f"{section}.{key}"] = f"file {path}"
        for key in ("ring_vnodes", "ring_previous"):
            if key in document:
                sources[key] = f"file {path}"
        for worker in config.workers:
            for key in _WORKER_KEYS[1:] + _WORKER_OPTIONAL:
                sources[f"workers.{worker.id}.{key}"] = f"file {path}"
    config = apply_environment(config, environ, sources)
    config = apply_overrides(config, overrides or {}, sources)
    return check_config(config), sources


def load_config(path: Optional[str] = None, environ=None) -> ClusterConfig:
    """The file at ``path`` (or the embedded default), then the environment overrides."""
    return load_config_with_sources(path, environ)[0]


_PORT_BASE_KEYS = {"edge.port", "edge.native_pub_bind", "edge.native_router_bind", "admin.bind"}


def effective_values(config: ClusterConfig, sources: dict, path: Optional[str]) -> list:
    """``[(name, value, source, variable)]`` for every key of ``config``, in file order."""
    default = "embedded default" if path is None else "default"
    moved = sources.get("ports")  # the embedded default's ports moved by FIREHOSE_PORT_BASE

    def source_of(name: str, from_base: bool) -> str:
        return sources.get(name) or (moved if moved and from_base else default)

    rows = [(key, getattr(config, key), source_of(key, False), variable_name("", key))
            for key in ("ring_vnodes", "ring_previous")]
    for section in SECTIONS:
        values = getattr(config, section)
        for f in fields(values):
            name = f"{section}.{f.name}"
            rows.append((name, getattr(values, f.name), source_of(name, name in _PORT_BASE_KEYS),
                         variable_name(section, f.name)))
    for worker in config.workers:
        for key in _WORKER_KEYS[1:] + _WORKER_OPTIONAL:
            name = f"workers.{worker.id}.{key}"
            rows.append((name, getattr(worker, key), source_of(name, True),
                         variable_name(f"workers.{worker.id}", key)))
    return rows


def local_bind_clashes(config: ClusterConfig, include_edge: bool = True) -> list:
    """Addresses that two listeners of ``config`` would both bind on one host, as
    one-line descriptions (``firehose-cluster`` runs every process on this host)."""
    wildcard = ("0.0.0.0", "*", "::", "")
    taken: list = []  # (host, port, what)
    clashes = []

    def add(host: str, port: int, what: str) -> None:
        for other_host, other_port, other in taken:
            if port == other_port and (host == other_host or host in wildcard
                                       or other_host in wildcard):
                clashes.append(f"{what} and {other} would both bind port {port}")
        taken.append((host, port, what))

    def add_zmq(endpoint: str, what: str) -> None:
        if endpoint.startswith("tcp://"):
            host, _, port = endpoint[6:].rpartition(":")
            if port.isdigit():
                add(host.strip("[]"), int(port), what)

    for w in config.workers:
        add_zmq(w.router_bind, f"worker {w.id} router_bind")
        add_zmq(w.pub_bind, f"worker {w.id} pub_bind")
        if w.admin:
            add(*split_host_port(w.admin), f"worker {w.id} admin")
    if include_edge:
        add(config.edge.host, config.edge.port, "edge port")
        add_zmq(config.edge.native_pub_bind, "edge native_pub_bind")
        add_zmq(config.edge.native_router_bind, "edge native_router_bind")
        if config.admin.bind:
            add(*split_host_port(config.admin.bind), "admin bind")
    return clashes
