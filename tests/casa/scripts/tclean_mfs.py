"""A continuum (mfs) image of NGC 5921's field with a few hundred CLEAN
iterations.

    python tclean_mfs.py VIS IMAGENAME parallel|serial OUT.pickle

With `parallel`, tclean(parallel=True): under casampi (or casa-node run
--casa) the major cycles' gridding runs on the servers, one part of the
Multi-MS each, and the client normalizes and deconvolves. OUT gets tclean's
return value and the run's evidence (_evidence.py).
"""

import pickle
import sys

from casatasks import tclean
from _evidence import evidence

vis, imagename, mode, out = sys.argv[1:5]

summary = tclean(vis=vis, imagename=imagename, field="2", spw="0:5~55", specmode="mfs",
                 imsize=256, cell="15arcsec", gridder="standard", deconvolver="hogbom",
                 weighting="natural", niter=200, gain=0.1, threshold="0Jy",
                 interactive=False, parallel=(mode == "parallel"))

with open(out, "wb") as f:
    pickle.dump({
        "summary": summary,
        **evidence(),
    }, f)
print("tclean_mfs: done", evidence())
