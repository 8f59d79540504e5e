"""Large arrays through the cluster's shared-memory directory (SharedBytes in
value.proto): written once by their producer, mapped copy-on-write by their
consumer, equal to what was sent, and never left behind, also when a worker
or a driver dies; bad references are refused with a clear error."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import casanode
import clusters
from casanode._pb.casa.node.v1 import driver_pb2, value_pb2

# Small enough to keep the tests quick, large enough to be above the 64 KiB
# the codec treats as large anyway.
THRESHOLD = 1 << 17


@pytest.fixture(scope="module")
def cluster(request, transport):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CASA_NODE_SHM_THRESHOLD", str(THRESHOLD))
        return clusters.started(request, transport=transport)


@pytest.fixture(scope="module")
def client(cluster):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CASA_NODE_SHM_THRESHOLD", str(THRESHOLD))
        client = casanode.connect(cluster.endpoint)
    assert client.connection.shared, "the driver found the cluster's directory"
    yield client
    client.close()


def directory(client):
    return client.connection.shared.path


def only_tag(client, deadline=30):
    """Waits (bounded) until the directory holds nothing but its tag, for
    the sweeps that run when a process has gone; returns its content."""
    end = time.monotonic() + deadline
    while True:
        content = sorted(os.listdir(directory(client)))
        if content == ["tag"] or time.monotonic() > end:
            return content
        time.sleep(0.05)


MAPPED_SOURCE = textwrap.dedent('''
    def mapped(array):
        """True when the array's memory is a mapping (an mmap at the end
        of its base chain)."""
        import mmap
        base = array
        while base is not None:
            if isinstance(base, mmap.mmap):
                return True
            base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
        return False
''')

# `mapped` here, and in every worker's namespace (define_mapped).
exec(MAPPED_SOURCE)


def big(dtype, rng=np.random.default_rng(5)):
    dtype = np.dtype(dtype)
    n = 2 * THRESHOLD // dtype.itemsize + 3
    if dtype.kind == "b":
        return rng.random(n) > 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, n, dtype=dtype.newbyteorder("=")).astype(dtype)
    if dtype.kind == "c":
        return (rng.random(n) + 1j * rng.random(n)).astype(dtype)
    return rng.random(n).astype(dtype)


DTYPES = ["?", "i1", "u1", "<i2", ">i2", "<u2", "<i4", ">i4", "<u4", "<i8", ">i8", "<u8",
          "<f2", "<f4", ">f4", "<f8", ">f8", "<c8", "<c16", ">c16"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_goes_both_ways_through_shared_memory(client, dtype):
    x = big(dtype)
    # The worker says whether its parameter was mapped; the driver checks
    # its return value.
    command = "(x, mapped(x), sorted(os.listdir(os.environ['CASA_NODE_SHM_DIR'])))"
    response = client.submit(command, target=1, parameters={"x": x}).result(60)
    assert response["successful"], response["traceback"]
    back, worker_mapped, listing = response["ret"]
    assert worker_mapped, "the worker's parameter is a mapping of the driver's file"
    assert listing == ["tag"], "the worker unlinked the file once mapped"
    assert back.dtype == x.dtype and back.shape == x.shape and np.array_equal(back, x)
    assert mapped(back), "the driver's return value is a mapping of the worker's file"
    assert only_tag(client, 0) == ["tag"]


@pytest.fixture(autouse=True)
def define_mapped(client):
    """`mapped` in every worker's namespace."""
    for f in client.broadcast(MAPPED_SOURCE):
        assert f.result(60)["successful"]


@pytest.mark.parametrize("make", [
    lambda: big("<f8").reshape(-1, 3 if big("<f8").size % 3 == 0 else 1),
    lambda: np.arange(3 * THRESHOLD, dtype=np.int32).reshape(8, -1, 3),
    lambda: np.arange(4 * THRESHOLD, dtype=np.float64)[::3],  # non-contiguous
    lambda: np.asfortranarray(np.arange(THRESHOLD, dtype=np.float64).reshape(256, -1)),
    lambda: np.arange(THRESHOLD, dtype=np.float64).reshape(256, -1).T,
], ids=["2d", "3d", "strided", "fortran", "transposed"])
def test_shapes_and_layouts_come_back_equal(client, make):
    x = make()
    response = client.submit("x", target=2, parameters={"x": x}).result(60)
    assert response["successful"], response["traceback"]
    assert response["ret"].shape == x.shape and np.array_equal(response["ret"], x)
    assert mapped(response["ret"])


