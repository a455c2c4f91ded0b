"""firehose-ctl: the cluster from the terminal, through an edge's admin listener.

    firehose-ctl status            each worker up or down, its channels, messages and
                                   store; the edge's connections by transport
    firehose-ctl channel NAME      owner, sequence, epoch, buffered messages, TTL,
                                   subscribers on this edge
    firehose-ctl drain HOST:PORT   make that edge (its admin address) unready, then
                                   stop as on SIGTERM; waits until it has stopped

The admin address is ``--admin``, else ``[admin] bind`` of ``--config`` (or of
the embedded default, with the environment's overrides). ``--json`` prints what
the edge answered instead of the table. Exit statuses, for scripts:
"""

import http.client
import json
import sys
import time
from urllib.parse import urlencode

from . import cli
from .config import ConfigError, split_host_port

OK = 0           # done; the cluster (or the channel's owner) is ready
UNREACHABLE = 1  # the admin listener did not answer
USAGE = 2        # bad arguments or config
NOT_READY = 3    # answered, but a worker is down or the edge is draining
NO_CHANNEL = 4   # the channel does not exist (nothing published, or expired)
STILL_RUNNING = 5  # drain: the edge did not stop in time

__doc__ += "".join(f"\n    {code}  {name}" for name, code in [
    ("OK", OK), ("UNREACHABLE", UNREACHABLE), ("USAGE", USAGE), ("NOT_READY", NOT_READY),
    ("NO_CHANNEL", NO_CHANNEL), ("STILL_RUNNING", STILL_RUNNING)]) + "\n"


class Unreachable(Exception):
    pass


def call(address: str, method: str, path: str, timeout_s: float) -> tuple:
    """``(status, body bytes)`` of one request to an admin listener; raises Unreachable."""
    host, port = split_host_port(address, "the admin address")
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise Unreachable(f"admin listener {address} did not answer {method} {path}: "
                          f"{exc}") from None
    finally:
        conn.close()


def _size(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def show_status(status: dict, out) -> int:
    subs = status["subscribers"]
    state = "draining" if status["draining"] else ("ready" if status["ready"] else "NOT READY")
    out.write(f"edge {status['http']} (admin {status['admin']}, pid {status['pid']}, "
              f"v{status['version']}): {state}\n")
    out.write(f"  connections {status['connections']}; subscribers: long-poll "
              f"{subs['long_poll']}, websocket {subs['websocket']}, sse {subs['sse']}; "
              f"publishes {status['totals'].get('published', 0)}\n")
    out.write(f"  {'worker':<10}{'state':<7}{'channels':>10}{'messages':>10}{'store':>11}"
              f"{'published':>11}\n")
    for worker in status["workers"]:
        details = worker.get("status") or {}
        state = "up" if worker["up"] else "DOWN"
        if "error" in details:
            out.write(f"  {worker['id']:<10}{state:<7}  ({details['error']})\n")
            continue
        out.write(f"  {worker['id']:<10}{state:<7}{details.get('channels', '-'):>10}"
                  f"{details.get('messages', '-'):>10}"
                  f"{_size(details.get('store', {}).get('bytes')):>11}"
                  f"{details.get('totals', {}).get('published', '-'):>11}\n")
    return OK if status["ready"] else NOT_READY


def show_channel(info: dict, out) -> int:
    worker = info["worker"] or {}
    out.write(f"channel {info['channel']}\n")
    out.write(f"  owner        {info['owner']} ({'up' if info['owner_up'] else 'DOWN'})\n")
    out.write(f"  subscribers  {info['subscribers_here']} on this edge\n")
    if "error" in worker:
        out.write(f"  (no details from {info['owner']}: {worker['error']})\n")
        return NOT_READY
    if not worker.get("exists"):
        out.write("  does not exist (nothing published, expired or deleted)\n")
        return NO_CHANNEL
    ttl = "never expires" if worker["ttl_s"] is None else f"{worker['ttl_s']} s"
    out.write(f"  sequence     {worker['seq']}\n  epoch        {worker['epoch']}\n"
              f"  buffered     {worker['buffered']} message(s)\n  ttl          {ttl}\n")
    return OK if info["owner_up"] else NOT_READY


def drain(address: str, timeout_s: float, out) -> int:
    status, body = call(address, "POST", "/drain", timeout_s)
    if status != 202:
        out.write(f"drain refused: HTTP {status} {body.decode('utf-8', 'replace').strip()}\n")
        return UNREACHABLE
    grace_s = json.loads(body)["stops_in_s"]
    out.write(f"edge {address} is draining: /readyz answers 503, it stops in {grace_s:g} s\n")
    deadline = time.monotonic() + grace_s + 30.0
    while time.monotonic() < deadline:
        try:
            call(address, "GET", "/healthz", 1.0)
        except Unreachable:
            out.write(f"edge {address} has stopped\n")
            return OK
        time.sleep(0.2)  # polling another process's state, bounded by the deadline
    out.write(f"edge {address} is still running {grace_s + 30:g} s later\n")
    return STILL_RUNNING


def main(argv=None) -> int:
    parser = cli.command_parser("firehose-ctl", "Look at and steer a running firehose-zmq "
                                "cluster through an edge's admin listener.")
    parser.add_argument("--admin", help="the edge's admin address host:port (default: "
                        "[admin] bind of the config)")
    parser.add_argument("--json", action="store_true", help="print the edge's JSON answer")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("status", help="the cluster: workers, channels, connections")
    channel = commands.add_parser("channel", help="one channel's owner, sequence, buffer, TTL")
    channel.add_argument("name", help="the channel, e.g. /chat/room1")
    drain_parser = commands.add_parser("drain", help="make an edge unready, then stop it")
    drain_parser.add_argument("edge", help="that edge's admin address host:port")
    started = cli.start(parser, argv)
    if started.exit_code is not None:
        return started.exit_code
    args, out = started.args, sys.stdout
    address = args.admin or started.config.admin.bind
    try:
        if not address:
            raise ConfigError("no admin address: [admin] bind is empty; give --admin HOST:PORT")
        if args.command == "drain":
            return drain(args.edge, args.timeout, out)
        if args.command == "status":
            status, body = call(address, "GET", "/status.json", args.timeout)
        else:
            status, body = call(address, "GET", "/channel?" + urlencode({"name": args.name}),
                                args.timeout)
        if status == 400:
            print(f"firehose-ctl: {body.decode('utf-8', 'replace').strip()}", file=sys.stderr)
            return USAGE
        if status != 200:
            print(f"firehose-ctl: HTTP {status} from {address}", file=sys.stderr)
            return UNREACHABLE
        answer = json.loads(body)
        if args.json:
            out.write(json.dumps(answer, indent=2) + "\n")
        if args.command == "status":
            return show_status(answer, out if not args.json else _Null())
        return show_channel(answer, out if not args.json else _Null())
    except Unreachable as exc:
        print(f"firehose-ctl: {exc}", file=sys.stderr)
        return UNREACHABLE
    except ConfigError as exc:
        print(f"firehose-ctl: {exc}", file=sys.stderr)
        return USAGE


class _Null:
    def write(self, text: str) -> None:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
