"""Helpers for the tests and the benchmark that start real processes on loopback."""

import random
import socket


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW = _ephemeral_low()
_handed_out: set = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and that no client connection will take.

    Ports are drawn below the kernel's ephemeral range, so outgoing connections
    (which get ephemeral ports: after 10,000 of them most of that range is in use or
    in TIME_WAIT) cannot grab one between this check and the server's bind; a port
    is handed out once per process.
    """
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(10000, _EPHEMERAL_LOW)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free TCP port below the ephemeral range")
