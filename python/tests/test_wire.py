"""The numbers of the wire come from proto/: casanode's by construction,
from the generated classes; the worker's (crates/node/src/worker.py, which
has no protobuf runtime and spells them out) checked here against the same
descriptors.

- casanode's protocol numbers are envelope.proto's Constant enum;
- values.field_key, from which casanode's hand-written encoders and parsers
  take every field, gives what protobuf writes, for every field;
- the worker's numbers, enum values and body keys are the descriptors', and
  the messages it writes and reads by hand are protobuf's;
- casanode and the worker encode values to the same bytes, at the nesting
  bound and past it, and refuse the same values when decoding.
"""

import os
import struct
import sys
import types

import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor

from casanode import connection, values
from casanode._pb.casa.node.v1 import driver_pb2, envelope_pb2, journal_pb2, node_pb2, value_pb2
from conftest import REPO
from test_values import DEEPEST, EVERY_KIND, nest, same, too_deep_natively

WORKER = REPO / "crates" / "node" / "src" / "worker.py"
Envelope = envelope_pb2.Envelope


@pytest.fixture(scope="module")
def worker():
    """worker.py loaded as a module: it defines the codec and runs nothing."""
    module = types.ModuleType("casa_node_worker")
    sys.modules[module.__name__] = module  # so that its classes pickle
    try:
        exec(compile(WORKER.read_text(), str(WORKER), "exec"), module.__dict__)
        yield module
    finally:
        del sys.modules[module.__name__]


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


# -------------------------------------------------------------------- worker


def test_the_worker_spells_the_protocols_numbers_as_the_descriptors_do(worker):
    assert worker.PROTOCOL_VERSION == envelope_pb2.CONSTANT_PROTOCOL_VERSION
    assert worker._MAX_DEPTH == envelope_pb2.CONSTANT_MAX_VALUE_DEPTH
    assert worker._MAX_FRAME == envelope_pb2.CONSTANT_MAX_FRAME
    body = Envelope.DESCRIPTOR.oneofs_by_name["body"]
    assert worker._BODY_FIELDS == {f.number for f in body.fields}
    assert worker._COMMAND_REQUEST == values.field_number(Envelope, "command_request")
    assert worker._CONTROL_REQUEST == values.field_number(Envelope, "control_request")
    assert worker._COMMAND_RESPONSE == values.field_key(Envelope, "command_response")
    assert worker._CONTROL_RESPONSE == values.field_key(Envelope, "control_response")
    assert worker._LOG_RECORD == values.field_key(Envelope, "log_record")
    for name in ("AUTO", "EVAL", "EXEC", "PUSH"):
        assert getattr(worker, name) == node_pb2.CommandMode.Value("COMMAND_MODE_" + name)
    for name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        assert getattr(worker, "L_" + name) == node_pb2.LogLevel.Value("LOG_LEVEL_" + name)


def _sent(frame):
    """The Envelope of a frame the worker made (a list of parts)."""
    data = b"".join(bytes(part) for part in frame)
    assert struct.unpack(">I", data[:4])[0] == len(data) - 4
    envelope = Envelope.FromString(data[4:])
    assert envelope.protocol_version == envelope_pb2.CONSTANT_PROTOCOL_VERSION
    return envelope


def test_the_worker_writes_what_protobuf_reads(worker):
    log = _sent(worker._log_frame(worker.L_WARNING, "the message ☉", "stderr", 1234.5)).log_record
    assert (log.level, log.message, log.origin, log.time) == (
        node_pb2.LOG_LEVEL_WARNING, "the message ☉", "stderr", 1234.5
    )

    ready = _sent(worker._ready_frame("", 3)).control_response
    assert (ready.ok, ready.error, ready.rank, ready.pid) == (True, "", 3, os.getpid())
    failed = _sent(worker._ready_frame("it raised", 2)).control_response
    assert (failed.ok, failed.error, failed.rank) == (False, "it raised", 2)

    ret_parts, ret_len = worker._encode_value([1, "a"])
    for successful, traceback in [(True, None), (False, "Traceback: boom")]:
        parts, n = worker._response(9, worker.EVAL, ret_parts, ret_len, successful, traceback, 1.5, 2.5)
        envelope = _sent(worker._envelope(worker._COMMAND_RESPONSE, parts, n, 7))
        response = envelope.command_response
        assert envelope.correlation == 7
        assert (response.id, response.mode, response.successful) == (9, node_pb2.COMMAND_MODE_EVAL, successful)
        assert (response.command_start_time, response.command_stop_time) == (1.5, 2.5)
        assert values.from_value(response.ret) == [1, "a"]
        assert response.HasField("traceback") == (traceback is not None)
        assert response.traceback == (traceback or "")


