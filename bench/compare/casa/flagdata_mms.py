"""Group C's driver: CASA's ParallelTaskHelper workload on a Multi-MS, the
same unmodified script under real casampi (`mpirun -n 3 python
flagdata_mms.py MMS`) and under casa-node (`casa-node run --casa --servers 2
flagdata_mms.py MMS`, or `mpirun -n 3 casa-node --transport mpi run --casa
flagdata_mms.py MMS`). It only uses casatasks: `import casatasks` starts the
MPI servers under casampi, and casa-node's `--casa` gives it casampi's face.

Three flagdata calls on the MMS, each timed on its own (wall time of the
task call, start-up excluded): mode='summary', mode='clip' (CLIPMIN..CLIPMAX
kept, a little flagged), mode='unflag'. Before them an untimed summary
warms the servers up (their first task imports and opens more than the
next ones); it and untimed summaries after the clip and after the unflag
give the flag counts the harness compares across sides and runs. The
unflag puts the MMS back as it was, so every run does the same work.
Prints one JSON line.

    flagdata_mms.py MMS CLIPMIN CLIPMAX"""

import time

STARTED = time.time()  # before `import casatasks`, which starts casampi's servers

import json  # noqa: E402
import sys  # noqa: E402

import casatasks  # noqa: E402
from casatasks import flagdata  # noqa: E402
from casatasks.private.parallel.parallel_task_helper import ParallelTaskHelper  # noqa: E402

IMPORTED = time.time()


def counts(summary):
    """The flag counts of a summary: in all, and per antenna, scan, field,
    spw and correlation, as {key: [flagged, total]}."""
    out = {"all": [summary["flagged"], summary["total"]]}
    for axis in ("antenna", "scan", "field", "spw", "correlation"):
        for name, c in summary.get(axis, {}).items():
            out[f"{axis} {name}"] = [c["flagged"], c["total"]]
    return out


def timed(**kwargs):
    began = time.perf_counter()
    result = flagdata(**kwargs)
    return time.perf_counter() - began, result


def main(mms, clipmin, clipmax):
    # flagbackup=False: no flag version is saved, so the MMS is left as it
    # was found and each run's work is the same.
    before = flagdata(vis=mms, mode="summary")
    summary_s, summary = timed(vis=mms, mode="summary")
    clip_s, _ = timed(vis=mms, mode="clip", clipminmax=[clipmin, clipmax], flagbackup=False)
    clipped = flagdata(vis=mms, mode="summary")
    unflag_s, _ = timed(vis=mms, mode="unflag", flagbackup=False)
    after = flagdata(vis=mms, mode="summary")
    results = (("before", before), ("summary", summary), ("clipped", clipped), ("after", after))
    for name, s in results:
        if not isinstance(s, dict) or "flagged" not in s:
            raise SystemExit(f"flagdata summary ({name}) returned {s!r}, not a summary")
    print(json.dumps({
        "seconds": {"summary": summary_s, "clip": clip_s, "unflag": unflag_s},
        # Wall clock (time.time()) at the script's start, after the
        # imports, and at this line: the harness splits the job's time.
        "clock": {"started": STARTED, "imported": IMPORTED, "done": time.time()},
        "counts": {name: counts(s) for name, s in results},
        "casatasks": casatasks.version_string(),
        # Whether the tasks went to MPI servers, and to how many, as
        # ParallelTaskHelper sees it: without MPI it runs every sub-MS
        # in this process, one after the other.
        "parallel": ParallelTaskHelper.isMPIEnabled(),
        "servers": ParallelTaskHelper("flagdata", {}).getNumberOfServers(),
        # Which casampi casatasks imported: the venv's, or casa-node's.
        "casampi": getattr(sys.modules.get("casampi"), "__file__", None),
    }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))
