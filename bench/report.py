"""Summaries of a benchmark run: medians per server, ratios, the table and the chart.

Input is the run document built by run.py: ``{"meta": ..., "scenarios": [row, ...]}``
where each row has ``modes`` (firehose-zmq's durability modes it ran in), ``runs:
{server: [result, ...]}`` (a result is an lpbench JSON object, or ``{"error": ...}``)
and ``status: {server: "ok" | "not available: ..."}``. Servers are labelled
``firehose-zmq-<mode>``, ``nchan`` (messages in nginx's memory) and
``nchan-redis-<appendfsync>``. Each of our modes is paired with the peer that keeps
messages as durably (``PEER_OF``), and also compared with in-memory Nchan.
``summarise()`` adds ``median`` and, per mode, a ``pairs`` entry with both ratios;
``table()`` renders one line per scenario and mode.
"""

import statistics

OURS = "firehose-zmq"
PEER = "nchan"
REDIS_PEER = "nchan-redis"
MODES = ("memory", "async", "sync")  # least to most durable
FSYNC_OF = {"async": "everysec", "sync": "always"}  # Redis appendfsync matching our mode
FIGURES = ("ops_per_s", "cpu_us_per_op", "p50_ms", "p99_ms", "rss_kb", "bytes_per_conn",
           "publishes_per_commit")


def ours(mode: str) -> str:
    return f"{OURS}-{mode}"


def redis_peer(fsync: str) -> str:
    return f"{REDIS_PEER}-{fsync}"


def peer_of(mode: str) -> str:
    """The peer that keeps messages as durably as our ``mode``: memory with in-memory
    Nchan, async with Nchan + Redis ``everysec``, sync with Nchan + Redis ``always``."""
    return redis_peer(FSYNC_OF[mode]) if mode in FSYNC_OF else PEER


def is_ours(server: str) -> bool:
    return server.startswith(OURS + "-")


def mode_of(server: str) -> str:
    return server[len(OURS) + 1:]


def server_order(servers) -> list:
    """Column order: our modes, then in-memory Nchan, then Nchan + Redis by fsync."""
    order = ([ours(m) for m in MODES] + [PEER]
             + [redis_peer(f) for f in ("everysec", "always")])
    return sorted(set(servers), key=lambda s: order.index(s) if s in order else len(order))


def median_figures(figure_list: list) -> dict:
    """Median of each figure over repeats; lost, dup and errors are summed (must be 0)."""
    out = {}
    for key in FIGURES:
        values = [f[key] for f in figure_list if f.get(key) is not None]
        out[key] = round(statistics.median(values), 3) if values else None
    for key in ("lost", "dup", "errors"):
        out[key] = sum(f.get(key) or 0 for f in figure_list)
    threads = [f["threads_us_per_op"] for f in figure_list if f.get("threads_us_per_op")]
    if threads:
        names = sorted({name for t in threads for name in t})
        out["threads_us_per_op"] = {name: round(statistics.median(t.get(name, 0.0) for t in threads), 1)
                                    for name in names}
    out["runs"] = len(figure_list)
    return out


def _ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return round(a / b, 2)


def _headline(row: dict, server: str):
    """The figure a row compares: CPU us/op, bytes/conn, or the p99 rise."""
    m = row["median"].get(server) or {}
    if row["metric"] == "cpu":
        return m.get("cpu_us_per_op")
    if row["metric"] == "bytes":
        return m.get("bytes_per_conn")
    if row["metric"] == "p99_rise":
        return row["p99_rise"].get(server)
    return None


def target_for(row: dict, mode: str, peer: str):
    """The issue's target for our ``mode`` against ``peer``, None if it sets none."""
    targets = row.get("targets") or {}
    for key in (f"{mode}/{peer}", f"*/{peer}", "*/*"):
        if key in targets:
            return targets[key]
    return None


