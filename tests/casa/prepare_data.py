"""Makes the data the real-CASA tests share, serially (no casampi on the
path, so CASA runs its tasks in this process):

    ngc5921.ms    casadata's demo/NGC5921.fits through importuvfits: 22653
                  rows, 7 scans, 3 fields, one spectral window of 63
                  channels (3C273XC1.fits has one channel and three scans,
                  too little for uvcontsub or for four sub-MSs)
    ngc5921.mms   a Multi-MS of it: partition(createmms=True) by scan into
                  four sub-MSs
    ngc5921.G     gain solutions of the calibrators (fields 0 and 1) from
                  gaincal on the plain MS, for applycal

    python prepare_data.py DIRECTORY
"""

import os
import sys

import casadata
from casatasks import gaincal, importuvfits, listpartition, partition

DEMO = os.path.join(os.path.dirname(casadata.__file__), "__data__", "demo")
SUB_MSS = 4


def main(directory):
    os.makedirs(directory, exist_ok=True)
    os.chdir(directory)
    importuvfits(fitsfile=os.path.join(DEMO, "NGC5921.fits"), vis="ngc5921.ms")
    partition(vis="ngc5921.ms", outputvis="ngc5921.mms", createmms=True,
              separationaxis="scan", numsubms=SUB_MSS, flagbackup=False)
    parts = listpartition(vis="ngc5921.mms", createdict=True)
    if len(parts) != SUB_MSS:
        sys.exit(f"ngc5921.mms has {len(parts)} sub-MSs, not {SUB_MSS}: {parts}")
    gaincal(vis="ngc5921.ms", caltable="ngc5921.G", field="0,1", solint="inf",
            refant="15", gaintype="G", calmode="ap")
    if not os.path.isdir("ngc5921.G"):
        sys.exit("gaincal made no table")


if __name__ == "__main__":
    main(sys.argv[1])
