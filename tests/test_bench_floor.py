"""bench/floor.py, the no-work reference servers, answer as lpbench expects."""

import subprocess
import sys
from pathlib import Path

import pytest

from .cluster import free_port
from .http import request

FLOOR = Path(__file__).resolve().parent.parent / "bench" / "floor.py"


@pytest.mark.parametrize("kind", ["tornado", "asyncio", "zmq", "zmq-batch"])
def test_floor_server_answers_put_and_get(kind):
    port = free_port()
    server = subprocess.Popen([sys.executable, str(FLOOR), kind, "--port", str(port),
                               "--lifetime", "30"])
    try:
        import socket
        import time
        deadline = time.monotonic() + 10
        while True:  # bounded: until the server accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "floor server did not start"
                assert server.poll() is None, "floor server exited"
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/c"
        assert request(url, "PUT", b"hello").status == 202
        assert request(url).status == 204
    finally:
        server.kill()
        server.wait(10)
