"""The wire protocol's frames on their own: exact bytes, decode/validation, versions."""

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
    Kick,
    Ping,
    Pong,
    ProtocolError,
    Request,
    StreamError,
    Upload,
    Welcome,
    frames,
)

# One example of every message type, with non-default values wherever a field
# has a default, so a field dropped by encode or decode cannot go unnoticed.
EVERY_MESSAGE = [
    Hello(protocol=2, agent_version="0.1.0", agent_id="agent-1", models=("m1", "m2"), max_concurrency=4,
          capabilities=("chat", "images", "transcribe"), min_protocol=2, image_models=("img-1", "img-2"),
          transcribe_models=("whisper-1",)),
    Welcome(protocol=2, instance_id="abc", node_id="node-1", heartbeat_interval=2.5, chat_url="http://x/api/chat/abc",
            latest_agent_version="0.9.1"),
    Request(id=7, body={"model": "m1", "messages": [{"role": "user", "content": "hi"}], "metadata": {"k": [1]}},
            stream=False, window=1024, op="images", request_id="req-1"),
    Request(id=8, body={"model": "whisper-1", "filename": "a.wav"}, stream=False, window=2048, op="transcribe",
            request_id="req-2", upload=15 * 1024 * 1024),
    Cancel(id=7, reason="client disconnected"),
    Data(id=7, payload=b'data: {"x": 1}\n\n'),
    Data(id=wire.MAX_STREAM_ID, payload=b""),
    Upload(id=8, payload=b"RIFF\x24\x00\x00\x00WAVE"),
    Upload(id=wire.MAX_STREAM_ID, payload=b""),
    Credit(id=7, amount=4096),
    Credit(id=1, amount=2**32 - 1),
    End(id=8),
    StreamError(id=7, status=502, message="model server: boom", code="upstream_error"),
    StreamError(id=9, status=400, message="bad"),
    Ping(ts=1234.5),
    Pong(ts=1234.5),
    GoAway(reason="draining"),
    Kick(reason="replaced"),
]


@pytest.mark.parametrize("event", EVERY_MESSAGE, ids=lambda e: type(e).__name__)
def test_round_trip(event):
    encoded = wire.encode(event)
    assert wire.decode(encoded) == event
    # Hot-path frames are binary; control messages are JSON text.
    if type(event) in (Data, Upload, Credit):
        assert isinstance(encoded, bytes)
    else:
        assert isinstance(encoded, str)
        assert orjson.loads(encoded)["type"]


def test_every_message_type_is_covered():
    covered = {type(e) for e in EVERY_MESSAGE}
    assert covered == set(wire.Event.__args__)  # type: ignore[attr-defined]


# The exact bytes of every frame type: a renamed field, a reordered header or a
# changed tag breaks every agent in the field, so it must break a test first.
EXACT = [
    (Hello(2, "0.2.0", "a1", ("m",), 4, ("chat",), 1),
     '{"type":"hello","protocol":2,"agent_version":"0.2.0","agent_id":"a1","models":["m"],"max_concurrency":4,'
     '"capabilities":["chat"],"min_protocol":1}'),
    # image_models, when there are some, comes last; without them the bytes above stay those of 0.1.
    (Hello(2, "0.2.0", "a1", ("m",), 4, ("chat", "images"), 2, ("img",)),
     '{"type":"hello","protocol":2,"agent_version":"0.2.0","agent_id":"a1","models":["m"],"max_concurrency":4,'
     '"capabilities":["chat","images"],"min_protocol":2,"image_models":["img"]}'),
    (Welcome(2, "i1", "n1", 5.0, "http://r/api/chat/i1", "0.2.0"),
     '{"type":"welcome","protocol":2,"instance_id":"i1","node_id":"n1","heartbeat_interval":5.0,'
     '"chat_url":"http://r/api/chat/i1","latest_agent_version":"0.2.0"}'),
    (Request(3, {"model": "m"}, True, 65536, "chat", "r9"),
     '{"type":"request","id":3,"body":{"model":"m"},"stream":true,"window":65536,"op":"chat","request_id":"r9"}'),
    (Cancel(3, "client disconnected"), '{"type":"cancel","id":3,"reason":"client disconnected"}'),
    (End(3), '{"type":"end","id":3}'),
    (StreamError(3, 502, "boom", "upstream_error"),
     '{"type":"error","id":3,"status":502,"message":"boom","code":"upstream_error"}'),
    (Ping(1.5), '{"type":"ping","ts":1.5}'),
    (Pong(1.5), '{"type":"pong","ts":1.5}'),
    (GoAway("bye"), '{"type":"goaway","reason":"bye"}'),
    (Kick("replaced"), '{"type":"kick","reason":"replaced"}'),
    (Data(3, b"data: x\n\n"), b"\x01\x00\x00\x00\x03data: x\n\n"),
    (Credit(258, 65536), b"\x02\x00\x00\x01\x02\x00\x01\x00\x00"),
    # Kind 3, the same header as DATA; the payload is the file's bytes, untouched.
    (Upload(259, b"\x00RIFF\xff"), b"\x03\x00\x00\x01\x03\x00RIFF\xff"),
    # upload, when not zero, comes last; without it a request reads as above.
    (Request(4, {"model": "w"}, False, 1024, "transcribe", "r10", 3_000_000),
     '{"type":"request","id":4,"body":{"model":"w"},"stream":false,"window":1024,"op":"transcribe",'
     '"request_id":"r10","upload":3000000}'),
    # transcribe_models, when there are some, comes after image_models (left out when empty, like them).
    (Hello(2, "0.2.0", "a1", ("m",), 4, ("chat", "transcribe"), 2, (), ("whisper-1",)),
     '{"type":"hello","protocol":2,"agent_version":"0.2.0","agent_id":"a1","models":["m"],"max_concurrency":4,'
     '"capabilities":["chat","transcribe"],"min_protocol":2,"transcribe_models":["whisper-1"]}'),
]


