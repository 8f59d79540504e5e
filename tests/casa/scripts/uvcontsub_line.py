"""Continuum subtraction of NGC 5921's line data: a fit of order 1 to the
line-free channels of each baseline and integration, subtracted, written to
VIS.contsub (and the continuum to VIS.cont).

    python uvcontsub_line.py VIS OUT.pickle

In CASA 6.7 the task that runs per sub-MS through ParallelTaskHelper is
uvcontsub_old (the new uvcontsub is an mstransform without it). On a
Multi-MS under casampi (or casa-node run --casa) it runs per sub-MS on the
servers and the outputs are virtually concatenated into Multi-MSs. OUT gets
the run's evidence (_evidence.py).
"""

import pickle
import sys

from casatasks import uvcontsub_old
from _evidence import evidence

vis, out = sys.argv[1:3]

uvcontsub_old(vis=vis, field="2", fitspw="0:4~12;50~58", solint="int", fitorder=1,
              want_cont=True)

with open(out, "wb") as f:
    pickle.dump({
        **evidence(),
    }, f)
print("uvcontsub_line: done", evidence())
