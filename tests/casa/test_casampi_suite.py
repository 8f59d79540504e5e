"""casampi 0.6.0's own tests of MPICommandClient, MPIInterface and
MPICommandServer (test_0_MPICommandClient, test_0_MPIInterface,
test_mpi_runtime_settings, test_MPICommandServer: the classes that need no
data; env.sh takes
test_casampi.py out of the wheel) under `casa-node run --casa --heartbeat 5
--timeout 15`, with the real casampi installed in the environment as well:
casa-node's face must be the one found. scripts/casampi_tests.py lists the
tests left out, each with its reason."""

import os
import pathlib
import sysconfig
import xml.etree.ElementTree as ElementTree

import pytest

from conftest import TARGET, background_run, start_casa_node_run

TEST_FILE = pathlib.Path(os.environ.get("CASA_NODE_CASAMPI_TESTS")
                         or TARGET / "casampi-0.6.0" / "tests" / "test_casampi.py")


def outcomes(junit):
    """{class::test: 'passed' | 'failed: message' | 'skipped: message'}
    from pytest's JUnit XML."""
    found = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome = "passed"
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is not None:
                text = (element.get("message") or "") + "\n" + (element.text or "")
                outcome = f"{kind}: {text.strip()}"
        found[name] = outcome
    return found


def start(directory, transport):
    """Starts casampi's tests on a cluster of 2 servers over `transport`,
    with casampi's heartbeat (5 s) and a timeout of 15 s."""
    return start_casa_node_run("casampi_tests.py", [TEST_FILE, directory / "junit.xml"], directory,
                               transport, options=["--heartbeat", "5", "--timeout", "15"],
                               result=None)


# About two minutes, mostly sleeping and waiting for timeouts: it runs in
# the background while the other tests run (conftest.BACKGROUND).
@pytest.mark.background("casampi", start=start)
def test_casampi_client_and_server_tests(transport):
    if not TEST_FILE.is_file():
        pytest.fail(f"{TEST_FILE} is missing: run tests/casa/env.sh")
    run = background_run("casampi", transport, check=False)
    junit = run.directory / "junit.xml"
    assert junit.exists(), f"casampi's tests did not run: {run.describe()}"
    found = outcomes(junit)
    # The face, not the casampi installed in the environment, was imported.
    site = sysconfig.get_paths()["purelib"]
    imported = [line.split(": ", 1)[1] for line in run.proc.stdout.splitlines()
                if line.startswith("casampi imported from: ")]
    assert imported and not imported[0].startswith(site), \
        f"casampi came from {imported}, not casa-node's face (the installed one is in {site})"
    failed = {name: outcome for name, outcome in found.items() if outcome != "passed"}
    assert len(found) >= 50, f"only {len(found)} of casampi's tests ran: {found}"
    assert not failed, "casampi's tests failed on casa-node:\n" + "\n\n".join(
        f"{name}: {outcome[:3000]}" for name, outcome in sorted(failed.items()))
    assert run.proc.returncode == 0, run.describe()
