"""Conformance vectors: the generated classes decode each and re-encode it to
the identical bytes."""

import json

import pytest

from casanode._pb.casa.node.v1 import envelope_pb2
from conftest import REPO

VECTORS = REPO / "tests" / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())


def test_the_manifest_lists_vectors():
    assert len(MANIFEST) > 30
    assert all(entry["message"] == "casa.node.v1.Envelope" for entry in MANIFEST)


@pytest.mark.parametrize("entry", MANIFEST, ids=[e["file"] for e in MANIFEST])
def test_vector_decodes_and_reencodes_identically(entry):
    data = (VECTORS / entry["file"]).read_bytes()
    envelope = envelope_pb2.Envelope.FromString(data)
    assert envelope.WhichOneof("body") == entry["body"]
    assert envelope.protocol_version == 1
    assert envelope.SerializeToString() == data
    assert envelope.SerializeToString(deterministic=True) == data