@pytest.mark.parametrize("value", [
    np.array(2.5), np.zeros((0, 5)), np.float32(1.5), np.array([1, 2, 3]),
], ids=["0-d", "empty", "scalar", "small"])
def test_small_values_stay_inline(client, value):
    response = client.submit("x", target=1, parameters={"x": value}).result(60)
    ret = response["ret"]
    assert type(ret) is type(value) and ret.dtype == value.dtype
    assert np.array_equal(ret, value) and ret.shape == np.shape(value)
    assert not isinstance(ret, np.ndarray) or not mapped(ret)


def test_a_mapped_return_value_is_writable_and_changes_nothing_else(client):
    x = big("<f8")
    keep = x.copy()
    future = client.submit("x", target=1, parameters={"x": x})
    first = future.result(60)["ret"]
    assert mapped(first) and first.flags.writeable
    first[:] = -1
    # Neither the driver's own array nor another decode of the same
    # response sees the write.
    assert np.array_equal(x, keep)
    again = client.response(future.id)["ret"]
    assert mapped(again) and np.array_equal(again, keep)
    # Nor does a worker's own copy (pushed, kept in its globals).
    client.submit("push", target=2, parameters={"kept": x}).result(60)
    got = client.submit("kept", target=2).result(60)["ret"]
    got[:] = 0
    assert np.array_equal(client.submit("kept", target=2).result(60)["ret"], keep)
    assert only_tag(client, 0) == ["tag"]


def test_many_in_flight(client):
    arrays = [np.full(1 << 18, i, dtype=np.float64) for i in range(50)]  # 2 MiB each
    futures = [client.submit("x * 1", parameters={"x": a}) for a in arrays]
    for a, f in zip(arrays, futures):
        r = f.result(120)
        assert r["successful"], r["traceback"]
        assert np.array_equal(r["ret"], a)
    assert {f.result()["server"] for f in futures} == {1, 2}
    assert only_tag(client, 0) == ["tag"]


def test_a_worker_killed_while_holding_a_mapped_parameter_leaves_nothing(client):
    x = big("<f8")
    command = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    response = client.submit(command, target=1, parameters={"x": x}).result(120)
    assert not response["successful"] and "died" in response["traceback"]
    assert only_tag(client) == ["tag"]
    again = client.submit("x.sum() + 0", target=1, parameters={"x": x}).result(60)
    assert again["successful"], again["traceback"]
    assert again["ret"] == x.sum()