def test_the_worker_reads_what_protobuf_writes(worker, monkeypatch, tmp_path):
    request = Envelope(protocol_version=envelope_pb2.CONSTANT_PROTOCOL_VERSION, correlation=11)
    request.command_request.id = 5
    request.command_request.command = "f()"
    request.command_request.mode = node_pb2.COMMAND_MODE_EXEC
    request.command_request.parameters.add(name="a", value=values.to_value({"k": (1.5, None)}))
    body = request.SerializeToString()
    version, correlation, field, a, b = worker._dec_envelope(body)
    assert (version, correlation, field) == (envelope_pb2.CONSTANT_PROTOCOL_VERSION, 11, worker._COMMAND_REQUEST)
    rid, command, mode, [(name, (start, end))] = worker._dec_command(body, memoryview(body), a, b)
    assert (rid, command, mode, name) == (5, "f()", worker.EXEC, "a")
    assert worker._dec_value(body, memoryview(body), start, end, False) == {"k": (1.5, None)}

    class Server:
        """What _Worker's control methods use of themselves."""

        def __init__(self):
            self.levels = []
            self.state = worker._State()
            self.out = types.SimpleNamespace(log=self.refuse)

        def refuse(self, level, message, origin):
            raise AssertionError(message)

        def set_log_level(self, level):
            self.levels.append(level)

        def _apply_start(self, body, a, b):
            worker._Worker._apply_start(self, body, a, b)

    server = Server()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CASA_NODE_TEST_WIRE", "")
    start = Envelope()
    start.control_request.start.working_directory = str(tmp_path)
    start.control_request.start.environment.add(name="CASA_NODE_TEST_WIRE", value="set")
    start.control_request.start.log_level = node_pb2.LOG_LEVEL_DEBUG
    level = Envelope()
    level.control_request.set_log_level.log_level = node_pb2.LOG_LEVEL_ERROR
    for envelope in (start, level):
        body = envelope.SerializeToString()
        _, _, field, a, b = worker._dec_envelope(body)
        assert field == worker._CONTROL_REQUEST
        worker._Worker._control(server, body, a, b)
    assert os.environ["CASA_NODE_TEST_WIRE"] == "set"
    assert server.levels == [node_pb2.LOG_LEVEL_DEBUG, node_pb2.LOG_LEVEL_ERROR]

    cancel = Envelope()
    cancel.control_request.cancel.request_id = 42
    worker._Worker._cancel(server, cancel.SerializeToString())
    assert server.state.interrupt_id == 42


# ------------------------------------------------- casanode and the worker

SHAPES = {f"{name}, {edge}": (name, edge) for name in DEEPEST for edge in ("at the bound", "past it")}


def _shaped(key):
    name, edge = SHAPES[key]
    wrap, leaf, most, _, *top = DEEPEST[name]
    return nest(leaf, wrap, most + (edge == "past it"), *top)


@pytest.mark.parametrize("key", list(SHAPES) + sorted(EVERY_KIND))
def test_casanode_and_the_worker_encode_alike(worker, key):
    obj = _shaped(key) if key in SHAPES else EVERY_KIND[key]
    parts, n = worker._encode_value(obj)
    wire = b"".join(bytes(part) for part in parts)
    assert len(wire) == n
    assert wire == values.to_value(obj).SerializeToString()
    assert same(worker._dec_value(wire, memoryview(wire), 0, n, False), obj)


@pytest.mark.parametrize("name", DEEPEST)
def test_casanode_and_the_worker_refuse_the_same_values(worker, name, monkeypatch):
    wrap, leaf, most, _, *top = DEEPEST[name]
    wire = too_deep_natively(nest(leaf, wrap, most + 1, *top), monkeypatch).SerializeToString()
    with pytest.raises(ValueError, match="deeper than"):
        values.from_value(value_pb2.Value.FromString(wire))
    with pytest.raises(worker.DecodeError, match="deeper than"):
        worker._dec_value(wire, memoryview(wire), 0, len(wire), False)
