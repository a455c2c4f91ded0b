import asyncio

import pytest
import zmq

from .cluster import SERVING_PATHS, Cluster
from .http import reset_async_client


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A two-worker cluster shared by the tests of one module (long-poll timeout 3 s)."""
    with Cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


@pytest.fixture(scope="module", params=sorted(SERVING_PATHS))
def cluster_on_both_paths(request, tmp_path_factory):
    """A two-worker cluster whose edge reads requests on its fast path, or through
    Tornado (``--no-fast-path``): the contract is the same either way. A module
    runs its tests on both with ``cluster = cluster_on_both_paths``-style fixtures."""
    with Cluster(tmp_path_factory.mktemp("cluster"),
                 edge_args=SERVING_PATHS[request.param]) as running:
        yield running


@pytest.fixture
def fresh_cluster(tmp_path):
    """A two-worker cluster of this test's own, for tests that break it."""
    with Cluster(tmp_path) as running:
        yield running


@pytest.fixture
def run():
    """Run a coroutine to completion on a fresh loop, bounded by ``timeout_s``."""
    def runner(coro, timeout_s: float = 60.0):
        async def bounded():
            try:
                return await asyncio.wait_for(coro, timeout_s)
            finally:
                reset_async_client()
        return asyncio.run(bounded())
    return runner


@pytest.fixture
def ctx():
    """A ZeroMQ context of this test's own, destroyed (linger 0) after it."""
    context = zmq.Context()
    yield context
    context.destroy(linger=0)
