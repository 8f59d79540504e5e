"""Progress while Futures complete: `casanode.progress`, and
`Client.map(..., progress=True)`.

    futures = [client.submit("flagdata(vis=v, mode='summary')", parameters={"v": ms}) for ms in mses]
    casanode.progress(futures)     # a bar on stderr until every command has ended

What shows the progress depends on where it goes:

- in a Jupyter notebook (an IPython kernel, with ipywidgets installed) and
  no `file` given: tqdm's notebook bar if tqdm is installed, else a line of
  text updated in place (IPython.display);
- elsewhere, with tqdm installed: a tqdm bar on `file` (stderr by default);
- on a terminal, without tqdm: one line, redrawn in place with `\\r`;
- on anything else (a log file, a pipe): a plain line each time another
  tenth of the futures is done and at least every 5 s, and a last one.

Each counts the futures done (ended in any way) and failed (an exception,
a cancellation, or a response whose `successful` is False) out of the
total, with the rate of those that completed while it watched.
"""

import collections
import importlib.util
import math
import sys
import threading
import time
from concurrent.futures import Future

# A file that is not a terminal gets a line each time another tenth is done,
# and one at least every PLAIN_EVERY seconds.
PLAIN_EVERY = 5.0
# A line redrawn in place is redrawn at most once every REDRAW seconds (and
# at least every TICK seconds, for the rate and the time left).
REDRAW = 0.1
TICK = 0.5
# The width of the bar of a line redrawn in place, in characters.
BAR = 20


def progress(futures, *, file=None, total=None):
    """Shows the progress of `futures` while they complete and returns once
    every one is done.

    `futures`: a concurrent.futures Future or a list of them (as
    Client.submit, broadcast and claim return them; lists in the list are
    flattened), or an iterator making
    them, such as a generator that submits as it goes. `file`: where the
    progress goes, stderr by default (see the module's documentation for
    how it looks there). `total`: how many futures an iterator will make,
    so that the share done shows before it ends; the futures counted win
    if they differ.

    Returns the futures, flattened, in input order, all of them done.
    Nothing is raised for those that failed: their `result()` or
    `exception()` says how. Interrupted (KeyboardInterrupt), it ends the
    progress line before the exception goes on."""
    if isinstance(futures, Future):
        futures = [futures]
    sized = isinstance(futures, (list, tuple))
    if sized:
        futures = list(_flatten(futures))
        total = len(futures)
    meter = Meter(file=file, total=total)
    flat = []
    try:
        for future in _flatten(futures):
            flat.append(future)
            meter.watch(future)
            if not sized:  # an iterator may take its time
                meter.refresh()
        meter.all_watched()
        meter.wait()
    finally:
        meter.close()
    return flat


def _flatten(items):
    """The Futures of `items`, lists and tuples of them flattened."""
    for item in items:
        if isinstance(item, (list, tuple)):
            yield from _flatten(item)
        else:
            yield item


def _failed(future):
    """Whether a done Future failed: cancelled, an exception, or a response
    dict whose `successful` is False."""
    if future.cancelled() or future.exception() is not None:
        return True
    result = future.result()
    return isinstance(result, dict) and result.get("successful") is False


Counts = collections.namedtuple("Counts", "done failed total elapsed before")
Counts.__doc__ = """What a meter counted: futures `done` (in any way), those that
`failed`, the `total` (None while not known), the seconds `elapsed` since
the meter started, and the futures done `before` it watched them (left out
of the rate)."""


class Meter:
    """Counts Futures as they complete (through add_done_callback, on
    whichever thread completes them) and shows the counts from the thread
    that waits (wait, wait_for, refresh, close). Nothing shows before the
    first of those calls; `close` draws the last state once."""

    def __init__(self, file=None, total=None):
        self._file = file
        self._changed = threading.Condition()
        self.watched = 0
        self.before = 0
        self.done = 0
        self.failed = 0
        self.total = total
        self._all_watched = False
        self._start = time.monotonic()
        self._view = None
        self._closed = False

    def watch(self, future):
        """Counts `future` in, and counts it done when it completes."""
        with self._changed:
            self.watched += 1
            self.before += future.done()
        future.add_done_callback(self._completed)

    def all_watched(self):
        """Says that no more futures will be watched: the total is now the
        number watched."""
        with self._changed:
            self._all_watched = True
            self.total = self.watched
            self._changed.notify_all()

    def _completed(self, future):
        failed = _failed(future)
        with self._changed:
            self.done += 1
            self.failed += failed
            self._changed.notify_all()

    def wait(self, timeout=None):
        """Shows the progress until every future watched is done (after
        all_watched) or `timeout` seconds pass; True if all are done."""
        return self.wait_for(lambda: self._all_watched and self.done >= self.watched, timeout)

    def wait_for(self, done, timeout=None):
        """Shows the progress until `done()` is true or `timeout` seconds
        pass; returns the last `done()`."""
        end = None if timeout is None else time.monotonic() + timeout
        view = self._show()
        while True:
            with self._changed:
                if done():
                    break
                pause = view.pause
                if end is not None:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    pause = min(pause, left)
                self._changed.wait(pause)
            self.refresh()
        self.refresh()
        return done()

    def refresh(self):
        """Shows the counts now, if the view is due to show anything."""
        self._show().update(self._counts(), final=False)

    def close(self):
        """Shows the last counts and ends the progress (the line, the bar);
        once."""
        if self._closed:
            return
        self._closed = True
        self._show().update(self._counts(), final=True)

    def _counts(self):
        with self._changed:
            elapsed = time.monotonic() - self._start
            total = None if self.total is None else max(self.total, self.watched)
            return Counts(self.done, self.failed, total, elapsed, self.before)

    def _show(self):
        if self._view is None:
            self._view = _choose_view(self._file)
        return self._view


