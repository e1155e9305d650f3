"""The sans-I/O wire protocol on its own: encode/decode, validation, stream state."""

from __future__ import annotations

import struct

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import wire
from wire import (
    Cancel,
    CloseCode,
    Credit,
    Data,
    End,
    GoAway,
    Hello,
    Ping,
    Pong,
    ProtocolError,
    Request,
    StreamError,
    StreamState,
    StreamTracker,
    Welcome,
)

# One example of every message type, with non-default values wherever a field
# has a default, so a field dropped by encode or decode cannot go unnoticed.
EVERY_MESSAGE = [
    Hello(protocol=1, agent_version="0.1.0", agent_id="agent-1", models=("m1", "m2"), max_concurrency=4),
    Welcome(protocol=1, instance_id="abc", node_id="node-1", heartbeat_interval=2.5, chat_url="http://x/api/chat/abc"),
    Request(id=7, body={"model": "m1", "messages": [{"role": "user", "content": "hi"}], "metadata": {"k": [1]}},
            stream=False, window=1024),
    Cancel(id=7, reason="client disconnected"),
    Data(id=7, payload=b'data: {"x": 1}\n\n'),
    Data(id=wire.MAX_STREAM_ID, payload=b""),
    Credit(id=7, amount=4096),
    Credit(id=1, amount=2**32 - 1),
    End(id=7, usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}, model="m1"),
    End(id=8),
    StreamError(id=7, status=502, message="model server: boom", code="upstream_error"),
    StreamError(id=9, status=400, message="bad"),
    Ping(ts=1234.5),
    Pong(ts=1234.5),
    GoAway(reason="draining"),
]


@pytest.mark.parametrize("event", EVERY_MESSAGE, ids=lambda e: type(e).__name__)
def test_round_trip(event):
    wire = wire.encode(event)
    assert wire.decode(wire) == event
    # Hot-path frames are binary; control messages are JSON text.
    if type(event) in (Data, Credit):
        assert isinstance(wire, bytes)
    else:
        assert isinstance(wire, str)
        assert orjson.loads(wire)["type"]


def test_every_message_type_is_covered():
    covered = {type(e) for e in EVERY_MESSAGE}
    assert covered == set(wire.Event.__args__)  # type: ignore[attr-defined]


def test_defaults_are_filled_when_optional_fields_are_absent():
    assert wire.decode('{"type": "request", "id": 3, "body": {}, "stream": true}') == Request(3, {}, True, wire.DEFAULT_WINDOW)
    assert wire.decode('{"type": "cancel", "id": 3}') == Cancel(3, "cancelled")
    assert wire.decode('{"type": "ping"}') == Ping(0.0)
    assert wire.decode('{"type": "goaway"}') == GoAway("shutting down")


def test_data_payload_is_not_interpreted():
    payload = bytes(range(256)) * 3
    assert wire.decode(wire.encode_data(5, payload)) == Data(5, payload)
    assert wire.decode(memoryview(wire.encode_data(5, payload))) == Data(5, payload)


def _hello(**changes):
    obj = {"type": "hello", "protocol": 1, "agent_version": "1", "agent_id": "a", "models": ["m"],
           "max_concurrency": 1}
    obj.update(changes)
    return orjson.dumps({k: v for k, v in obj.items() if v is not _DROP}).decode()


_DROP = object()

