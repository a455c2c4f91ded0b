"""firehose-keys: generate CURVE key pairs for the ZeroMQ links.

``firehose-keys --dir DIR NAME...`` writes, for each NAME, ``DIR/NAME.key`` (the
public key: copy it to the hosts that connect to or admit NAME; mode 0644) and
``DIR/NAME.key_secret`` (both halves: keep it on NAME's host only; mode 0600,
created that way, never readable by others even for a moment). Both are
ZeroMQ certificate files (``zmq.auth.load_certificate`` reads them). An
existing file is never overwritten unless ``--force`` is given.
"""

import argparse
import datetime
import os
import sys

import zmq

_BANNER = ("#   ZeroMQ CURVE {kind} key for {name}, written by firehose-keys on {date}\n"
           "#   {advice}\n")


def _write(path: str, mode: int, text: str, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)  # an existing file keeps its mode through O_TRUNC
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def write_key_pair(directory: str, name: str, force: bool = False) -> tuple:
    """Generate a key pair; returns (public file, secret file, z85 public key)."""
    public, secret = zmq.curve_keypair()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    public_path = os.path.join(directory, f"{name}.key")
    secret_path = os.path.join(directory, f"{name}.key_secret")
    _write(secret_path, 0o600, _BANNER.format(
        kind="secret", name=name, date=date, advice="Keep this file on its own host, mode 0600.")
        + body + f'    secret-key = "{secret.decode()}"\n', force)
    _write(public_path, 0o644, _BANNER.format(
        kind="public", name=name, date=date, advice="Give this file to its peers.") + body, force)
    return public_path, secret_path, public.decode()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="firehose-keys", description="Generate CURVE key pairs (NAME.key, NAME.key_secret) "
        "for the ZeroMQ links of a firehose-zmq cluster.")
    parser.add_argument("names", nargs="+", metavar="NAME",
                        help="a name per key pair, e.g. w1 w2 edge native")
    parser.add_argument("--dir", default=".", help="directory to write into (default: .)")
    parser.add_argument("--force", action="store_true", help="overwrite existing key files")
    args = parser.parse_args(argv)
    if not zmq.has("curve"):
        print("firehose-keys: this libzmq has no CURVE support", file=sys.stderr)
        return 1
    for name in args.names:
        if not name or "/" in name or name.startswith("."):
            print(f"firehose-keys: {name!r} is not a usable file name", file=sys.stderr)
            return 2
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    for name in args.names:
        try:
            public_path, secret_path, public = write_key_pair(args.dir, name, args.force)
        except FileExistsError as exc:
            print(f"firehose-keys: {exc.filename} exists (use --force to replace it)",
                  file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"firehose-keys: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"{name}: {public_path} (public {public}), {secret_path} (secret, 0600)")
    return 0