def test_a_driver_killed_after_writing_its_files_leaves_nothing(client, cluster):
    script = textwrap.dedent(f'''
        import os, signal, sys
        import numpy as np
        import casanode
        client = casanode.connect({cluster.endpoint!r})
        assert client.connection.shared
        x = np.ones({2 * THRESHOLD}, dtype=np.float64)
        # The result comes back after the driver is gone.
        client.submit("time.sleep(0.3) or x", target=1, parameters={{"x": x}})
        # A value it was in the middle of writing.
        fd = os.open("tmp-%d-x" % os.getpid(), os.O_CREAT | os.O_WRONLY, 0o600,
                     dir_fd=client.connection.shared.fd)
        os.write(fd, b"half")
        print("written", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    ''')
    env = dict(os.environ, CASA_NODE_SHM_THRESHOLD=str(THRESHOLD),
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    child = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert child.stdout.strip() == "written"
    # Server 1 answers in order: once this is back, so is the dead
    # driver's response, which the head node dropped with its file.
    assert client.submit("1", target=1).result(60)["ret"] == 1
    assert only_tag(client) == ["tag"]


def bad_reference(client, name, length, shape=(4,), dtype="<f8"):
    """The response to a hand-made request whose parameter `x` refers to
    `name` in the directory."""
    value = value_pb2.Value()
    value.ndarray_value.dtype = dtype
    value.ndarray_value.shape.extend(shape)
    value.ndarray_value.shared.name = name
    value.ndarray_value.shared.length = length
    request = driver_pb2.SubmitRequest(command="x", targets=[1])
    request.parameters.add(name="x", value=value)
    [rid] = client._accepted(client.connection.request(submit_request=request), False)
    return client._future(rid).result(60)


def make_file(client, name, size=32):
    with open(os.path.join(directory(client), name), "wb") as f:
        f.write(b"\0" * size)


def test_bad_references_fail_the_command_clearly(client):
    d = directory(client)
    make_file(client, "v-target")
    os.symlink(os.path.join(d, "v-target"), os.path.join(d, "v-link"))
    make_file(client, "v-short", 16)
    make_file(client, "v-shape", 32)
    cases = [
        ("a/b", 32, "invalid shared-memory file name"),
        ("..", 32, "invalid shared-memory file name"),
        ("../tag", 32, "invalid shared-memory file name"),
        ("v-missing", 32, "No such file"),
        ("v-link", 32, "v-link"),
        ("v-short", 32, "shorter than the 32"),
        ("v-shape", 24, "needs 32 bytes, not 24"),
    ]
    if os.geteuid() == 0:
        make_file(client, "v-other")
        os.chown(os.path.join(d, "v-other"), 65534, 65534)
        cases.append(("v-other", 32, "belongs to another user"))
    for name, length, message in cases:
        response = bad_reference(client, name, length)
        assert not response["successful"], name
        traceback = response["traceback"]
        assert "parameter 'x'" in traceback and message in traceback, (name, traceback)
        # The worker and the node go on.
        assert client.submit("41 + 1", target=1).result(60)["ret"] == 42
    assert sorted(os.listdir(d)) == ["tag", "v-target"]
    os.unlink(os.path.join(d, "v-target"))


def test_a_bad_reference_in_a_response_is_a_clear_error(client):
    from casanode import values

    value = value_pb2.Value()
    value.ndarray_value.dtype = "<f8"
    value.ndarray_value.shape.append(4)
    value.ndarray_value.shared.name = "v-nowhere"
    value.ndarray_value.shared.length = 32
    names = values.claim_shared(value, client.connection.shared)
    try:
        with pytest.raises(ValueError, match="'v-nowhere': No such file"):
            values.from_value(value)
    finally:
        values.release_shared(names)


def test_a_shared_array_next_to_large_inline_leaves(client):
    x = big("<f8")
    blob = bytes(range(256)) * 1024  # 256 KiB of bytes: inline, a large leaf
    response = client.submit("(x, blob, [x[:4]])", target=2, parameters={"x": x, "blob": blob}).result(60)
    assert response["successful"], response["traceback"]
    back, blob_back, [head] = response["ret"]
    assert np.array_equal(back, x) and mapped(back) and blob_back == blob
    assert np.array_equal(head, x[:4])
    assert np.array_equal(response["parameters"]["x"], x) and response["parameters"]["blob"] == blob
    assert only_tag(client, 0) == ["tag"]


def test_the_directory_goes_with_the_cluster(transport):
    # One left by a head node that died: removed at the next start.
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    stale = f"/dev/shm/casa-node-{os.getuid()}-{dead.pid}-0123456789abcdef"
    os.mkdir(stale, 0o700)
    open(os.path.join(stale, "v-left"), "wb").close()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CASA_NODE_SHM_THRESHOLD", str(THRESHOLD))
        cluster = clusters.start(1, transport)
        try:
            client = casanode.connect(cluster.endpoint)
            d = directory(client)
            assert os.path.isdir(d) and os.stat(d).st_mode & 0o777 == 0o700
            x = big("<f8")
            assert np.array_equal(client.submit("x", parameters={"x": x}).result(60)["ret"], x)
            client.close()
            assert not os.path.exists(stale)
        finally:
            clusters.stop(cluster)
            shutil.rmtree(stale, ignore_errors=True)
    assert not os.path.exists(d)


def test_a_server_that_cannot_use_the_directory_gets_values_inline(transport, tmp_path):
    if transport != "zmq":
        pytest.skip("attaching a server by hand is a ZeroMQ feature")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CASA_NODE_SHM_THRESHOLD", str(THRESHOLD))
        cluster = clusters.start(1, transport)
    server = None
    try:
        line = cluster.proc.stdout.readline().decode()
        assert line.startswith("nodes: "), line
        # As if on another host: shared memory off in that server.
        env = dict(os.environ, CASA_NODE_SHM_THRESHOLD="0")
        server = subprocess.Popen(
            [str(clusters.BINARY), "server", "--connect", line[len("nodes: "):].strip(),
             "--python", sys.executable],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "server.stderr", "wb"),
        )
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CASA_NODE_SHM_THRESHOLD", str(THRESHOLD))
            client = casanode.connect(cluster.endpoint)
        end = time.monotonic() + 60
        while 2 not in client.status() and time.monotonic() < end:
            time.sleep(0.05)
        x = big("<f8")
        check = "(x, type(x.base).__name__, __import__('os').environ.get('CASA_NODE_SHM_DIR'))"
        for rank in (1, 2):
            r = client.submit(check, target=rank, parameters={"x": x}).result(60)
            assert r["successful"], r["traceback"]
            back, base, shm_dir = r["ret"]
            assert np.array_equal(back, x)
            if rank == 2:
                assert shm_dir is None and base != "mmap", "server 2 got the value inline"
                assert not mapped(back), "and sent its return value inline"
            else:
                assert shm_dir == directory(client) and mapped(back)
        # A list of targets: server 1 maps a name of its own for the file,
        # server 2 gets the bytes inline.
        for f in client.broadcast(MAPPED_SOURCE):
            assert f.result(60)["successful"]
        futures = client.submit("(x, mapped(x))", target=[1, 2], parameters={"x": x})
        rs = [f.result(60) for f in futures]
        assert all(r["successful"] for r in rs), [r["traceback"] for r in rs]
        assert all(np.array_equal(r["ret"][0], x) for r in rs)
        assert [r["ret"][1] for r in rs] == [True, False]
        assert only_tag(client, 0) == ["tag"]
        client.close()
    finally:
        if server is not None:
            server.kill()
            server.wait(10)
        clusters.stop(cluster)