@pytest.mark.parametrize("event, expected", EXACT, ids=lambda x: type(x).__name__)
def test_exact_encoding_of_every_frame_type(event, expected):
    assert wire.encode(event) == expected
    assert wire.decode(expected) == event
    if isinstance(expected, str):  # the bus carries control frames as bytes
        assert wire.decode(expected.encode()) == event


def test_exact_encoding_covers_every_frame_type():
    assert {type(e) for e, _ in EXACT} == set(wire.Event.__args__)  # type: ignore[attr-defined]


def test_a_version_1_hello_means_chat_only():
    v1 = wire.decode('{"type": "hello", "protocol": 1, "agent_version": "0.1.0", "agent_id": "a", '
                     '"models": ["m"], "max_concurrency": 2}')
    assert v1 == Hello(1, "0.1.0", "a", ("m",), 2, ("chat",), 1)
    assert wire.negotiate(v1) == 1


def test_image_models_are_optional_and_empty_means_none():
    assert wire.OP_IMAGES == "images"
    assert wire.decode(_hello()).image_models == ()
    assert wire.decode(_hello(image_models=[])).image_models == ()
    long_name = "org/" + "x" * (frames.MAX_MODEL_NAME_LENGTH - 4)
    assert wire.decode(_hello(image_models=["a", long_name])).image_models == ("a", long_name)
    # An agent without image models says nothing about them.
    assert "image_models" not in orjson.loads(wire.encode(Hello(2, "x", "a", ("m",), 1)))


def test_transcribe_models_and_upload_are_optional_and_empty_means_none():
    assert wire.OP_TRANSCRIBE == "transcribe"
    assert wire.decode(_hello()).transcribe_models == ()
    assert wire.decode(_hello(transcribe_models=[])).transcribe_models == ()
    assert wire.decode(_hello(transcribe_models=["whisper-1"])).transcribe_models == ("whisper-1",)
    assert "transcribe_models" not in orjson.loads(wire.encode(Hello(2, "x", "a", ("m",), 1)))
    plain = Request(1, {}, True)
    assert plain.upload == 0 and "upload" not in orjson.loads(wire.encode(plain))
    assert wire.decode('{"type": "request", "id": 1, "body": {}, "stream": false, "upload": 0}').upload == 0
    largest = wire.decode(f'{{"type": "request", "id": 1, "body": {{}}, "stream": false, "upload": {2**32 - 1}}}')
    assert largest.upload == frames.MAX_UPLOAD


def test_upload_frames_and_credit_share_the_data_header():
    # The kind byte tells them apart; the payload is never interpreted.
    payload = bytes(range(256)) * 4
    assert wire.encode_upload(9, payload) == struct.pack("!BI", 3, 9) + payload
    assert wire.decode(wire.encode_upload(9, payload)) == Upload(9, payload)
    assert wire.decode(bytearray(wire.encode_upload(9, payload))) == Upload(9, payload)
    assert wire.FrameKind.UPLOAD == 3


def test_fields_a_side_does_not_know_are_ignored():
    # How version-1 agents read version-2 requests, and how an End with the
    # usage an old agent sends is still read.
    assert wire.decode('{"type": "end", "id": 4, "usage": {"total_tokens": 3}, "model": "m"}') == End(4)
    assert wire.decode('{"type": "cancel", "id": 4, "future": [1, 2]}') == Cancel(4)


