"""setjy on the flux calibrator 1331+305 (3C286), writing MODEL_DATA.

    python setjy_model.py VIS OUT.pickle

On a Multi-MS under casampi (or casa-node run --casa) setjy runs per
sub-MS on the servers. OUT gets setjy's return value and what
_evidence.evidence() says of the run.
"""

import pickle
import sys

from casatasks import setjy
from _evidence import evidence

vis, out = sys.argv[1:3]

fluxes = setjy(vis=vis, field="0", standard="Perley-Butler 2017", usescratch=True)

with open(out, "wb") as f:
    pickle.dump({
        "fluxes": fluxes,
        **evidence(),
    }, f)
print("setjy_model: done", evidence())
