"""`casa-node status --watch` on a terminal (a pseudo-terminal): the table
redrawn in place with cursor control, cut to the terminal's size, its
states coloured unless NO_COLOR is set, and the cursor shown again when
SIGINT ends it (rule 23)."""

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time

import clusters

CURSOR_HOME = b"\x1b[H"
HIDE_CURSOR = b"\x1b[?25l"
SHOW_CURSOR = b"\x1b[?25h"
SGR = re.compile(rb"\x1b\[[0-9;]*m")
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[@-~]")


def watch_on_a_terminal(cluster, env=(), rows=24, columns=100, frames=3):
    """Runs `status --watch --interval 0.2` with a pseudo-terminal as its
    stdout until it has drawn `frames` frames, then sends it SIGINT (by
    PID); returns its exit status and all it wrote."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    environment = dict(os.environ, CASA_NODE_ENDPOINT=cluster.endpoint, XDG_RUNTIME_DIR=cluster.directory)
    environment.pop("NO_COLOR", None)
    environment.update(env)
    proc = subprocess.Popen(
        [str(clusters.BINARY), "status", "--watch", "--interval", "0.2"],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, env=environment,
    )
    os.close(slave)
    out = b""
    try:
        end = time.monotonic() + 60
        while out.count(CURSOR_HOME) < frames and time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                out += os.read(master, 65536)
        assert out.count(CURSOR_HOME) >= frames, out
        proc.send_signal(signal.SIGINT)
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer has gone
                break
            if not chunk:
                break
            out += chunk
        status = proc.wait(30)
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        os.close(master)
    return status, stderr, out


def frames_of(out):
    """The frames drawn, each as its visible lines (escape sequences
    removed)."""
    frames = []
    for frame in out.decode().split("\x1b[H")[1:]:
        frame = frame.split("\x1b[J")[0]
        frames.append([ESCAPE.sub("", line) for line in frame.split("\r\n") if line])
    return frames


def test_on_a_terminal_the_table_is_redrawn_in_place_in_colour(cluster):
    status, stderr, out = watch_on_a_terminal(cluster)
    assert status == 0, stderr
    assert out.startswith(HIDE_CURSOR + CURSOR_HOME + b"\x1b[2J"), out[:40]
    assert out.rstrip(b"\r\n").endswith(SHOW_CURSOR), out[-40:]
    # Each line clears what is left of the line before it.
    assert b"\x1b[K\r\n" in out
    # The states in colour: idle in green.
    assert b"\x1b[32midle\x1b[0m" in out, out
    for frame in frames_of(out)[:3]:
        assert "servers: 2 idle, 0 busy, 0 timed out, 0 offline" in frame[0], frame
        assert frame[1].startswith("RANK"), frame
        assert [line.split()[0] for line in frame[2:4]] == ["1", "2"], frame


def test_with_no_color_cursor_control_and_no_colour(cluster):
    status, stderr, out = watch_on_a_terminal(cluster, env={"NO_COLOR": "1"})
    assert status == 0, stderr
    assert out.count(CURSOR_HOME) >= 3 and SHOW_CURSOR in out, out
    assert not SGR.search(out), SGR.search(out)
    assert "idle" in frames_of(out)[0][2]


def test_a_small_terminal_gets_a_table_cut_to_its_size(cluster):
    status, stderr, out = watch_on_a_terminal(cluster, env={"NO_COLOR": "1"}, rows=5, columns=50)
    assert status == 0, stderr
    for frame in frames_of(out):
        # The cursor rests on the line below the last.
        assert len(frame) <= 4, frame
        assert all(len(line) <= 49 for line in frame), frame
    frame = frames_of(out)[0]
    assert frame[0].endswith("…") and frame[1].startswith("RANK"), frame
    assert frame[2] == "… 2 more servers: a taller terminal shows them", frame
    assert frame[3].startswith("2 servers, 0 queued"), frame
