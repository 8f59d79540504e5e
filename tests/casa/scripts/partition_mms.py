"""partition of a plain MS into a Multi-MS of four sub-MSs by scan.

    python partition_mms.py VIS OUTPUTVIS OUT.pickle

Under casampi (or casa-node run --casa) partition writes the sub-MSs on
the servers, one command per sub-MS. OUT gets listpartition's view of the
result and the run's evidence (_evidence.py).
"""

import pickle
import sys

from casatasks import listpartition, partition
from _evidence import evidence

vis, outputvis, out = sys.argv[1:4]

partition(vis=vis, outputvis=outputvis, createmms=True, separationaxis="scan",
          numsubms=4, flagbackup=False)
parts = listpartition(vis=outputvis, createdict=True)

with open(out, "wb") as f:
    pickle.dump({
        "partition": parts,
        **evidence(),
    }, f)
print("partition_mms: done", evidence())
