"""casanode.progress and Client.map(progress=True): the progress of real
commands on a cluster, as plain lines for a file that is not a terminal, as
a line redrawn with a carriage return for a terminal, through tqdm when it
is installed, and in a notebook's display; and the pacing of each view."""

import io
import re
import sys
import types
from concurrent.futures import Future

import pytest

import casanode
from casanode import progressbar

# 50 commands, 3 of which raise (rule 7: a failure response, counted failed).
COMMAND = "time.sleep(0.01) or (1 / 0 if i in (7, 21, 42) else i)"
RAISING = (7, 21, 42)
LINE = re.compile(r"^(\d+)/50 done \((\d+)%\), (\d+) failed, \d+\.\d/s, ")


class Tty(io.StringIO):
    """A file that says it is a terminal."""

    def isatty(self):
        return True


@pytest.fixture
def without_tqdm(monkeypatch):
    """As if tqdm were not installed."""
    monkeypatch.setattr(progressbar, "_import_tqdm", lambda: None)


def submit_fifty(client):
    return [client.submit(COMMAND, parameters={"i": i}) for i in range(50)]


def check_outcomes(futures):
    failed = [i for i, f in enumerate(futures) if not f.result()["successful"]]
    assert failed == list(RAISING)
    assert [f.result()["ret"] for f in futures if f.result()["successful"]] == [
        i for i in range(50) if i not in RAISING
    ]


def test_progress_prints_plain_lines_to_a_file_that_is_not_a_terminal(client, without_tqdm):
    futures = submit_fifty(client)
    out = io.StringIO()
    returned = casanode.progress(futures, file=out)
    assert returned == futures
    assert all(f.done() for f in returned)
    check_outcomes(futures)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text, repr(text)
    lines = text.splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    done = [int(m.group(1)) for m in matches]
    assert done == sorted(done), lines
    assert lines[-1].startswith("50/50 done (100%), 3 failed, "), lines
    took = re.search(r", in (\d+):(\d\d)$", lines[-1])
    assert took, lines
    # One line first, one per tenth done, one every 5 s, and the last:
    # never one per command.
    seconds = 60 * int(took.group(1)) + int(took.group(2))
    assert len(lines) <= 12 + (seconds + 1) // progressbar.PLAIN_EVERY, lines


def test_progress_redraws_one_line_on_a_terminal(client, without_tqdm):
    futures = submit_fifty(client)
    # Lists (as a submit to several targets returns) are flattened.
    nested = [futures[:10], futures[10:]]
    out = Tty()
    assert casanode.progress(nested, file=out) == futures
    check_outcomes(futures)
    text = out.getvalue()
    assert text.startswith("\r") and text.endswith("\n") and text.count("\n") == 1, repr(text)
    frames = text[1:-1].split("\r")
    assert frames[-1].startswith("[" + "#" * progressbar.BAR + "] 50/50 done (100%), 3 failed, "), frames
    # A shorter line covers the longer one before with spaces.
    for before, after in zip(frames, frames[1:]):
        assert len(after) >= len(before.rstrip(" ")), (before, after)


def test_progress_goes_through_tqdm_when_it_is_installed(client):
    pytest.importorskip("tqdm", reason="tqdm is not installed")
    futures = submit_fifty(client)
    out = io.StringIO()
    casanode.progress(futures, file=out)
    check_outcomes(futures)
    last = out.getvalue().split("\r")[-1]
    assert "50/50" in last and "3 failed" in last, repr(out.getvalue())


def test_map_with_progress_shows_it_while_the_results_are_iterated(client, without_tqdm, capsys):
    parameters = [{"i": i} for i in range(50)]
    results = list(client.map(COMMAND, parameters, progress=True))
    assert [r["ret"] for r in results if r["successful"]] == [i for i in range(50) if i not in RAISING]
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(LINE.match(line) for line in lines), lines
    assert lines[-1].startswith("50/50 done (100%), 3 failed, "), lines
    # Without progress, map prints nothing.
    assert len(list(client.map(COMMAND, parameters[:5]))) == 5
    assert capsys.readouterr().err == ""


def test_progress_takes_an_iterator_and_its_total(client, without_tqdm):
    made = []

    def submitting():
        for i in range(50):
            made.append(client.submit(COMMAND, parameters={"i": i}))
            yield made[-1]

    out = io.StringIO()
    assert casanode.progress(submitting(), file=out, total=50) == made
    assert out.getvalue().splitlines()[-1].startswith("50/50 done (100%), 3 failed, ")


