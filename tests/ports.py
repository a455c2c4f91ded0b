"""A block of consecutive free loopback ports, for the embedded default moved by FIREHOSE_PORT_BASE."""

import random
import socket

from firehose_zmq.testing import _EPHEMERAL_LOW


def free_port_block(size: int = 11) -> int:
    """The first of ``size`` consecutive ports free on 127.0.0.1 now, below the ephemeral range."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10000, _EPHEMERAL_LOW - size)
        held = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {size} consecutive free ports")
