"""CASA's Multi-MS parallel tasks (ParallelTaskHelper: the seed's section
5.9 list) through `casa-node run --casa`, each against the same task run
serially on the plain MS: flag counts equal exactly, data columns within
conftest.DATA_RTOL."""

import numpy as np

from conftest import (SUB_MSS, assert_columns_match, assert_ran_on_casa_node, casa_node_run,
                      copy_data)


def test_flagdata_summary_manual_clip_unflag(transport, casa_data, serial, tmp_path):
    copy_data(casa_data, tmp_path, "ngc5921.mms")
    run = casa_node_run("flagdata_modes.py", ["ngc5921.mms"], tmp_path, transport)
    reference_dir, reference = serial("flagdata", "flagdata_modes.py", ["ngc5921.ms"], ["ngc5921.ms"])

    # Seven flagdata calls, six of them one command per sub-MS (the manual
    # one may skip the sub-MS without its scans).
    assert_ran_on_casa_node(run, commands=6 * SUB_MSS)
    got, expected = run.result["summaries"], reference["summaries"]
    assert list(got) == list(expected)
    for step in expected:
        # The whole summary: totals and the counts per antenna, scan, field,
        # spw, correlation, ... exactly.
        assert got[step] == expected[step], f"flagdata summary after {step!r} differs from the serial run's"
    assert expected["manual"]["flagged"] > 0 and expected["clip"]["flagged"] > expected["manual"]["flagged"]
    assert_columns_match(reference_dir / "ngc5921.ms", tmp_path / "ngc5921.mms", ["FLAG"])


def test_setjy_model_data(transport, casa_data, serial, tmp_path):
    copy_data(casa_data, tmp_path, "ngc5921.mms")
    run = casa_node_run("setjy_model.py", ["ngc5921.mms"], tmp_path, transport)
    reference_dir, reference = serial("setjy", "setjy_model.py", ["ngc5921.ms"], ["ngc5921.ms"])

    assert_ran_on_casa_node(run, commands=SUB_MSS)
    got, expected = run.result["fluxes"], reference["fluxes"]
    flux = expected["0"]["0"]["fluxd"]
    assert flux[0] > 1.0, expected
    # The flux densities setjy reports: the same model evaluated on the
    # same frequencies; within DATA_RTOL.
    assert np.allclose(got["0"]["0"]["fluxd"], flux, rtol=1e-6, atol=0), \
        f"setjy's flux density {got['0']['0']['fluxd']} differs from the serial {flux} (rtol 1e-6)"
    assert_columns_match(reference_dir / "ngc5921.ms", tmp_path / "ngc5921.mms", ["MODEL_DATA"])


def test_applycal_corrected_data(transport, casa_data, serial, tmp_path):
    copy_data(casa_data, tmp_path, "ngc5921.mms", "ngc5921.G")
    run = casa_node_run("applycal_gains.py", ["ngc5921.mms", "ngc5921.G"], tmp_path, transport)
    reference_dir, reference = serial("applycal", "applycal_gains.py", ["ngc5921.ms", "ngc5921.G"],
                                      ["ngc5921.ms", "ngc5921.G"])

    # applycal, then the flagdata summary: one command per sub-MS each.
    assert_ran_on_casa_node(run, commands=2 * SUB_MSS)
    assert run.result["summary"] == reference["summary"], "flags after applycal differ from the serial run's"
    assert_columns_match(reference_dir / "ngc5921.ms", tmp_path / "ngc5921.mms",
                         ["CORRECTED_DATA", "WEIGHT", "FLAG"])


def test_uvcontsub_line_and_continuum(transport, casa_data, serial, tmp_path):
    copy_data(casa_data, tmp_path, "ngc5921.mms")
    run = casa_node_run("uvcontsub_line.py", ["ngc5921.mms"], tmp_path, transport)
    reference_dir, _ = serial("uvcontsub", "uvcontsub_line.py", ["ngc5921.ms"], ["ngc5921.ms"])

    # Field 2 is in two of the four sub-MSs (scans 3 and 6); uvcontsub_old
    # still sends every sub-MS a command, and the two without it end in
    # MSSelectionNullSelection, which it ignores.
    assert_ran_on_casa_node(run, commands=SUB_MSS)
    assert_columns_match(reference_dir / "ngc5921.ms.contsub", tmp_path / "ngc5921.mms.contsub",
                         ["DATA", "FLAG"])
    assert_columns_match(reference_dir / "ngc5921.ms.cont", tmp_path / "ngc5921.mms.cont", ["DATA"])


def test_partition_into_multi_ms(transport, casa_data, serial, tmp_path):
    copy_data(casa_data, tmp_path, "ngc5921.ms")
    run = casa_node_run("partition_mms.py", ["ngc5921.ms", "parallel.mms"], tmp_path, transport)
    reference_dir, reference = serial("partition", "partition_mms.py", ["ngc5921.ms"],
                                      ["ngc5921.ms", "serial.mms"])

    assert_ran_on_casa_node(run, commands=SUB_MSS)
    got, expected = run.result["partition"], reference["partition"]
    assert len(expected) == SUB_MSS, expected

    def layout(parts, prefix):
        # listpartition's view: each sub-MS's name (relative to the MMS)
        # and its scans with their rows, spws and channels (not the size on
        # disk, which is not the data).
        return {i: (part["MS"].replace(prefix, "MMS"),
                    {scan: (v["nrows"], list(v["spwIds"]), list(v["nchans"]))
                     for scan, v in part["scanId"].items()})
                for i, part in parts.items()}

    assert layout(got, "parallel.mms") == layout(expected, "serial.mms"), \
        "the Multi-MS partitioned on casa-node has other sub-MSs than the serial one"
    assert_columns_match(reference_dir / "serial.mms", tmp_path / "parallel.mms",
                         ["DATA", "FLAG", "WEIGHT", "SIGMA", "UVW"])
