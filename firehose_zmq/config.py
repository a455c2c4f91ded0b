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
    ``commit_window_ms`` (``sync`` only): how long the store writer lets publishes
    gather before a commit; each waits up to that much longer for its 202, and
    fewer commits carry them (0, the default, commits as soon as one waits).
    """

    durability: str = "sync"
    data_dir: str = "var"
    flush_interval_ms: int = 100
    publish_id_window_s: int = 600
    max_unflushed_ops: int = 50000
    commit_window_ms: int = 0


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
        if expected is str:
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
    unknown = set(document) - {"workers", "edge", "limits", "ring_vnodes", "storage"}
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
    if storage.commit_window_ms * 2 >= edge.request_timeout_s * 1000:
        raise ConfigError(f"storage.commit_window_ms ({storage.commit_window_ms:g}) must be below "
                          f"half of edge.request_timeout_s ({edge.request_timeout_s:g} s)")
    return ClusterConfig(tuple(workers), edge, limits, vnodes, storage)


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