MALFORMED = [
    # not JSON / not an object
    "", "{", "not json", "null", "[]", '"hello"', "42", "true",
    '{"type": "hello",}',
    # unknown or missing type
    "{}", '{"type": "nonsense"}', '{"type": 1}', '{"type": null}', '{"type": ["hello"]}', '{"type": "Hello"}',
    # missing fields
    '{"type": "request", "body": {}, "stream": true}',
    '{"type": "request", "id": 1, "stream": true}',
    '{"type": "request", "id": 1, "body": {}}',
    '{"type": "cancel"}',
    '{"type": "end"}',
    '{"type": "error", "id": 1, "message": "x"}',
    '{"type": "error", "id": 1, "status": 500}',
    '{"type": "welcome", "protocol": 1, "instance_id": "a", "node_id": "n"}',
    _hello(models=_DROP), _hello(agent_id=_DROP), _hello(protocol=_DROP), _hello(max_concurrency=_DROP),
    _hello(agent_version=_DROP),
    # wrong types, bool where an int is meant
    '{"type": "cancel", "id": true}',
    '{"type": "cancel", "id": false}',
    '{"type": "cancel", "id": "1"}',
    '{"type": "cancel", "id": 1.0}',
    '{"type": "cancel", "id": 1, "reason": 5}',
    '{"type": "request", "id": 1, "body": [], "stream": true}',
    '{"type": "request", "id": 1, "body": {}, "stream": 1}',
    '{"type": "request", "id": 1, "body": {}, "stream": "yes"}',
    '{"type": "request", "id": 1, "body": {}, "stream": true, "window": true}',
    '{"type": "request", "id": 1, "body": {}, "stream": true, "window": 0}',
    '{"type": "request", "id": 1, "body": {}, "stream": true, "window": -5}',
    '{"type": "request", "id": 1, "body": {}, "stream": true, "window": 1.5}',
    '{"type": "error", "id": 1, "status": true, "message": "x"}',
    '{"type": "error", "id": 1, "status": 200, "message": "x"}',
    '{"type": "error", "id": 1, "status": 600, "message": "x"}',
    '{"type": "error", "id": 1, "status": "500", "message": "x"}',
    '{"type": "error", "id": 1, "status": 500, "message": null}',
    '{"type": "error", "id": 1, "status": 500, "message": "x", "code": 3}',
    '{"type": "end", "id": 1, "usage": []}',
    '{"type": "end", "id": 1, "model": 3}',
    '{"type": "ping", "ts": "now"}',
    '{"type": "ping", "ts": true}',
    '{"type": "pong", "ts": null}',
    '{"type": "goaway", "reason": null}',
    '{"type": "welcome", "protocol": 1, "instance_id": "a", "node_id": "n", "heartbeat_interval": true}',
    '{"type": "welcome", "protocol": "1", "instance_id": "a", "node_id": "n", "heartbeat_interval": 1}',
    _hello(protocol=True), _hello(protocol="1"), _hello(max_concurrency=True), _hello(max_concurrency=0),
    _hello(max_concurrency=-1), _hello(models=[]), _hello(models="m"), _hello(models=[""]), _hello(models=[1]),
    _hello(models=None), _hello(agent_id=""), _hello(agent_id="x" * 129), _hello(agent_id=7),
    # bad stream ids
    '{"type": "cancel", "id": 0}',
    '{"type": "cancel", "id": -1}',
    '{"type": "cancel", "id": 4294967296}',
    '{"type": "end", "id": null}',
    '{"type": "request", "id": 123456789012345678901234567890, "body": {}, "stream": true}',
    # binary frames: too short, unknown kind, bad credit length, bad stream id
    b"", b"\x01", b"\x01\x00\x00\x00",
    struct.pack("!BI", 0, 1),
    struct.pack("!BI", 3, 1) + b"xyz",
    struct.pack("!BI", 255, 1),
    struct.pack("!BI", 2, 1),
    struct.pack("!BI", 2, 1) + b"\x00\x00\x01",
    struct.pack("!BI", 2, 1) + b"\x00\x00\x00\x01\x00",
    struct.pack("!BI", 1, 0) + b"payload",
    struct.pack("!BI", 2, 0) + b"\x00\x00\x00\x01",
]


@pytest.mark.parametrize("message", MALFORMED, ids=repr)
def test_malformed_frames_raise_protocol_error(message):
    with pytest.raises(ProtocolError) as info:
        wire.decode(message)
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("message", [None, 42, ["hello"], {"type": "ping"}])
def test_non_message_types_raise_protocol_error(message):
    with pytest.raises(ProtocolError):
        wire.decode(message)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=64), st.text(max_size=64)))
def test_decode_of_arbitrary_input_raises_only_protocol_error(message):
    try:
        wire.decode(message)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(
    st.sampled_from(["type", "id", "body", "stream", "window", "status", "message", "code", "usage", "model",
                     "reason", "ts", "protocol", "agent_version", "agent_id", "models", "max_concurrency",
                     "instance_id", "node_id", "heartbeat_interval", "chat_url"]),
    st.one_of(st.sampled_from(list(p._CONTROL_TYPES)), st.none(), st.booleans(),
              st.integers(-2**40, 2**40), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
              st.lists(st.text(max_size=3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(-2**40, 2**40), max_size=2)),
))
def test_decode_of_arbitrary_control_objects_raises_only_protocol_error(obj):
    # JSON objects shaped almost like real messages reach the field validators.
    try:
        wire.decode(orjson.dumps(obj).decode())
    except ProtocolError:
        pass


def test_encode_rejects_non_events():
    with pytest.raises(TypeError):
        wire.encode({"type": "ping"})  # type: ignore[arg-type]


# -- handshake version ---------------------------------------------------------


def test_check_version_accepts_supported():
    wire.check_version(Hello(wire.PROTOCOL_VERSION, "x", "a", ("m",), 1))


