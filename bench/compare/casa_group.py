"""Group C of the comparison: CASA's ParallelTaskHelper workload on a
Multi-MS, under real casampi and under casa-node, with the same unmodified
driver script (casa/flagdata_mms.py, which only uses casatasks).

- casampi: casampi 0.6.0 from PyPI with mpi4py, as `mpirun -n 3 python
  flagdata_mms.py ...`: `import casatasks` makes ranks 1 and 2 casampi's
  servers (casampi.private.start_mpi) and rank 0 runs the script.
- casa-node over MPI: `mpirun -n 3 casa-node --transport mpi run --casa
  --python VENV/bin/python flagdata_mms.py ...`.
- casa-node over ZeroMQ: `casa-node run --casa --servers 2 --python
  VENV/bin/python flagdata_mms.py ...`.

CASA comes from its own virtual environment (`target/bench-casa-venv`, or
$CASA_BENCH_VENV), made here once: the pinned CASA wheels, casampi, mpi4py,
six (casatasks imports it without declaring it) and protobuf (for
casanode); a stamp file names what was installed. CASA runs offline: HOME
is a private directory whose .casa/config.py points measurespath and
datapath at casadata's data and turns automatic updates off. The MMS is
made once per bench run (importuvfits of casadata's NGC5921, then
partition) in a temporary directory that `cleanup` removes; every job runs
in a directory of its own inside it (its cwd, TMPDIR, and Open MPI's
session directory), removed after the job.

Every job's flag counts (summaries before, at, after the clip and after
the unflag) must equal the first job's of the run: a mismatch is an error,
not a figure."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import Failed

HERE = Path(__file__).resolve().parent / "casa"
DRIVER = HERE / "flagdata_mms.py"
MAKE_MMS = HERE / "make_mms.py"

# casatasks 6.7.0.31 imports six without declaring it; casampi 0.6.0 needs
# mpi4py >= 4 (a wheel that loads the MPI library it finds at run time);
# protobuf is casanode's, for the casa-node side's driver and workers.
REQUIREMENTS = [
    "casatools==6.7.0.31",
    "casatasks==6.7.0.31",
    "casadata==2025.9.22",
    "casampi==0.6.0",
    "mpi4py>=4",
    "six",
    "protobuf>=6.31.1,<7",
]

SERVERS = 2
TASKS = ("summary", "clip", "unflag")


class Env:
    """The group's state for one bench run: the venv's Python, the private
    HOME, the MMS, the reference flag counts."""

    python = None
    home = None
    directory = None
    mms = None
    subms = None
    reference = None
    versions = None


ENV = Env()


def venv_dir():
    target = Path(os.environ.get("CARGO_TARGET_DIR") or harness.REPO / "target")
    return Path(os.environ.get("CASA_BENCH_VENV") or target / "bench-casa-venv").absolute()


def ensure_venv():
    """The venv's Python, after creating the venv or installing into it
    when its stamp does not list exactly REQUIREMENTS."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    stamp = venv / ".compare-casa-installed"
    wanted = "\n".join(REQUIREMENTS) + "\n"
    if stamp.is_file() and stamp.read_text() == wanted and python.exists():
        return python
    if not python.exists():
        print(f"compare: C: creating the CASA virtual environment in {venv} (once; about a minute)",
              file=sys.stderr, flush=True)
        base = os.environ.get("PYTHON") or "python3"
        subprocess.run([base, "-m", "venv", str(venv)], check=True, stdin=subprocess.DEVNULL)
    print(f"compare: C: installing {' '.join(REQUIREMENTS)} into {venv}", file=sys.stderr, flush=True)
    proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           *REQUIREMENTS], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise Failed(f"pip install into {venv} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    stamp.write_text(wanted)
    return python


def setup(settings):
    """Makes the venv (once), the private HOME and the MMS (once per run)."""
    if ENV.mms is not None:
        return
    ENV.python = ensure_venv()
    ENV.directory = tempfile.mkdtemp(prefix="casacmp-C-")
    ENV.home = os.path.join(ENV.directory, "home")
    data = subprocess.run(
        [str(ENV.python), "-c",
         "import casadata, os; print(os.path.join(os.path.dirname(casadata.__file__), '__data__'))"],
        check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout.strip()
    os.makedirs(os.path.join(ENV.home, ".casa"))
    with open(os.path.join(ENV.home, ".casa", "config.py"), "w") as f:
        f.write("# bench/compare group C: casadata's data, never the network.\n"
                f"measurespath = {data!r}\n"
                f"datapath = [{data!r}]\n"
                "measures_auto_update = False\n"
                "data_auto_update = False\n")
    data_dir = os.path.join(ENV.directory, "data")
    os.makedirs(data_dir)
    made = harness.run_json([ENV.python, MAKE_MMS, settings["casa_subms"]], env=job_env(data_dir),
                            cwd=data_dir, timeout=600, name="make_mms.py")
    ENV.mms, ENV.subms = made["mms"], made["subms"]
    ENV.versions = subprocess.run(
        [str(ENV.python), "-c",
         "import importlib.metadata as m; print(' '.join(f'{p} {m.version(p)}' for p in "
         "('casatools', 'casatasks', 'casadata', 'casampi', 'mpi4py')))"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout.strip()
    print(f"compare: C: an MMS of {len(ENV.subms)} sub-MSs in {ENV.mms}; {ENV.versions}",
          file=sys.stderr, flush=True)


def cleanup():
    if ENV.directory is not None:
        shutil.rmtree(ENV.directory, ignore_errors=True)
        ENV.directory = ENV.mms = None


def job_env(directory, base=None):
    """CASA offline (the private HOME), temporary files in `directory`."""
    env = dict(base if base is not None else os.environ)
    env.update(HOME=ENV.home, TMPDIR=directory)
    env.pop("CASA_NODE_ENDPOINT", None)
    env.pop("PYTHONPATH", None)
    return env


def driver_args(settings):
    return [DRIVER, ENV.mms, settings["clip_min"], settings["clip_max"]]


def run_job(kind, settings):
    """Runs the driver one way (`casampi`, `mpi`, `zmq`, or `serial`:
    plain `python`, no MPI) in a fresh directory; returns its result with
    `job_s`, the job's wall time."""
    directory = tempfile.mkdtemp(prefix="job-", dir=ENV.directory)
    try:
        if kind == "zmq":
            env = job_env(directory)
            env["XDG_RUNTIME_DIR"] = directory
            argv = [harness.CASA_NODE, "run", "--casa", "--servers", SERVERS, "--python", ENV.python,
                    "--log-file", os.path.join(directory, "casa-node.log"), *driver_args(settings)]
        elif kind == "serial":
            env = job_env(directory)
            argv = [ENV.python, *driver_args(settings)]
        else:
            launcher, mpi_env = harness.mpirun(SERVERS + 1, session=directory)
            env = job_env(directory, mpi_env)
            if kind == "casampi":
                argv = [*launcher, ENV.python, *driver_args(settings)]
            else:
                env["XDG_RUNTIME_DIR"] = directory
                argv = [*launcher, harness.CASA_NODE, "--transport", "mpi", "run", "--casa",
                        "--python", ENV.python, "--log-file", os.path.join(directory, "casa-node.log"),
                        *driver_args(settings)]
        began = time.time()
        result = harness.run_json(argv, env=env, cwd=directory, timeout=settings["casa_timeout"],
                                  name=f"group C, {kind}")
        ended = time.time()
        clock = result["clock"]
        result["job_s"] = ended - began
        # Where the job's time went: until the script started, its imports
        # (under casampi: the servers' start), the seven tasks, and from
        # the script's last line to the job's end.
        result["phases"] = {"launch": clock["started"] - began,
                            "import": clock["imported"] - clock["started"],
                            "tasks": clock["done"] - clock["imported"],
                            "exit": ended - clock["done"]}
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    check(kind, result)
    return result


def check(kind, result):
    """The job ran the tasks on SERVERS MPI servers and its flag counts
    are the run's: equal to the first job's, the clip flagged some but
    not all, and the unflag restored the counts from before."""
    if kind == "serial":
        if result.get("parallel") is not False:
            raise Failed("group C, serial: ParallelTaskHelper saw MPI enabled outside MPI")
    elif result.get("parallel") is not True or result.get("servers") != SERVERS:
        raise Failed(f"group C, {kind}: ParallelTaskHelper saw MPI enabled = {result.get('parallel')!r} "
                     f"and {result.get('servers')!r} servers (want True and {SERVERS}): the tasks did "
                     "not run on the servers")
    # casampi's side must run the venv's casampi, casa-node's its own.
    casampi = result.get("casampi") or ""
    in_venv = os.path.realpath(casampi).startswith(os.path.realpath(venv_dir()) + os.sep)
    if kind in ("casampi", "serial") and not in_venv or kind in ("mpi", "zmq") and in_venv:
        raise Failed(f"group C, {kind}: casatasks imported the casampi of {casampi or 'nowhere'}")
    counts = result["counts"]
    flagged, total = counts["clipped"]["all"]
    if not 0 < flagged < total:
        raise Failed(f"group C, {kind}: the clip flagged {flagged:g} of {total:g}")
    for name in ("summary", "after"):
        if counts[name] != counts["before"]:
            raise Failed(f"group C, {kind}: the summary {name!r} differs from the one before "
                         f"the tasks: {diff(counts['before'], counts[name])}")
    if ENV.reference is None:
        ENV.reference = (kind, counts)
        return
    first, reference = ENV.reference
    for name in ("before", "clipped"):
        if counts[name] != reference[name]:
            raise Failed(f"group C: the flag counts {name!r} of {kind} differ from those of "
                         f"{first}: {diff(reference[name], counts[name])}")


def diff(a, b):
    keys = sorted(set(a) | set(b))
    out = [f"{k}: {a.get(k)} against {b.get(k)}" for k in keys if a.get(k) != b.get(k)]
    return "; ".join(out[:8]) + (f"; and {len(out) - 8} more" if len(out) > 8 else "")


# ------------------------------------------------------------------ the sides


def record(figures, suffix, result, who):
    for n, task in enumerate(TASKS, 1):
        f = figures[f"C{n}{suffix}"]
        seconds = result["seconds"][task]
        if who == "casa":
            f.casa.append(seconds)
        else:
            f.peer.append(seconds)


def note_phases(figure, who, r):
    figure.note(f"{who}: seconds for the whole job", r["job_s"])
    for phase, seconds in r["phases"].items():
        figure.note(f"{who}: of which {phase}", seconds)


def measure_casa_tasks(settings, figures, record_it):
    """casa-node over MPI, then over ZeroMQ."""
    setup(settings)
    for kind, suffix in (("mpi", ""), ("zmq", "z")):
        r = run_job(kind, settings)
        if record_it:
            record(figures, suffix, r, "casa")
            note_phases(figures[f"C1{suffix}"], f"casa-node over {'MPI' if kind == 'mpi' else 'ZeroMQ'}", r)


def peer_casampi(settings, figures, record_it):
    setup(settings)
    r = run_job("casampi", settings)
    if record_it:
        for suffix in ("", "z"):
            record(figures, suffix, r, "peer")
        note_phases(figures["C1"], "casampi", r)


def serial_context(settings, figures, record_it):
    """For context: the same driver under plain `python`, no MPI, so that
    ParallelTaskHelper runs the sub-MSs one after the other in the driver."""
    setup(settings)
    r = run_job("serial", settings)
    if record_it:
        for n, task in enumerate(TASKS, 1):
            figures[f"C{n}"].note("serial, no MPI (context): seconds", r["seconds"][task])