def test_defaults_are_filled_when_optional_fields_are_absent():
    assert wire.decode('{"type": "request", "id": 3, "body": {}, "stream": true}') == Request(
        3, {}, True, wire.DEFAULT_WINDOW, "chat", "")
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
    '{"type": "request", "id": 1, "body": {}, "stream": true, "op": ""}',
    '{"type": "request", "id": 1, "body": {}, "stream": true, "op": 3}',
    '{"type": "request", "id": 1, "body": {}, "stream": true, "request_id": 3}',
    '{"type": "welcome", "protocol": 2, "instance_id": "a", "node_id": "n", "heartbeat_interval": 1, '
    '"latest_agent_version": 2}',
    '{"type": "kick", "reason": 1}',
    _hello(capabilities=[]), _hello(capabilities="chat"), _hello(capabilities=[""]), _hello(capabilities=[1]),
    _hello(capabilities=["c"] * 33), _hello(min_protocol="1"), _hello(protocol=1, min_protocol=2),
    '{"type": "ping", "ts": "now"}',
    '{"type": "ping", "ts": true}',
    '{"type": "pong", "ts": null}',
    '{"type": "goaway", "reason": null}',
    '{"type": "welcome", "protocol": 1, "instance_id": "a", "node_id": "n", "heartbeat_interval": true}',
    '{"type": "welcome", "protocol": "1", "instance_id": "a", "node_id": "n", "heartbeat_interval": 1}',
    _hello(protocol=True), _hello(protocol="1"), _hello(max_concurrency=True), _hello(max_concurrency=0),
    _hello(max_concurrency=-1), _hello(models=[]), _hello(models="m"), _hello(models=[""]), _hello(models=[1]),
    _hello(models=None), _hello(agent_id=""), _hello(agent_id="x" * 129), _hello(agent_id=7),
    _hello(agent_version="x" * 129), _hello(agent_version=None),
    _hello(image_models="img"), _hello(image_models=None), _hello(image_models=[""]), _hello(image_models=[1]),
    _hello(image_models=[None]), _hello(image_models={"img": 1}), _hello(image_models=["ok", 2]),
    _hello(image_models=["x" * 1025]), _hello(image_models=["i"] * 10_001),
    _hello(transcribe_models="w"), _hello(transcribe_models=None), _hello(transcribe_models=[""]),
    _hello(transcribe_models=[3]), _hello(transcribe_models=["x" * 1025]),
    # request.upload: a byte count, 0 to 2**32 - 1
    '{"type": "request", "id": 1, "body": {}, "stream": false, "upload": -1}',
    '{"type": "request", "id": 1, "body": {}, "stream": false, "upload": true}',
    '{"type": "request", "id": 1, "body": {}, "stream": false, "upload": "10"}',
    '{"type": "request", "id": 1, "body": {}, "stream": false, "upload": 1.5}',
    '{"type": "request", "id": 1, "body": {}, "stream": false, "upload": null}',
    '{"type": "request", "id": 1, "body": {}, "stream": false, "upload": 4294967296}',
    # bad stream ids
    '{"type": "cancel", "id": 0}',
    '{"type": "cancel", "id": -1}',
    '{"type": "cancel", "id": 4294967296}',
    '{"type": "end", "id": null}',
    '{"type": "request", "id": 123456789012345678901234567890, "body": {}, "stream": true}',
    # binary frames: too short, unknown kind, bad credit length, bad stream id
    b"", b"\x01", b"\x01\x00\x00\x00",
    struct.pack("!BI", 0, 1),
    struct.pack("!BI", 4, 1) + b"xyz",
    struct.pack("!BI", 255, 1),
    struct.pack("!BI", 2, 1),
    struct.pack("!BI", 2, 1) + b"\x00\x00\x01",
    struct.pack("!BI", 2, 1) + b"\x00\x00\x00\x01\x00",
    struct.pack("!BI", 1, 0) + b"payload",
    struct.pack("!BI", 2, 0) + b"\x00\x00\x00\x01",
    struct.pack("!BI", 3, 0) + b"upload",
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
                     "instance_id", "node_id", "heartbeat_interval", "chat_url", "capabilities", "min_protocol",
                     "op", "request_id", "latest_agent_version", "image_models", "transcribe_models",
                     "upload"]),
    st.one_of(st.sampled_from(list(frames._CONTROL_TYPES)), st.none(), st.booleans(),
              st.integers(-2**40, 2**40), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
              st.lists(st.text(max_size=3), max_size=3),
              st.dictionaries(st.text(max_size=3), st.integers(-2**40, 2**40), max_size=2)),
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


# -- versions -----------------------------------------------------------------