@pytest.mark.parametrize("version", [0, 2, 99])
def test_check_version_refuses_with_unsupported_version_close_code(version):
    with pytest.raises(ProtocolError) as info:
        wire.check_version(Hello(version, "x", "a", ("m",), 1))
    assert info.value.close_code == CloseCode.UNSUPPORTED_VERSION
    assert str(version) in str(info.value)
    assert "Upgrade" in str(info.value)


# -- stream state ----------------------------------------------------------------

DATA, END, ERROR, CANCEL = Data(1, b"x"), End(1), StreamError(1, 500, "e"), Cancel(1)

TRANSITIONS = [
    (StreamState.OPEN, DATA, StreamState.STREAMING),
    (StreamState.OPEN, END, StreamState.ENDED),
    (StreamState.OPEN, ERROR, StreamState.FAILED),
    (StreamState.OPEN, CANCEL, StreamState.CANCELLED),
    (StreamState.STREAMING, DATA, StreamState.STREAMING),
    (StreamState.STREAMING, END, StreamState.ENDED),
    (StreamState.STREAMING, ERROR, StreamState.FAILED),
    (StreamState.STREAMING, CANCEL, StreamState.CANCELLED),
]
_ALLOWED = {(s, type(e)) for s, e, _ in TRANSITIONS}
ILLEGAL = [
    (state, event)
    for state in StreamState
    for event in (DATA, END, ERROR, CANCEL)
    if (state, type(event)) not in _ALLOWED
]


@pytest.mark.parametrize("state, event, expected", TRANSITIONS, ids=lambda x: getattr(x, "name", type(x).__name__))
def test_legal_transitions(state, event, expected):
    tracker = StreamTracker(1, window=100, state=state)
    assert tracker.receive(event) is expected
    assert tracker.state is expected


@pytest.mark.parametrize("state, event", ILLEGAL, ids=lambda x: getattr(x, "name", type(x).__name__))
def test_illegal_transitions_raise(state, event):
    assert state.finished  # only finished streams refuse events
    tracker = StreamTracker(1, window=100, state=state)
    with pytest.raises(ProtocolError):
        tracker.receive(event)
    assert tracker.state is state


def test_finished_states():
    assert {s for s in StreamState if s.finished} == {StreamState.ENDED, StreamState.FAILED, StreamState.CANCELLED}


def test_window_overshoot_by_more_than_one_frame_is_a_protocol_error():
    tracker = StreamTracker(1, window=10)
    tracker.receive(Data(1, b"x" * 8))  # 8 of 10
    tracker.receive(Data(1, b"x" * 8))  # credit was left: may overshoot by one frame (16)
    assert tracker.unacked == 16
    with pytest.raises(ProtocolError):
        tracker.receive(Data(1, b"x"))  # no credit left at all


def test_consumed_bytes_reopen_the_window():
    tracker = StreamTracker(1, window=10)
    tracker.receive(Data(1, b"x" * 10))
    with pytest.raises(ProtocolError):
        tracker.receive(Data(1, b"x"))
    tracker = StreamTracker(1, window=10)
    tracker.receive(Data(1, b"x" * 10))
    tracker.consumed(4)
    assert tracker.unacked == 6
    tracker.receive(Data(1, b"x" * 4))
    assert tracker.unacked == 10


def test_a_single_frame_larger_than_the_window_is_allowed():
    tracker = StreamTracker(1, window=10)
    tracker.receive(Data(1, b"x" * 1000))
    assert tracker.state is StreamState.STREAMING


def test_credit_is_granted_in_batches_of_half_a_window():
    tracker = StreamTracker(1, window=100)
    tracker.receive(Data(1, b"x" * 100))
    assert [tracker.consumed(10) for _ in range(4)] == [0, 0, 0, 0]
    assert tracker.consumed(10) == 50  # 50 consumed: half a window, grant it all
    assert tracker.consumed(49) == 0
    assert tracker.consumed(1) == 50
    assert tracker.unacked == 0


def test_no_credit_is_granted_to_a_finished_stream():
    tracker = StreamTracker(1, window=100)
    tracker.receive(Data(1, b"x" * 100))
    tracker.receive(End(1))
    assert tracker.consumed(100) == 0


def test_send_window_tracks_credit():
    window = wire.SendWindow(10)
    assert window.can_send
    window.sent(15)  # one frame may overshoot
    assert not window.can_send
    window.grant(5)
    assert not window.can_send
    window.grant(1)
    assert window.can_send and window.credit == 1


def test_sse_helpers():
    assert wire.sse_event(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert wire.SSE_DONE == b"data: [DONE]\n\n"


def test_protocol_module_imports_no_io_stack():
    import subprocess
    import sys

    code = "import sys, relay.protocol; print(sorted(m for m in ('starlette','uvicorn','redis','websockets','httpx','anyio') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
