"""tclean(parallel=True) on the Multi-MS through `casa-node run --casa`
against serial tclean on the plain MS: the same mfs image of NGC 5921's
field (256 x 256 pixels of 15", 200 Hogbom iterations)."""

import numpy as np

from conftest import assert_ran_on_casa_node, casa_node_run, copy_data

# Parallel tclean grids each part of the data on a server and sums the
# partial images and weights on the client, so sums are taken in another
# order than serially: |parallel - serial| <= IMAGE_RTOL * max|serial| over
# the .image's pixels.
IMAGE_RTOL = 1e-3


def pixels(image):
    from casatools import image as imagetool

    ia = imagetool()
    assert ia.open(str(image)), f"cannot open {image}"
    try:
        return ia.getchunk()
    finally:
        ia.close()


def test_tclean_parallel_mfs_image(transport, casa_data, serial, tmp_path):
    copy_data(casa_data, tmp_path, "ngc5921.mms")
    run = casa_node_run("tclean_mfs.py", ["ngc5921.mms", "parallel", "parallel"], tmp_path, transport)
    reference_dir, reference = serial("tclean", "tclean_mfs.py", ["ngc5921.ms"],
                                      ["ngc5921.ms", "serial", "serial"])

    # tclean's parallel imager pushes its commands through casampi's
    # MPIInterface: at least one to each server.
    assert_ran_on_casa_node(run, commands=2)
    expected = pixels(reference_dir / "serial.image")
    got = pixels(tmp_path / "parallel.image")
    assert got.shape == expected.shape == (256, 256, 1, 1), (got.shape, expected.shape)
    peak = float(np.max(np.abs(expected)))
    assert peak > 0
    worst = float(np.max(np.abs(got - expected)))
    assert worst <= IMAGE_RTOL * peak, (
        f"parallel.image: max |parallel - serial| = {worst:.3g} exceeds the tolerance "
        f"{IMAGE_RTOL:g} x peak ({peak:.3g})")
