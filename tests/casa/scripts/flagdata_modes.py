"""flagdata in the modes ParallelTaskHelper runs per sub-MS: a summary,
manual flags on a selection that spans sub-MSs, clipping, unflagging part of
it again, a summary after each step.

    python flagdata_modes.py VIS OUT.pickle

On a Multi-MS under casampi (or casa-node run --casa) each call is
dispatched to the servers, one command per sub-MS; on a plain MS it runs in
this process. OUT gets the summaries and the run's evidence (_evidence.py).
"""

import pickle
import sys

from casatasks import flagdata
from _evidence import evidence

vis, out = sys.argv[1:3]

summaries = {"initial": flagdata(vis=vis, mode="summary")}
# Antenna 2 in scans 2, 5 and 6: sub-MSs 0, 2 and 3 of the MMS.
flagdata(vis=vis, mode="manual", antenna="2", scan="2,5,6", flagbackup=False)
summaries["manual"] = flagdata(vis=vis, mode="summary")
# Amplitudes above 50 Jy: the autocorrelations and the brightest of 1331+305.
flagdata(vis=vis, mode="clip", clipminmax=[0.0, 50.0], datacolumn="DATA", flagbackup=False)
summaries["clip"] = flagdata(vis=vis, mode="summary")
# Field 1 unflagged again, in every sub-MS that has it.
flagdata(vis=vis, mode="unflag", field="1", flagbackup=False)
summaries["unflag"] = flagdata(vis=vis, mode="summary")

with open(out, "wb") as f:
    pickle.dump({
        "summaries": summaries,
        **evidence(),
    }, f)
print("flagdata_modes: done", evidence())
