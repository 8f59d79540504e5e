"""The checked-in message classes are what python/generate.py makes now."""

import filecmp
import importlib.util
import pathlib
import sys

import pytest

PYTHON_DIR = pathlib.Path(__file__).resolve().parents[1]
CHECKED_IN = PYTHON_DIR / "casanode" / "_pb"


def _load_generate():
    spec = importlib.util.spec_from_file_location("casanode_generate", PYTHON_DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(root):
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if "__pycache__" not in p.parts
    )


def test_checked_in_classes_are_not_stale(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is in the test extra")
    _load_generate().generate(tmp_path)
    fresh, checked_in = _files(tmp_path), _files(CHECKED_IN)
    assert fresh == checked_in, "run python/generate.py"
    stale = [
        name for name in fresh if not filecmp.cmp(tmp_path / name, CHECKED_IN / name, shallow=False)
    ]
    assert not stale, f"stale generated files {stale}: run python/generate.py"


def test_generated_classes_import_from_the_package_alone():
    from casanode._pb.casa.node.v1 import envelope_pb2

    assert envelope_pb2.Envelope.DESCRIPTOR.full_name == "casa.node.v1.Envelope"
    assert "casa" not in sys.modules, "generated code must not need proto/ on sys.path"