def summarise(doc: dict) -> dict:
    """Fill ``median`` per server and ``pairs`` per mode: our figure, the matched peer's
    and in-memory Nchan's, the ratios (ours / peer; for the isolation row, the p99
    rises side by side) and whether each meets its target."""
    by_key = {row["key"]: row for row in doc["scenarios"]}
    for row in doc["scenarios"]:
        row["median"] = {server: median_figures([r["figures"] for r in runs if "figures" in r])
                         for server, runs in row["runs"].items()}
    for row in doc["scenarios"]:
        med = row["median"]
        if row["metric"] == "p99_rise":
            base = by_key.get(row.get("baseline"), {}).get("median", {})
            row["p99_rise"] = {s: _ratio(m.get("p99_ms"), base.get(s, {}).get("p99_ms"))
                               for s, m in med.items()}
        pairs = {}
        for mode in row.get("modes", []):
            mine = _headline(row, ours(mode))
            pair = {"peer": peer_of(mode)}
            for name, peer in (("peer", peer_of(mode)), ("nchan", PEER)):
                theirs = _headline(row, peer)
                if row["metric"] == "p99_rise":
                    ratio = mine  # the target is on our own rise; the peer's is shown beside
                else:
                    ratio = _ratio(mine, theirs)
                target = target_for(row, mode, peer)
                pair[f"ratio_{name}"] = ratio
                pair[f"target_{name}"] = target
                pair[f"meets_{name}"] = (None if ratio is None or target is None
                                         else ratio <= target)
            pairs[mode] = pair
        row["pairs"] = pairs
    return doc


def _k(v, unit=""):
    if v is None:
        return "-"
    if v >= 10_000:
        return f"{v / 1000:.0f}k{unit}"
    if v >= 1000:
        return f"{v / 1000:.1f}k{unit}"
    return f"{v:.0f}{unit}"


def _f(v, nd=1):
    return "-" if v is None else f"{v:.{nd}f}"


def _cell(row: dict, server: str) -> str:
    """One server's block: rate, CPU us/op (or bytes/conn), p50/p99 ms, RSS MB, lost/dup,
    and for firehose-zmq on disk the publishes per store commit."""
    status = row["status"].get(server)
    if status is None:
        return "(not run)"
    if status != "ok":
        return status[:44]
    m = row["median"].get(server) or {}
    if not m.get("runs"):
        return "failed (see log)"
    if row["metric"] == "bytes":
        main = f"{_k(m['bytes_per_conn'], 'B') + '/conn':>15}"
    else:
        main = f"{_k(m['ops_per_s']) + '/s':>7} {_f(m['cpu_us_per_op']):>7}"
    lat = f"{_f(m['p50_ms'])}/{_f(m['p99_ms'])}"
    rss = "-" if m["rss_kb"] is None else f"{m['rss_kb'] / 1024:.0f}M"
    flag = "" if not m["errors"] else f" err{m['errors']}"
    per_commit = "" if m.get("publishes_per_commit") is None else f" {m['publishes_per_commit']:.1f}/c"
    return f"{main} {lat:>11} {rss:>5} {m['lost']}/{m['dup']}{flag}{per_commit}"


def _versus(row: dict, pair: dict, name: str) -> str:
    ratio, target, meets = pair[f"ratio_{name}"], pair[f"target_{name}"], pair[f"meets_{name}"]
    if row["metric"] == "p99_rise":
        peer = pair["peer"] if name == "peer" else PEER
        theirs = row.get("p99_rise", {}).get(peer)
        txt = f"p99 x{_f(ratio, 2)} (x{_f(theirs, 2)})"
    else:
        txt = "-" if ratio is None else f"{ratio:.2f}x"
    if target is not None:
        txt += f" (<={target:g}{ {True: ' ok', False: ' MISS', None: ''}[meets]})"
    return txt


PEER_SHORT = {PEER: "in-memory", redis_peer("everysec"): "redis everysec",
              redis_peer("always"): "redis always"}


