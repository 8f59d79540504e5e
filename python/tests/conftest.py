import pathlib

import pytest

import casanode
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


@pytest.fixture(scope="module")
def cluster(request, transport):
    """A cluster of two servers for the module, over the transport under test."""
    return clusters.started(request, transport=transport)


@pytest.fixture
def seed_client(cluster):
    """The seed's MPICommandClient on the module's cluster."""
    with clusters.seed_session(cluster.endpoint) as client:
        yield client


@pytest.fixture(scope="module")
def client(cluster):
    """A modern casanode.Client on the module's cluster."""
    client = casanode.connect(cluster.endpoint)
    yield client
    client.close()
