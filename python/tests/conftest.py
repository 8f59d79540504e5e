import pathlib

import pytest

import clusters

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def repo():
    return REPO


@pytest.fixture(scope="session", params=clusters.TRANSPORTS)
def transport(request):
    """The transport a cluster test runs over: each in
    $CASA_NODE_TEST_TRANSPORTS (default zmq)."""
    return request.param