def table(doc: dict) -> str:
    """The terminal table: per scenario, one line per durability mode of ours, beside
    the peer that keeps messages as durably, with the ratio to it and to in-memory Nchan."""
    block = "   rate   us/op  p50/p99 ms   RSS l/d"
    head = (f"{'scenario':<34} {'ours':<6} | {'firehose-zmq':<46} | {'nchan peer':<14} "
            f"{'(ws/sse rows: its long-poll)':<42} | ratio to peer (target) | to in-memory nchan")
    sub = f"{'':<34} {'mode':<6} | {block:<46} | {'':<14} {block:<42} |"
    lines = [head, sub, "-" * len(head)]
    for row in doc["scenarios"]:
        title = f"{row['title'][:34]:<34}"
        for mode in row.get("modes", []):
            pair = row["pairs"][mode]
            peer = pair["peer"]
            line = (f"{title} {mode:<6} | {_cell(row, ours(mode)):<46} | "
                    f"{PEER_SHORT.get(peer, peer):<14} {_cell(row, peer):<42} | "
                    f"{_versus(row, pair, 'peer'):<22}")
            if peer != PEER:
                line += f" | {_versus(row, pair, 'nchan')}"
            lines.append(line.rstrip())
            title = " " * 34
        if PEER in row["runs"] and "memory" not in row.get("modes", []):
            # in-memory Nchan's own figures, which the last column divides by
            lines.append(f"{title} {'':<6} | {'':<46} | {PEER_SHORT[PEER]:<14} "
                         f"{_cell(row, PEER):<42} |")
    meta = doc["meta"]
    lines.append("")
    lines.append("rate = publishes/s (a) or deliveries/s; us/op = server CPU microseconds per "
                 "publish or delivery (all server processes: the edge and workers; nginx, and "
                 "redis-server for the Redis peers); RSS at the end; l/d = lost/duplicated; "
                 "N/c = publishes per store commit.")
    lines.append("Each mode is paired with the peer that keeps messages as durably: memory with "
                 "in-memory Nchan, async with Nchan + Redis appendfsync everysec, sync with "
                 "appendfsync always. ratio = ours/peer server CPU per op (idle: bytes per "
                 "connection; isolation: quiet p99 with the hot channel / alone, ours (peer's)). "
                 f"Medians of {meta['repeats']} run(s); commit window "
                 f"{meta.get('commit_window_ms', 0)} ms; {meta.get('firehose_edges', 1)} edge(s).")
    return "\n".join(lines)


def chart(doc: dict, path) -> str:
    """Write a PNG: deliveries/s and p99 latency per scenario, every server.

    Returns the path, or raises ImportError when matplotlib is not installed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["scenarios"] if r["metric"] != "bytes"]
    servers = server_order(s for r in rows for s in r["runs"])
    fig, axes = plt.subplots(1, 2, figsize=(15, 0.45 * len(rows) + 2.5))
    height = 0.8 / max(1, len(servers))
    for ax, key, label in ((axes[0], "ops_per_s", "publishes or deliveries per second"),
                           (axes[1], "p99_ms", "p99 end-to-end latency (ms)")):
        for i, server in enumerate(servers):
            values = [(r["median"].get(server) or {}).get(key) or 0 for r in rows]
            ys = [j + i * height for j in range(len(rows))]
            ax.barh(ys, values, height=height, label=server)
        ax.set_yticks([j + height * (len(servers) - 1) / 2 for j in range(len(rows))])
        ax.set_yticklabels([r["title"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_xscale("symlog", linthresh=100)
    axes[1].set_xscale("symlog", linthresh=1)
    axes[1].set_yticklabels([])
    axes[0].legend(loc="lower right")
    fig.suptitle(f"firehose-zmq beside Nchan, {doc['meta']['started']} "
                 f"(medians of {doc['meta']['repeats']}; ws/sse rows: Nchan long-poll)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