def test_a_driver_without_shared_memory_gets_values_inline(cluster, client):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CASA_NODE_SHM_THRESHOLD", "0")
        plain = casanode.connect(cluster.endpoint)
    try:
        assert not plain.connection.shared
        x = big("<f8")
        r = plain.submit("x * 1", target=1, parameters={"x": x}).result(60)
        assert np.array_equal(r["ret"], x) and not mapped(r["ret"])
        assert only_tag(client, 0) == ["tag"]
    finally:
        plain.close()


def test_several_targets_each_map_the_one_file_the_driver_wrote(client):
    x = big("<f8")
    one = client.submit("(x, mapped(x))", target=[2], parameters={"x": x})[0].result(60)
    assert one["ret"][1], "one request: the file is its own"
    futures = client.submit("(x, mapped(x), float(x[-1]))", target=[1, 2, 1], parameters={"x": x})
    for r in [f.result(60) for f in futures]:
        assert r["successful"], r["traceback"]
        back, worker_mapped, last = r["ret"]
        assert worker_mapped, "each request's worker maps the driver's file under a name of its own"
        assert np.array_equal(back, x) and last == float(x[-1])
        assert r["parameters"]["x"] is x or np.array_equal(r["parameters"]["x"], x)
    assert only_tag(client, 0) == ["tag"]


def test_a_submission_that_fails_to_encode_leaves_no_file(client):
    class Unsendable:
        def __reduce__(self):
            raise TypeError("not today")

    with pytest.raises(TypeError, match="not today"):
        client.submit("x", target=1, parameters={"x": big("<f8"), "y": Unsendable()})
    assert only_tag(client, 0) == ["tag"]
