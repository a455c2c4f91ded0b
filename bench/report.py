"""Summaries of a benchmark run: medians per server, ratios, the table and the chart.

Input is the run document built by run.py: ``{"meta": ..., "scenarios": [row, ...]}``
where each row has ``runs: {server: [result, ...]}`` (a result is an lpbench JSON
object, or ``{"error": ...}``) and ``status: {server: "ok" | "not available: ..."}``.
``summarise()`` adds ``median`` and ``ratio`` to every row; ``table()`` renders it.
"""

import statistics

OURS = "firehose-zmq"
PEER = "nchan"
FIGURES = ("ops_per_s", "cpu_us_per_op", "p50_ms", "p99_ms", "rss_kb", "bytes_per_conn")


def median_figures(figure_list: list) -> dict:
    """Median of each figure over repeats; lost, dup and errors are summed (must be 0)."""
    out = {}
    for key in FIGURES:
        values = [f[key] for f in figure_list if f.get(key) is not None]
        out[key] = round(statistics.median(values), 3) if values else None
    for key in ("lost", "dup", "errors"):
        out[key] = sum(f.get(key) or 0 for f in figure_list)
    out["runs"] = len(figure_list)
    return out


def _ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return round(a / b, 2)


def summarise(doc: dict) -> dict:
    """Fill ``median`` (per server) and ``ratio`` (ours / Nchan, or the p99 rise) per row."""
    by_key = {row["key"]: row for row in doc["scenarios"]}
    for row in doc["scenarios"]:
        row["median"] = {server: median_figures([r["figures"] for r in runs if "figures" in r])
                         for server, runs in row["runs"].items()}
    for row in doc["scenarios"]:
        med = row["median"]
        ours, peer = med.get(OURS, {}), med.get(PEER, {})
        ratio = None
        if row["metric"] == "cpu":
            ratio = _ratio(ours.get("cpu_us_per_op"), peer.get("cpu_us_per_op"))
        elif row["metric"] == "bytes":
            ratio = _ratio(ours.get("bytes_per_conn"), peer.get("bytes_per_conn"))
        elif row["metric"] == "p99_rise":
            base = by_key.get(row.get("baseline"), {}).get("median", {})
            row["p99_rise"] = {s: _ratio(m.get("p99_ms"), base.get(s, {}).get("p99_ms"))
                               for s, m in med.items()}
            ratio = row["p99_rise"].get(OURS)
        row["ratio"] = ratio
        row["meets_target"] = (None if ratio is None or row.get("target") is None
                               else ratio <= row["target"])
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
    """One server's block: rate, CPU us/op (or bytes/conn), p50/p99 ms, RSS MB, lost/dup."""
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
    return f"{main} {lat:>11} {rss:>5} {m['lost']}/{m['dup']}{flag}"


def table(doc: dict) -> str:
    """The terminal table: one line per scenario, both servers side by side, the ratio."""
    servers = doc["meta"]["servers"]
    head = f"{'scenario':<34}"
    sub = " " * 34
    block = "   rate   us/op  p50/p99 ms   RSS l/d"
    for s in servers:
        label = s if s == OURS else f"{s} (ws/sse rows: its long-poll)"
        head += f" | {label:<42}"
        sub += f" | {block:<42}"
    head += " | ratio (target)"
    sub += " | ours/nchan"
    lines = [head, sub, "-" * len(head)]
    for row in doc["scenarios"]:
        line = f"{row['title'][:34]:<34}"
        for s in servers:
            line += f" | {_cell(row, s):<42}"
        r = row.get("ratio")
        if row["metric"] == "p99_rise":
            rises = row.get("p99_rise", {})
            txt = "p99 x" + "/x".join(_f(rises.get(s), 2) for s in servers)
        else:
            txt = "-" if r is None else f"{r:.2f}x"
        if row.get("target") is not None:
            mark = {True: " ok", False: " MISS", None: ""}[row.get("meets_target")]
            txt += f" (<={row['target']:g}{mark})"
        lines.append(line + f" | {txt}")
    lines.append("")
    lines.append("rate = publishes/s (a) or deliveries/s; us/op = server CPU microseconds per "
                 "publish or delivery (all server processes); RSS at the end; l/d = lost/duplicated.")
    lines.append("ratio = ours/nchan server CPU per op (idle: bytes per connection; isolation: "
                 "quiet p99 with the hot channel / alone, per server). Medians of "
                 f"{doc['meta']['repeats']} run(s).")
    return "\n".join(lines)


def chart(doc: dict, path) -> str:
    """Write a PNG: deliveries/s and p99 latency per scenario, both servers.

    Returns the path, or raises ImportError when matplotlib is not installed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["scenarios"] if r["metric"] != "bytes"]
    servers = doc["meta"]["servers"]
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
