"""The scenarios of issues 5 and 16 as lpbench invocations, and how each is summarised.

A ``Scenario`` is pure data: the lpbench arguments for a given size (full or quick),
which transport each server uses, whether it runs in every durability mode, the
headline figure and its target ratios. The runner (run.py) executes them;
report.py turns the results into a table and chart.
"""

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Sizes:
    """How big and how long: ``full()`` is the issue's scenario set, ``quick()`` a smoke run."""

    duration_s: float
    fanout: tuple  # long-poll fan-out subscriber counts
    stream_fanout: tuple  # WebSocket / SSE fan-out subscriber counts
    channels: tuple  # channel counts, one subscriber each
    idle_conns: int
    idle_settle_s: float
    quiet_channels: int
    quiet_rate: float  # messages/s over all quiet channels
    publish_conns: int = 16
    publish_channels: int = 100

    @staticmethod
    def full(duration_s: float = 10.0) -> "Sizes":
        return Sizes(duration_s, (100, 1000, 5000), (1000, 5000), (1000, 5000), 10000, 3.0,
                     100, 200.0)

    @staticmethod
    def quick(duration_s: float = 2.0) -> "Sizes":
        return Sizes(duration_s, (100, 500), (200,), (200,), 1000, 1.0, 20, 100.0)


@dataclass(frozen=True)
class Scenario:
    """One row of the report.

    ``kind`` is the lpbench scenario (publish, fanout, channels, idle); ``args`` its
    arguments without --proto/--url; ``transport`` is long-poll, ws or sse (for ws/sse
    the Nchan column is Nchan's long-poll run of ``nchan_args``, as the issue compares
    a stream against Nchan's long-poll figure); ``hot_args`` (isolation) is a load run
    alongside; ``baseline`` names the row whose p99 this row's p99 is compared with.
    ``metric``: "cpu" (server CPU us per operation), "bytes" (per idle connection),
    "p99" (latency only: the isolation rows' CPU includes the hot load, so it is not
    shown) or "p99_rise"; ``per_mode``: the row runs in every durability mode asked
    for (rows where every delivery is a publish, so storage is the cost), else in
    the most durable one only; ``targets``: the issue's ratios, keyed
    ``"<mode>/<peer>"`` (``*`` for any), see report.target_for."""

    key: str
    title: str
    kind: str
    args: tuple
    duration_s: float
    transport: str = "long-poll"
    metric: str = "cpu"
    targets: dict = field(default_factory=dict)
    per_mode: bool = False
    nchan_args: Optional[tuple] = None
    hot_args: Optional[tuple] = None
    baseline: Optional[str] = None
    counts: dict = field(default_factory=dict)

    def proto_for(self, server_proto: str) -> str:
        """The lpbench --proto this row uses against a server speaking ``server_proto``."""
        if self.transport == "long-poll" or server_proto == "nchan":
            return server_proto
        return f"{server_proto}-{self.transport}"

    def args_for(self, server_proto: str) -> tuple:
        if server_proto == "nchan" and self.nchan_args is not None:
            return self.nchan_args
        return self.args


def _n(x: int) -> str:
    return f"{x:,}"