def done_futures(results, exception=None):
    futures = []
    for result in results:
        f = Future()
        f.set_result(result)
        futures.append(f)
    if exception is not None:
        f = Future()
        f.set_exception(exception)
        futures.append(f)
    return futures


def test_failures_are_exceptions_cancellations_and_unsuccessful_responses(without_tqdm):
    cancelled = Future()
    cancelled.cancel()
    futures = done_futures([{"successful": True}, {"successful": False}, 7], ZeroDivisionError())
    futures.append(cancelled)
    out = io.StringIO()
    casanode.progress(futures, file=out)
    # All were done before: no rate to tell.
    assert out.getvalue() == "5/5 done (100%), 3 failed, done already\n"


def test_the_rate_leaves_out_what_was_done_before():
    counts = progressbar.Counts(done=30, failed=1, total=50, elapsed=2.0, before=10)
    assert progressbar.describe(counts) == "30/50 done (60%), 1 failed, 10.0/s, 0:02 left"
    final = counts._replace(done=50, elapsed=4.0)
    assert progressbar.describe(final, final=True) == "50/50 done (100%), 1 failed, 10.0/s, in 0:04"


def test_plain_lines_come_each_tenth_and_every_five_seconds():
    out = io.StringIO()
    view = progressbar._Lines(out)
    for done in range(51):
        view.update(progressbar.Counts(done, 0, 50, 0.01 * done, 0), final=False)
    lines = out.getvalue().splitlines()
    assert [line.split("/")[0] for line in lines] == [str(n) for n in range(0, 51, 5)], lines
    # Nothing new, but five seconds since the last line: one more.
    view.update(progressbar.Counts(50, 0, 50, 0.5 + progressbar.PLAIN_EVERY, 0), final=False)
    # The last counts were shown already: no final line of the same.
    view.update(progressbar.Counts(50, 0, 50, 0.6 + progressbar.PLAIN_EVERY, 0), final=True)
    assert len(out.getvalue().splitlines()) == len(lines) + 1


def test_a_line_on_a_terminal_is_redrawn_at_most_every_tenth_of_a_second():
    out = Tty()
    view = progressbar._Line(out)
    view.update(progressbar.Counts(0, 0, 4, 0.0, 0), final=False)
    view.update(progressbar.Counts(1, 0, 4, 0.05, 0), final=False)  # too soon: not drawn
    view.update(progressbar.Counts(2, 1, 4, 0.2, 0), final=False)
    view.update(progressbar.Counts(4, 1, 4, 0.21, 0), final=True)  # the last is always drawn
    frames = out.getvalue().split("\r")[1:]
    assert [f.split("] ")[1].split(" ")[0] for f in frames] == ["0/4", "2/4", "4/4"], frames
    assert frames[-1].endswith("\n") and not any(f.endswith("\n") for f in frames[:-1])
    assert frames[1].endswith("10.0/s, 0:01 left"), frames


def fake_notebook(monkeypatch, shown):
    """An IPython kernel's shell, ipywidgets 'installed', and
    IPython.display recording what it shows."""

    class Handle:
        def update(self, obj):
            shown.append(obj)

    def display(obj, display_id=False):
        shown.append(obj)
        return Handle() if display_id else None

    display_module = types.ModuleType("IPython.display")
    display_module.display = display
    ipython = types.ModuleType("IPython")
    ipython.display = display_module
    ipython.get_ipython = lambda: types.SimpleNamespace(config={"IPKernelApp": {}})
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display_module)
    monkeypatch.setattr(progressbar, "_installed", lambda name: name == "ipywidgets")


def test_in_a_notebook_without_tqdm_a_display_is_updated_in_place(monkeypatch, without_tqdm, capsys):
    shown = []
    fake_notebook(monkeypatch, shown)
    futures = done_futures([{"successful": True}] * 3, RuntimeError("lost"))
    casanode.progress(futures)
    assert shown[0] == ""
    assert shown[-1].startswith("[" + "#" * progressbar.BAR + "] 4/4 done (100%), 1 failed, "), shown
    assert capsys.readouterr().err == ""


def test_outside_a_kernel_there_is_no_notebook(monkeypatch):
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: types.SimpleNamespace(config={})  # a terminal IPython
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setattr(progressbar, "_installed", lambda name: True)
    assert not progressbar._in_notebook()
    monkeypatch.delitem(sys.modules, "IPython")
    assert not progressbar._in_notebook()
