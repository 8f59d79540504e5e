"""The numbers of the wire come from proto/: casanode's by construction,
from the generated classes.

- casanode's protocol numbers are envelope.proto's Constant enum;
- values.field_key, from which casanode's hand-written encoders and parsers
  take every field, gives what protobuf writes, for every field.
"""

import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor

from casanode import connection, values
from casanode._pb.casa.node.v1 import driver_pb2, envelope_pb2, journal_pb2, node_pb2, value_pb2


# ------------------------------------------------------------------ casanode


def test_casanode_keeps_the_protocols_numbers():
    assert values.MAX_DEPTH == envelope_pb2.CONSTANT_MAX_VALUE_DEPTH
    assert connection.PROTOCOL_VERSION == envelope_pb2.CONSTANT_PROTOCOL_VERSION
    assert connection.MAX_FRAME == envelope_pb2.CONSTANT_MAX_FRAME
    assert connection.MAX_LEASE_BLOCK == envelope_pb2.CONSTANT_MAX_LEASE


def _messages():
    """Every message of casa.node.v1, nested ones included."""
    for module in (value_pb2, node_pb2, driver_pb2, envelope_pb2, journal_pb2):
        pending = list(module.DESCRIPTOR.message_types_by_name.values())
        while pending:
            descriptor = pending.pop()
            pending += descriptor.nested_types
            yield descriptor


FD = FieldDescriptor
# Values protobuf writes, by field type; 1 for the other (integer) types.
_SAMPLES = {FD.TYPE_STRING: "x", FD.TYPE_BYTES: b"x", FD.TYPE_BOOL: True, FD.TYPE_DOUBLE: 1.5, FD.TYPE_FLOAT: 1.5}


def _set(message, field):
    """Sets `field` of `message` to something protobuf writes."""
    target = getattr(message, field.name)
    if field.type == FD.TYPE_MESSAGE:
        target.add() if field.is_repeated else target.SetInParent()
        return
    if field.type == FD.TYPE_ENUM:
        sample = field.enum_type.values[1].number
    else:
        sample = _SAMPLES.get(field.type, 1)
    if field.is_repeated:
        target.append(sample)
    else:
        setattr(message, field.name, sample)


FIELDS = [(d, f) for d in _messages() for f in d.fields]


@pytest.mark.parametrize("descriptor,field", FIELDS, ids=[f.full_name for _, f in FIELDS])
def test_field_keys_are_what_protobuf_writes(descriptor, field):
    cls = message_factory.GetMessageClass(descriptor)
    message = cls()
    _set(message, field)
    data = message.SerializeToString()
    key = values.field_key(cls, field.name)
    assert data.startswith(key), (data, key)
    assert next(values.fields(memoryview(data)))[0] == values.field_number(cls, field.name) == field.number
