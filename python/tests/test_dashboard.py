"""The dashboard (`up --dashboard`, rule 34): its token, /metrics read by
Prometheus's own parser, and the page in a real browser (Debian's
Chromium, driven by Selenium through chromedriver)."""

import os
import pathlib
import shutil
import signal
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

import casanode
import clusters

TARGET = pathlib.Path(__file__).resolve().parents[2] / "target"


def fetch(url, token=None, bearer=None):
    """(status, body) of a GET, with the token in the query or as a bearer
    token."""
    if token is not None:
        url += ("&" if "?" in url else "?") + "token=" + urllib.parse.quote(token)
    request = urllib.request.Request(url)
    if bearer is not None:
        request.add_header("Authorization", f"Bearer {bearer}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            if answer.headers.get_content_type() == "text/event-stream":
                return answer.status, answer.readline().decode()
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def split(url):
    """The dashboard's base URL and its token."""
    parts = urllib.parse.urlsplit(url)
    token = urllib.parse.parse_qs(parts.query)["token"][0]
    return f"{parts.scheme}://{parts.netloc}", token


def metric_samples(text):
    """{(sample name, frozenset of labels): value} from the OpenMetrics text,
    parsed by the Prometheus project's Python parser."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def test_every_request_needs_the_token(request, transport):
    cluster = clusters.started(request, servers=1, transport=transport)
    base, token = split(cluster.dashboard())
    assert base.startswith("http://127.0.0.1:")
    for path in ["/", "/events", "/metrics", "/api/record/1"]:
        status, body = fetch(base + path)
        assert status == 403 and "token" in body, (path, status, body)
        status, _ = fetch(base + path, token="0" * len(token))
        assert status == 403, path
    assert fetch(base + "/", token=token)[0] == 200
    assert fetch(base + "/metrics", bearer=token)[0] == 200
    status, first = fetch(base + "/events", token=token)
    assert status == 200 and first.startswith("event: snapshot"), first


def test_metrics_count_the_commands_run(request, transport):
    cluster = clusters.started(request, servers=2, transport=transport)
    base, token = split(cluster.dashboard())
    with casanode.connect(cluster.endpoint) as client:
        good = client.map("x * x", [{"x": i} for i in range(40)], timeout=60)
        bad = [client.submit("1 / 0") for _ in range(3)]
        assert [r["ret"] for r in good] == [i * i for i in range(40)]
        assert all(not f.result(60)["successful"] for f in bad)
        status, text = fetch(base + "/metrics", bearer=token)
    assert status == 200
    samples = metric_samples(text)
    outcome = lambda name: samples.get(("casa_node_commands_total", frozenset({("outcome", name)})), 0)  # noqa: E731
    assert outcome("success") == 40
    assert outcome("failure") == 3
    assert samples[("casa_node_commands_submitted_total", frozenset())] == 43
    assert samples[("casa_node_command_duration_seconds_count", frozenset())] == 43
    assert samples[("casa_node_servers", frozenset({("state", "idle")}))] == 2
    assert samples[("casa_node_queued_requests", frozenset())] == 0
    assert samples[("casa_node_front_door_received_bytes_total", frozenset())] > 0
    assert samples[("casa_node_front_door_sent_bytes_total", frozenset())] > 0


def browser():
    """Headless Chromium under Selenium, or a skip (a failure under the test
    command, which installs both) saying what is missing."""
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        message = "Chromium and chromedriver are needed (Debian: chromium chromium-driver)"
        if os.environ.get("CASA_NODE_REQUIRE_E2E"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1100"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def text_of(page, selector):
    """The text of the element `selector` finds, read in one step: the page
    replaces its tables' rows as updates arrive."""
    return page.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : null", selector)


def until(what, check, timeout=10, every=0.05):
    """Polls `check` until it returns something true, or fails saying `what`."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(every)


def test_the_page_in_chromium(request, transport):
    from selenium.common.exceptions import MoveTargetOutOfBoundsException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    cluster = clusters.started(request, servers=4, transport=transport)
    url = cluster.dashboard()
    base, _ = split(url)
    page = browser()
    request.addfinalizer(page.quit)
    with casanode.connect(cluster.endpoint) as client:
        page.get(url)
        # Every server is listed.
        ranks = until("four server rows", lambda: page.execute_script(
            "const rows = [...document.querySelectorAll('#servers tbody tr')];"
            "return rows.length === 4 ? rows.map(r => r.dataset.rank) : null"))
        assert ranks == ["1", "2", "3", "4"]

        # A submitted command is in the task stream (running) within 2 s.
        submitted = time.monotonic()
        running = client.submit("time.sleep(3) or 'slept'", target=2)
        until("the running command in the stream", lambda: page.execute_script(
            "return casaNode.state.servers.some(s => s.command_id === arguments[0])", running.id), timeout=2)
        assert time.monotonic() - submitted <= 2.5

        # A command that raises shows its traceback on a click on its bar.
        failed = client.submit("1 / 0", target=1)
        assert not failed.result(60)["successful"]
        canvas = page.find_element(By.ID, "stream")

        def click_the_bar():
            # The stream is redrawn as time passes: a click that met a
            # redraw between finding the bar and clicking it is made again.
            center = page.execute_script("return casaNode.barCenter(arguments[0])", failed.id)
            if center is None:
                return None
            size = canvas.size
            try:
                ActionChains(page).move_to_element_with_offset(
                    canvas, int(center["x"] - size["width"] / 2), int(center["y"] - size["height"] / 2)
                ).click().perform()
            except MoveTargetOutOfBoundsException:
                return None
            end = time.monotonic() + 1
            while time.monotonic() < end:
                text = text_of(page, "#detail-traceback")
                if text:
                    return text
                time.sleep(0.05)
            return None

        traceback = until("the traceback shown on a click", click_the_bar, timeout=20)
        assert "ZeroDivisionError" in traceback
        page.find_element(By.ID, "close").click()

        # A killed worker shows as a restart.
        worker = client.status(3)[3]["worker_pid"]
        os.kill(worker, signal.SIGKILL)
        until("the restart in the server table", lambda: text_of(
            page, '#servers tbody tr[data-rank="3"] td:nth-child(7)') == "1", timeout=20)
        assert running.result(60)["ret"] == "slept"

        # A workload of 10 000 commands: the picture, mid-run, for people.
        sleeper = client.submit("time.sleep(4)", target=4)
        results = client.map("sum(range(i))", [{"i": i} for i in range(10_000)], timeout=300)
        until("thousands of commands drawn", lambda: page.execute_script(
            "return casaNode.state.tasks.size") >= 2000, timeout=60)
        TARGET.mkdir(exist_ok=True)
        shot = TARGET / f"dashboard-{transport}.png"
        assert page.save_screenshot(str(shot)), shot
        assert [r["ret"] for r in results] == [sum(range(i)) for i in range(10_000)]
        assert sleeper.result(60)["successful"]
        until("every command counted", lambda: text_of(
            page, '#counts [data-count="done"] b') == str(10_000 + 2), timeout=20)
        assert shot.stat().st_size > 10_000
