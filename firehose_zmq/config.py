"""The cluster configuration: an embedded default, a TOML file, environment overrides.

Every process of a cluster reads the same file, so edges and workers agree on the
worker list (and so on the ring). ``conf/cluster.example.toml`` is the annotated
reference; ``default_config()`` is what ``make run`` uses when no file is given.
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
    # Native ZeroMQ (PROTOCOL.md §10): the edge binds both; clients connect.
    native_pub_bind: str = "tcp://127.0.0.1:7475"  # XPUB: native SUB sockets connect here
    native_router_bind: str = "tcp://127.0.0.1:7476"  # ROUTER: native DEALER/REQ connect here
    native_send_hwm: int = 10000  # messages queued per native subscriber before drops
    # WebSocket and Server-Sent Events (PROTOCOL.md §6-7)
    ws_ping_interval_s: float = 20.0  # protocol-level pings ...
    ws_ping_timeout_s: float = 20.0  # ... a socket without a pong this long after one is closed
    ws_max_frame_bytes: int = 1024 * 1024  # a larger client frame closes the socket (1009)
    stream_queue_limit_bytes: int = 4 * 1024 * 1024  # a reader further behind is disconnected
    stream_max_channels: int = 1000  # channels on one multiplexed WebSocket or event stream
    sse_keepalive_s: float = 15.0  # a comment line this often keeps idle event streams open
    sse_retry_ms: int = 2000  # the reconnect delay sent to browsers (EventSource "retry:")


DURABILITY_MODES = ("sync", "async", "memory")


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
    """

    durability: str = "sync"
    data_dir: str = "var"
    flush_interval_ms: int = 100
    publish_id_window_s: int = 600
    max_unflushed_ops: int = 50000


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
class WorkerConfig:
    id: str
    router_bind: str
    router_connect: str
    pub_bind: str
    pub_connect: str


@dataclass(frozen=True)
class ClusterConfig:
    workers: tuple
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    limits: Limits = field(default_factory=Limits)
    ring_vnodes: int = 160
    storage: StorageConfig = field(default_factory=StorageConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    curve: CurveConfig = field(default_factory=CurveConfig)

    def worker(self, worker_id: str) -> WorkerConfig:
        for worker in self.workers:
            if worker.id == worker_id:
                return worker
        known = ", ".join(w.id for w in self.workers)
        raise ConfigError(f"no worker with id {worker_id!r} in the config (known: {known})")


def local_worker(worker_id: str, router_port: int, pub_port: int, host: str = "127.0.0.1"):
    """A worker that binds and is reached on ``host``."""
    router = f"tcp://{host}:{router_port}"
    pub = f"tcp://{host}:{pub_port}"
    return WorkerConfig(worker_id, router, router, pub, pub)


def default_config() -> ClusterConfig:
    """The embedded default: an edge on 127.0.0.1:7474 and two local workers."""
    return ClusterConfig(workers=(local_worker("w1", 7481, 7482), local_worker("w2", 7483, 7484)))


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
        if expected is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{key} must be true or false")
        elif expected is str:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where}.{key} must be a non-empty string")
        elif expected is tuple:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}.{key} must be a list of strings")
            value = tuple(value)
        elif expected is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{where}.{key} must be a positive number")
            value = float(value)
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}.{key} must be a non-negative integer")
        values[key] = value
    return values


def parse_config(document: dict) -> ClusterConfig:
    """Build a config from a parsed TOML document; raises ConfigError."""
    unknown = set(document) - {"workers", "edge", "limits", "ring_vnodes", "storage", "auth",
                               "curve"}
    if unknown:
        raise ConfigError(f"unknown top-level keys: {', '.join(sorted(unknown))}")
    raw_workers = document.get("workers")
    if not isinstance(raw_workers, list) or not raw_workers:
        raise ConfigError("the config needs at least one [[workers]] entry")
    worker_keys = ("id", "router_bind", "router_connect", "pub_bind", "pub_connect")
    workers = []
    for i, table in enumerate(raw_workers):
        values = {}
        if isinstance(table, dict):
            extra = set(table) - set(worker_keys)
            if extra:
                raise ConfigError(f"workers[{i}]: unknown keys {', '.join(sorted(extra))}")
            for key in worker_keys:
                value = table.get(key)
                if not isinstance(value, str) or not value:
                    raise ConfigError(f"workers[{i}].{key} must be a non-empty string")
                values[key] = value
        else:
            raise ConfigError(f"workers[{i}] must be a table")
        workers.append(WorkerConfig(**values))
    ids = [w.id for w in workers]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"worker ids must be unique: {ids}")
    edge = EdgeConfig(**_check_table(document.get("edge", {}), EdgeConfig, "edge"))
    limits = Limits(**_check_table(document.get("limits", {}), Limits, "limits"))
    if limits.default_buffer_size > limits.max_buffer_size:
        raise ConfigError("limits.default_buffer_size is above limits.max_buffer_size")
    vnodes = document.get("ring_vnodes", 160)
    if isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1:
        raise ConfigError("ring_vnodes must be a positive integer")
    storage = StorageConfig(**_check_table(document.get("storage", {}), StorageConfig, "storage"))
    check_storage(storage)
    if storage.publish_id_window_s < 2 * edge.request_timeout_s:
        raise ConfigError(f"storage.publish_id_window_s ({storage.publish_id_window_s:g}) must be "
                          f"at least twice edge.request_timeout_s ({edge.request_timeout_s:g}): "
                          "an edge retries a publish until its request timeout")
    auth = check_auth(AuthConfig(**_check_table(document.get("auth", {}), AuthConfig, "auth")))
    curve = parse_curve(document.get("curve", {}), ids)
    config = ClusterConfig(tuple(workers), edge, limits, vnodes, storage, auth, curve)
    check_exposure(config)
    return config


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
    return storage


def apply_environment(config: ClusterConfig, environ) -> ClusterConfig:
    """``PORT``, ``FIREHOSE_LONG_POLL_TIMEOUT`` (seconds) and ``FIREHOSE_DATA_DIR``
    override the file."""
    edge = config.edge
    port = environ.get("PORT")
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"PORT must be a TCP port number, not {port!r}")
        edge = replace(edge, port=int(port))
    timeout = environ.get("FIREHOSE_LONG_POLL_TIMEOUT")
    if timeout:
        try:
            seconds = float(timeout)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            raise ConfigError(f"FIREHOSE_LONG_POLL_TIMEOUT must be a positive number of seconds,"
                              f" not {timeout!r}")
        edge = replace(edge, long_poll_timeout_s=seconds)
    storage = config.storage
    data_dir = environ.get("FIREHOSE_DATA_DIR")
    if data_dir:
        storage = replace(storage, data_dir=data_dir)
    return replace(config, edge=edge, storage=storage)


def load_config(path: Optional[str] = None, environ=None) -> ClusterConfig:
    """The file at ``path`` (or the embedded default), then the environment overrides."""
    if path is None:
        config = default_config()
    else:
        try:
            with open(path, "rb") as f:
                document = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
        config = parse_config(document)
    return apply_environment(config, os.environ if environ is None else environ)
