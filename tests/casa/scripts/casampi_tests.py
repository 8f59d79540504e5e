"""Runs casampi 0.6.0's own tests of its client and server interface
(casampi/tests/test_casampi.py, classes test_0_MPICommandClient and
test_MPICommandServer) with pytest, against whatever `casampi` is first on
the path: under `casa-node run --casa`, casa-node's face.

    python casampi_tests.py TEST_CASAMPI.py JUNIT.xml

Exits with pytest's status. The other classes need casampi's test data
(unittest/casampi/ of casatestdata) or test casampi's MPI internals.
"""

import os
import sys

import pytest

# Tests of these classes that cannot hold on casa-node, by design, each with
# the reason. Matched on the exact test name.
EXCLUDED = {
    # Assumes the GIL-bound server stops answering pings while
    # `pow(10, 10**17)` runs, so that the server times out and the command's
    # blocking wait returns a timeout. casa-node's server node answers pings
    # itself, outside the worker, so the server never times out: the
    # command just runs (for ever) and the test's blocking wait never
    # returns.
    "test_server_not_responsive": "casa-node's server node answers pings while its worker computes",
}


class Exclude:
    def pytest_collection_modifyitems(self, config, items):
        kept, dropped = [], []
        for item in items:
            (dropped if item.name in EXCLUDED else kept).append(item)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            for item in dropped:
                print(f"excluded {item.nodeid}: {EXCLUDED[item.name]}")
        items[:] = kept


test_file, junit = sys.argv[1:3]
import casampi  # noqa: E402  (what the tests will import)

print("casampi imported from:", os.path.abspath(list(casampi.__path__)[0]), flush=True)
directory = os.path.dirname(os.path.abspath(test_file))
sys.exit(pytest.main([
    test_file,
    "-k", "test_0_MPICommandClient or test_MPICommandServer",
    "-p", "no:cacheprovider",
    "--rootdir", directory, "--confcutdir", directory,
    "-rA", f"--junitxml={junit}",
], plugins=[Exclude()]))