@pytest.mark.parametrize("speaks, agreed", [((1, 1), 1), ((1, 2), 2), ((2, 2), 2), ((1, 7), 2), ((2, 9), 2)])
def test_negotiate_picks_the_newest_version_both_speak(speaks, agreed):
    low, high = speaks
    assert wire.negotiate(Hello(high, "x", "a", ("m",), 1, min_protocol=low)) == agreed


def test_negotiate_names_the_side_to_upgrade():
    with pytest.raises(ProtocolError) as old_agent:
        wire.negotiate(Hello(0, "x", "a", ("m",), 1, min_protocol=0))
    assert old_agent.value.close_code == CloseCode.UNSUPPORTED_VERSION
    assert "upgrade the agent" in str(old_agent.value)
    with pytest.raises(ProtocolError) as old_relay:
        wire.negotiate(Hello(5, "x", "a", ("m",), 1, min_protocol=3))
    assert old_relay.value.close_code == CloseCode.UNSUPPORTED_VERSION
    assert "upgrade the relay" in str(old_relay.value)
    # A relay that speaks only version 1 cannot serve an agent that needs 2.
    with pytest.raises(ProtocolError, match="upgrade the relay"):
        wire.negotiate(Hello(2, "x", "a", ("m",), 1, min_protocol=2), supported=frozenset({1}))


@pytest.mark.parametrize("text, parsed", [("0.2.0", (0, 2, 0)), ("1.10", (1, 10)), ("0.3.0rc1", (0, 3, 0)),
                                          ("2.0.dev4", (2, 0)), ("", ()), ("x", ())])
def test_parse_version(text, parsed):
    assert wire.parse_version(text) == parsed


def test_sse_helpers():
    assert wire.sse_event(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert wire.SSE_DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize("payload, message", [
    (b'{"error": {"message": "model not found", "type": "x"}}', "model not found"),
    (b'{"error": "plain text error"}', "plain text error"),
    ({"error": {"message": "as dict"}}, "as dict"),
    (b'{"error": {"message": 5}}', None),
    (b'{"choices": []}', None),
    (b"<html>502</html>", None),
    (b"[1]", None),
])
def test_error_message_of_openai_error_bodies(payload, message):
    assert wire.error_message(payload) == message


def test_redaction_agrees_on_every_secret_shape():
    from wire import redaction

    text = ("agent ira_" + "a" * 40 + " key irk_" + "b" * 40 + " upstream sk-" + "c" * 40
            + " header Bearer xyz.123")
    redacted = redaction.redact(text)
    assert "a" * 40 not in redacted and "b" * 40 not in redacted and "c" * 40 not in redacted
    assert "xyz.123" not in redacted and redacted.count(redaction.REDACTED) == 4


def test_wire_imports_nothing_of_either_side_nor_the_io_stack():
    import subprocess
    import sys

    code = ("import sys, wire; print(sorted(m for m in ('relay', 'agent', 'starlette', 'uvicorn', 'redis', "
            "'websockets', 'httpx', 'anyio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(("text", "parsed"), [("1\u00b2", (1,)), ("\u0663.1", ()), ("0.2.\u00b9", (0, 2)),
                                               ("2.0", (2, 0))])
def test_parse_version_reads_ascii_digits_only(text, parsed):
    # str.isdigit() takes superscripts (int() then raised: /api/upgrade answered 500) and other scripts' digits.
    assert wire.parse_version(text) == parsed


def test_hello_parameters_are_an_optional_bounded_object():
    hello = wire.Hello(protocol=2, agent_version="0.2.0", agent_id="a", models=("m",), max_concurrency=1,
                       parameters={"introduction": "hi", "variables": [{"key": "book"}]})
    assert wire.decode(wire.encode(hello)) == hello
    plain = wire.Hello(protocol=2, agent_version="0.2.0", agent_id="a", models=("m",), max_concurrency=1)
    # Left out when empty: older relays read the same bytes.
    assert b"parameters" not in wire.frames.encode_control(plain)
    base = orjson.loads(wire.frames.encode_control(plain))
    for bad in ([], "x", 1, {"introduction": "x" * wire.frames.MAX_PARAMETERS_BYTES}):
        with pytest.raises(wire.ProtocolError):
            wire.decode(orjson.dumps({**base, "parameters": bad}))


def test_parse_version_reads_release_numbers_and_stops_at_a_part_no_release_has():
    assert wire.parse_version("0.2.10") == (0, 2, 10)
    assert wire.parse_version("1.2.3-beta") == (1, 2, 3)
    assert wire.parse_version("1." + "9" * 4301) == (1,)  # a caller's thousands of digits never reach int()
    assert wire.parse_version("9" * 10) == ()
    assert wire.parse_version("9" * 9) == (999_999_999,)