def _import_tqdm():
    """The tqdm package, or None if it is not installed."""
    try:
        import tqdm
    except ImportError:
        return None
    return tqdm


def _in_notebook():
    """Whether this runs in a Jupyter kernel that can show widgets: IPython
    is imported (never imported here), its shell is a kernel's, and
    ipywidgets is installed."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if get_ipython is not None else None
    if shell is None or "IPKernelApp" not in getattr(shell, "config", {}):
        return False
    return _installed("ipywidgets")


def _installed(name):
    """Whether package `name` can be imported (it is not imported)."""
    return importlib.util.find_spec(name) is not None


def _is_terminal(file):
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _choose_view(file):
    tqdm = _import_tqdm()
    if file is None and _in_notebook():
        if tqdm is None:
            return _Display()
        import tqdm.auto

        return _Tqdm(tqdm.auto.tqdm, None)
    file = sys.stderr if file is None else file
    if tqdm is not None:
        return _Tqdm(tqdm.tqdm, file)
    if _is_terminal(file):
        return _Line(file)
    return _Lines(file)


def _clock(seconds):
    """M:SS, or H:MM:SS from an hour on."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def describe(counts, final=False):
    """Counts as text: "47/50 done (94%), 3 failed, 12.3/s, 0:01 left", at
    the end "50/50 done (100%), 3 failed, 12.3/s, in 0:04", or "50/50 done
    (100%), 3 failed, done already" when none completed while watched."""
    done, failed, total, elapsed, before = counts
    timed = done - before
    rate = f"{timed / elapsed if elapsed > 0 else 0.0:.1f}/s"
    if total is None:
        return f"{done}/? done, {failed} failed, {rate}, {_clock(elapsed)}"
    share = 100 * done // total if total else 100
    text = f"{done}/{total} done ({share}%), {failed} failed, "
    if final or done >= total:
        return text + (f"{rate}, in {_clock(elapsed)}" if timed else "done already")
    if not timed:
        return text + f"{rate}, {_clock(elapsed)}"
    return text + f"{rate}, {_clock(math.ceil((total - done) * elapsed / timed))} left"


def _bar(done, total):
    if not total:
        return "[" + " " * BAR + "]"
    filled = min(BAR, BAR * done // total)
    return "[" + "#" * filled + "-" * (BAR - filled) + "]"


class _Lines:
    """A file that is not a terminal: a line at the first update, each time
    another tenth is done, at least every PLAIN_EVERY seconds, and at the
    end (unless the counts are those of the line before)."""

    pause = PLAIN_EVERY

    def __init__(self, file):
        self._file = file
        self._shown = None  # (done, failed, total) of the last line
        self._tenth = -1
        self._at = 0.0

    def update(self, counts, final):
        tenth = 10 * counts.done // counts.total if counts.total else -1
        shown = counts[:3]
        due = (
            self._shown is None
            or (tenth > self._tenth and shown != self._shown)
            or counts.elapsed - self._at >= PLAIN_EVERY
            or (final and shown != self._shown)
        )
        if not due:
            return
        self._shown, self._tenth, self._at = shown, tenth, counts.elapsed
        self._file.write(describe(counts, final) + "\n")
        self._file.flush()


class _Line:
    """A terminal: one line, redrawn in place (a carriage return, the text,
    spaces over what is left of the longer line before), at most every
    REDRAW seconds; the last one ends with a newline."""

    pause = TICK

    def __init__(self, file):
        self._file = file
        self._width = 0
        self._at = None

    def update(self, counts, final):
        if not final and self._at is not None and counts.elapsed - self._at < REDRAW:
            return
        self._at = counts.elapsed
        text = f"{_bar(counts.done, counts.total)} {describe(counts, final)}"
        padding = " " * max(0, self._width - len(text))
        self._width = len(text)
        self._file.write("\r" + text + padding + ("\n" if final else ""))
        self._file.flush()


class _Display:
    """A notebook without tqdm: a line of text shown once
    (IPython.display) and updated in place, at most every REDRAW
    seconds."""

    pause = TICK

    def __init__(self):
        from IPython.display import display

        self._handle = display("", display_id=True)
        self._at = None

    def update(self, counts, final):
        if not final and self._at is not None and counts.elapsed - self._at < REDRAW:
            return
        self._at = counts.elapsed
        text = f"{_bar(counts.done, counts.total)} {describe(counts, final)}"
        if self._handle is not None:
            self._handle.update(text)


class _Tqdm:
    """A tqdm bar (`make` is tqdm.tqdm, or tqdm.auto.tqdm in a notebook):
    done as its count, failures as its postfix; tqdm paces the redraws and
    reckons the rate and the time left."""

    pause = TICK

    def __init__(self, make, file):
        self._make = make
        self._file = file
        self._bar = None
        self._failed = None

    def update(self, counts, final):
        done, failed, total, elapsed, before = counts
        if self._bar is None:
            # The average rate since the meter started (smoothing 0), which
            # may be before the bar shows, of the futures done since.
            self._bar = self._make(
                total=total, initial=before, file=self._file, unit="cmd", dynamic_ncols=True, smoothing=0
            )
            self._bar.start_t -= elapsed
        bar = self._bar
        if bar.total != total:
            bar.total = total
            bar.refresh()
        if failed != self._failed:
            self._failed = failed
            bar.set_postfix_str(f"{failed} failed", refresh=False)
        if done > bar.n:
            bar.update(done - bar.n)
        if final:
            bar.close()
