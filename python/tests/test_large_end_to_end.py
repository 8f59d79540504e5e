"""Large parameters and return values through a real cluster (issue 6):
sent from the array's own memory, received as slices of the frame, and
decoded as before: equal to what was submitted, writable, each decode a
copy of its own (rules 8, 9)."""

import numpy as np
import pytest

import casanode
import clusters
from casanode import connection

ARRAY = np.random.default_rng(9).random(1 << 20)  # 8 MiB
BLOB = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture(scope="module")
def client(cluster):
    """A driver that does not use shared memory (test_shared_memory.py
    covers that), so values travel inline: the workers' large return values
    are put inline by the head node."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CASA_NODE_SHM_THRESHOLD", "0")
        client = casanode.connect(cluster.endpoint)
    assert not client.connection.shared
    yield client
    client.close()


@pytest.fixture
def seed_client(cluster):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CASA_NODE_SHM_THRESHOLD", "0")
        with clusters.seed_session(cluster.endpoint) as client:
            yield client


def test_a_large_array_comes_back_equal_and_writable(client):
    parameters = {"x": ARRAY, "rest": [ARRAY[::2], {"blob": BLOB}], "n": 3}
    future = client.submit("(x, rest, n)", target=1, parameters=parameters)
    response = future.result(120)
    assert response["successful"], response["traceback"]
    x, rest, n = response["ret"]
    assert x.dtype == ARRAY.dtype and np.array_equal(x, ARRAY)
    assert np.array_equal(rest[0], ARRAY[::2]) and rest[1] == {"blob": BLOB} and n == 3
    echoed = response["parameters"]
    assert list(echoed) == ["x", "rest", "n"]
    assert np.array_equal(echoed["x"], ARRAY) and echoed["rest"][1]["blob"] == BLOB
    for array in (x, echoed["x"], rest[0]):
        assert array.flags.writeable and array.flags.owndata
    # Every decode is a copy of its own, as before.
    x[:] = 0
    again = client.response(future.id)
    assert np.array_equal(again["ret"][0], ARRAY) and np.array_equal(again["parameters"]["x"], ARRAY)
    # The stored record still reads as the CommandResponse message.
    record = client.connection.response(future.id)
    assert isinstance(record, connection.SplitResponse)
    assert record.id == future.id and record.server == 1 and record.successful
    assert record.message().parameters[0].name == "x"


def test_a_large_return_value_made_by_the_server(client):
    response = client.submit("b'ab' * n", parameters={"n": 1 << 20}).result(120)
    assert response["ret"] == b"ab" * (1 << 20)


def test_the_seed_pushes_large_arrays_to_several_servers(seed_client):
    responses = seed_client.push_command_request("x[::-1] * 1", True, [1, 2], {"x": ARRAY})
    assert [r["server"] for r in responses] == [1, 2]
    for r in responses:
        assert r["successful"], r["traceback"]
        assert np.array_equal(r["ret"], ARRAY[::-1])
        assert np.array_equal(r["parameters"]["x"], ARRAY)
    ids = seed_client.push_command_request("len(x)", False, [2], {"x": ARRAY})
    [r] = seed_client.get_command_response(ids, True)
    assert r["ret"] == len(ARRAY) and np.array_equal(r["parameters"]["x"], ARRAY)


def test_large_and_small_frames_interleave_with_logs(client):
    with client.logs("DEBUG") as records:
        futures = []
        for i in range(6):
            futures.append(client.submit("(print(len(x)), x)[1]", parameters={"x": BLOB * (i % 3)}))
            futures.append(client.submit("i", parameters={"i": i}))
        for i in range(6):
            assert futures[2 * i].result(120)["ret"] == BLOB * (i % 3)
            assert futures[2 * i + 1].result(120)["ret"] == i
        assert records.get(timeout=30)["message"]