def build(sizes: Sizes) -> list:
    """Every scenario at the given sizes, in report order."""
    d = sizes.duration_s
    dur = ("-T", f"{d:g}")
    procs = ("--procs", "2")
    rows = [Scenario(
        "publish", f"a) publish, {sizes.publish_conns} conns, {sizes.publish_channels} ch",
        "publish", ("-P", str(sizes.publish_conns), "-C", str(sizes.publish_channels)) + dur + procs,
        d, per_mode=True, counts={"pub_conns": sizes.publish_conns,
                                  "channels": sizes.publish_channels},
        targets={"memory/nchan": 3.0, "async/nchan-redis-everysec": 0.5,
                 "sync/nchan-redis-always": 1.0})]
    for n in sizes.fanout:
        t = d * 1.5 if n >= 5000 else d
        rows.append(Scenario(
            f"fanout_lp_{n}", f"b) fan-out 1 ch -> {_n(n)} long-poll", "fanout",
            ("-S", str(n), "-W", "1", "-T", f"{t:g}") + procs, t,
            targets={"*/nchan": 1.0} if n == 1000 else {}, counts={"subs": n}))
    for n in sizes.channels:
        rows.append(Scenario(
            f"channels_{n}", f"c) {_n(n)} ch x 1 long-poll", "channels",
            ("-S", str(n), "-W", "500", "-P", "4") + dur + procs, d,
            per_mode=True, counts={"channels": n},
            targets={"sync/nchan": 4.0, "sync/nchan-redis-always": 1.0} if n == 5000 else {}))
    rows.append(Scenario(
        f"idle_{sizes.idle_conns}", f"d) idle, {_n(sizes.idle_conns)} held long-polls", "idle",
        ("-S", str(sizes.idle_conns), "--src-addrs", "4", "-P", "4", "--settle",
         f"{sizes.idle_settle_s:g}") + procs, sizes.idle_settle_s * 2 + 10,
        metric="bytes", targets={"*/nchan": 1.0}, counts={"conns": sizes.idle_conns}))
    for transport, label in (("ws", "WebSocket"), ("sse", "SSE")):
        for n in sizes.stream_fanout:
            t = d * 1.5 if n >= 5000 else d
            args = ("-S", str(n), "-W", "1", "-T", f"{t:g}") + procs
            rows.append(Scenario(
                f"fanout_{transport}_{n}", f"e) fan-out 1 ch -> {_n(n)} {label}", "fanout",
                args, t, transport=transport, targets={"*/nchan": 1.0}, nchan_args=args,
                counts={"subs": n}))
    quiet = ("-S", str(sizes.quiet_channels), "-R", f"{sizes.quiet_rate:g}", "-P", "2") + dur + procs
    # the hot channel: 8 connections publishing to it as fast as the server answers,
    # from HOT_LEAD_S before the quiet run starts until after it ends
    hot = ("-P", "8", "-C", "1", "--warmup", "0.5", "-T", f"{d + 5:g}") + procs
    rows.append(Scenario(
        "isolation_alone", f"f) {sizes.quiet_channels} quiet ch, alone", "channels", quiet, d,
        metric="p99", counts={"channels": sizes.quiet_channels, "rate": sizes.quiet_rate}))
    rows.append(Scenario(
        "isolation_hot", f"f) {sizes.quiet_channels} quiet ch + 1 hot ch", "channels", quiet, d,
        metric="p99_rise", targets={"*/*": 1.25}, hot_args=hot, baseline="isolation_alone",
        counts={"channels": sizes.quiet_channels, "rate": sizes.quiet_rate, "hot_pub_conns": 8}))
    return rows


def figures(kind: str, result: dict, metric: str = "cpu") -> dict:
    """The comparable figures of one lpbench result (None where not measured)."""
    out = _figures(kind, result)
    if metric in ("p99", "p99_rise"):
        out["cpu_us_per_op"] = None
    return out


def _figures(kind: str, result: dict) -> dict:
    lat = result.get("latency") or {}
    if kind == "publish":
        return {"ops_per_s": result.get("req_per_s"), "cpu_us_per_op": result.get("server_cpu_us_per_req"),
                "p50_ms": lat.get("p50_ms"), "p99_ms": lat.get("p99_ms"),
                "rss_kb": result.get("rss_kb_after"), "lost": 0, "dup": 0,
                "errors": result.get("errors", 0), "bytes_per_conn": None,
                "threads_us_per_op": result.get("server_threads_us_per_req")}
    if kind == "idle":
        idle_mem = result.get("mem_idle_kb") or {}
        return {"ops_per_s": None, "cpu_us_per_op": None, "p50_ms": None, "p99_ms": None,
                "rss_kb": idle_mem.get("rss_kb"),
                # a held poll that never got its verification message counts as lost
                "lost": result.get("connected", 0) - result.get("held_verified", 0), "dup": 0,
                "errors": result.get("sub_errors", 0) + result.get("conns", 0) - result.get(
                    "connected", 0),
                "bytes_per_conn": result.get("rss_bytes_per_conn")}
    errors = result.get("sub_errors", 0) + result.get("pub_errors", 0) + result.get("bad_bodies", 0)
    if not result.get("drained", True) or not result.get("warmup_ok", True):
        errors += 1
    return {"ops_per_s": result.get("deliveries_per_s"),
            "cpu_us_per_op": result.get("server_cpu_us_per_delivery"),
            "p50_ms": lat.get("p50_ms"), "p99_ms": lat.get("p99_ms"),
            "rss_kb": result.get("server_rss_kb_end"),
            "lost": result.get("lost", 0) + result.get("undelivered_at_end", 0),
            "dup": result.get("dup", 0), "errors": errors, "bytes_per_conn": None,
            "threads_us_per_op": result.get("server_threads_us_per_delivery")}
