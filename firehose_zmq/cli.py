"""The command line every firehose command shares: options, logging, the config.

``command_parser(prog, description)`` gives an ``argparse`` parser with
``--version``, ``--log-level``, ``--log-format`` and (for the server commands)
``--config`` and ``--print-config``; ``start(parser, argv)`` parses, checks the
log level (a bad one is one line on stderr and exit status 2), configures logging
once, loads the config and answers ``--print-config``. A ``main(argv)`` then
reads::

    started = cli.start(parser, argv)
    if started.exit_code is not None:
        return started.exit_code

``settle()``, called by the edge and the worker once they serve, tunes Python's
cyclic garbage collector for a server (see its docstring).

``--log-format json`` writes one JSON object per line with the fields of the
text format: ``time``, ``level``, ``logger``, ``pid``, ``message`` (and
``exception`` when there is one).
"""

import argparse
from dataclasses import dataclass
import gc
import json
import logging
import sys
import time
from typing import Optional

from . import __version__
from .config import ConfigError, effective_values, load_config_with_sources

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"

log = logging.getLogger("firehose.cli")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname,
                 "logger": record.name, "pid": record.process, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)

    def formatTime(self, record, datefmt=None) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        return f"{seconds}.{int(record.msecs):03d}{time.strftime('%z', time.localtime(record.created))}"


def configure_logging(level: str, log_format: str = "text") -> None:
    """Send every record at ``level`` and above to stderr in ``log_format``."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def command_parser(prog: str, description: str, config: bool = True) -> argparse.ArgumentParser:
    """A parser with the shared options; ``config`` adds ``--config`` and ``--print-config``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    parser.add_argument("--log-level", default="INFO",
                        help=f"one of {', '.join(LOG_LEVELS)} (default INFO)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="text (default) or json: one object per line")
    if config:
        parser.add_argument("--config",
                            help="cluster config (TOML); default: the embedded local one")
        parser.add_argument("--print-config", action="store_true",
                            help="print every setting, its value and where it came from; exit")
    return parser


@dataclass
class Started:
    args: argparse.Namespace
    config: object = None       # the ClusterConfig, for commands with --config
    exit_code: Optional[int] = None  # set when main should return at once


def start(parser: argparse.ArgumentParser, argv=None, overrides=None) -> Started:
    """Parse ``argv``, configure logging, load the config (see the module docstring).

    ``overrides(args)`` may return ``{("section", "key"): (value, "--flag")}``: the
    command-line flags that set config keys, above every other source."""
    args = parser.parse_args(argv)
    level = args.log_level.upper()
    if level not in LOG_LEVELS:
        print(f"{parser.prog}: --log-level must be one of {', '.join(LOG_LEVELS)}, "
              f"not {args.log_level!r}", file=sys.stderr)
        return Started(args, exit_code=2)
    args.log_level = level
    configure_logging(level, args.log_format)
    if not hasattr(args, "config"):
        return Started(args)
    try:
        config, sources = load_config_with_sources(
            args.config, overrides=overrides(args) if overrides else None)
    except ConfigError as exc:
        logging.getLogger(f"firehose.{parser.prog.removeprefix('firehose-')}").error("%s", exc)
        return Started(args, exit_code=2)
    if args.print_config:
        print_config(config, sources, args.config)
        return Started(args, config, exit_code=0)
    return Started(args, config)


def print_config(config, sources: dict, path, out=None) -> None:
    """Every key as ``name = value  # source; VARIABLE`` (the value in TOML syntax)."""
    out = out or sys.stdout
    rows = [(name, json.dumps(list(value) if isinstance(value, tuple) else value), source, var)
            for name, value, source, var in effective_values(config, sources, path)]
    width = max(len(f"{name} = {value}") for name, value, _, _ in rows)
    for name, value, source, variable in rows:
        out.write(f"{f'{name} = {value}':<{width}}  # {source}; {variable}\n")
    out.flush()


# Allocations between two collections of the youngest generation, and how many
# of those (then of generation 1's) before the next generation is collected.
GC_THRESHOLDS = (50000, 20, 10)


def settle() -> None:
    """Once a server's start-up is done: keep what it built (modules, config,
    sockets, tables) out of every later collection (``gc.freeze``), and collect
    the youngest generation once allocations outnumber deallocations by
    ``GC_THRESHOLDS[0]`` instead of Python's 700. A connection or request
    allocates tens of objects that die young and almost never form cycles, so the
    default ran a collection every few deliveries, each scanning every
    connection's objects, and found nothing. Cycles are collected much less often
    (under steady churn the count grows slowly), so what is freed per connection
    must not rely on them: a closed connection drops its stream, which points back
    at it."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
