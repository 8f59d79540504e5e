"""applycal of a gain table to every field, writing CORRECTED_DATA (and
flagging what the table flags), then a flag summary.

    python applycal_gains.py VIS CALTABLE OUT.pickle

On a Multi-MS under casampi (or casa-node run --casa) applycal runs per
sub-MS on the servers. OUT gets the summary and the run's evidence (_evidence.py).
"""

import pickle
import sys

from casatasks import applycal, flagdata
from _evidence import evidence

vis, caltable, out = sys.argv[1:4]

applycal(vis=vis, gaintable=[caltable], gainfield=["nearest"], interp=["linear"],
         calwt=True, flagbackup=False)
summary = flagdata(vis=vis, mode="summary")

with open(out, "wb") as f:
    pickle.dump({
        "summary": summary,
        **evidence(),
    }, f)
print("applycal_gains: done", evidence())
