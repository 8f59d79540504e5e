"""Group C's data: NGC5921 from casadata's demo FITS file, imported
(importuvfits) and partitioned into a Multi-MS (partition, createmms=True)
of NUMSUBMS sub-MSs or as many as the data allows. Run once per bench run,
in the directory the MMS is to be made in, with the bench's private HOME
(CASA offline). Prints one JSON line: the MMS's path and its sub-MSs."""

import json
import os
import sys

import casadata
from casatasks import importuvfits, partition


def main(numsubms):
    fits = os.path.join(os.path.dirname(casadata.__file__), "__data__", "demo", "NGC5921.fits")
    importuvfits(fitsfile=fits, vis="ngc5921.ms")
    partition(vis="ngc5921.ms", outputvis="ngc5921.mms", createmms=True, separationaxis="auto",
              numsubms=numsubms, flagbackup=False)
    subms = sorted(os.listdir(os.path.join("ngc5921.mms", "SUBMSS")))
    if not subms:
        raise SystemExit("partition made no sub-MS")
    print(json.dumps({"mms": os.path.abspath("ngc5921.mms"), "subms": subms}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
