"""Property tests: arbitrary input reaches only the documented errors, never a crash.

* ``wire.decode`` raises :class:`ProtocolError` and nothing else,
  whether fed random bytes, random text, or JSON objects that look almost
  right (a real ``type`` tag, fields of random types).
* The request models raise pydantic's ``ValidationError`` and nothing else;
  through the API's ``validate`` that becomes :class:`ValidationFailed` (422)
  naming a field, and the request limits raise only ``ValidationFailed``.
* The document (``/openapi.json``) and the relay agree on every request body:
  valid for the document exactly when the relay accepts it.
* The demo backend answers every body the document allows (generated from the
  document itself), and never raises on any body at all; ``text_of`` and
  ``_count_tokens`` take any JSON.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import jsonschema
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import wire
from agent.demo_model import DemoBackend, _count_tokens, text_of
from relay.bodies.instances import CreateKeyRequest, RegisterRequest, UpdateInstanceRequest
from relay.bodies.openai import MAX_COUNT, ChatCompletion, ChatRequest
from relay.errors import ValidationFailed
from relay.inputs import validate
from relay.routes import build_openapi
from relay.serving.request_limits import check_chat_request
from relay.settings import RelaySettings

pytestmark = pytest.mark.slow

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)

FIELDS = ["id", "type", "protocol", "agent_version", "agent_id", "models", "max_concurrency", "status", "message",
          "code", "usage", "model", "ts", "reason", "body", "stream", "window", "payload", "amount"]
TAGS = ["hello", "welcome", "request", "cancel", "end", "error", "ping", "pong", "goaway", "data", "credit", ""]


def decode_only_fails_with_protocol_error(message: str | bytes) -> None:
    try:
        event = wire.decode(message)
    except wire.ProtocolError as exc:
        assert exc.close_code in set(wire.CloseCode)
    else:
        # Whatever decodes re-encodes to something that decodes to the same event.
        assert wire.decode(wire.encode(event)) == event


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_decode_random_bytes(message):
    decode_only_fails_with_protocol_error(message)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([1, 2, 3, 0, 255]), st.integers(min_value=0, max_value=2**32 - 1), st.binary(max_size=16))
def test_decode_binary_frames_with_plausible_headers(kind, stream_id, payload):
    decode_only_fails_with_protocol_error(struct.pack("!BI", kind, stream_id) + payload)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=64))
def test_decode_random_text(message):
    decode_only_fails_with_protocol_error(message)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(TAGS), st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8))
def test_decode_almost_valid_control_frames(tag, fields):
    fields["type"] = tag
    decode_only_fails_with_protocol_error(json.dumps(fields))


@settings(max_examples=200, deadline=None)
@given(json_values)
@example(2**64)
@example({"type": "end", "id": 2**70})
@example({"type": "ping", "ts": 1e308})
def test_decode_any_json(value):
    decode_only_fails_with_protocol_error(json.dumps(value))


# -- request models -------------------------------------------------------------------------

message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "robot", 1])},
    optional={"content": st.one_of(json_values, st.lists(st.dictionaries(
        st.sampled_from(["type", "text", "image_url"]), json_values, max_size=3), max_size=3)),
        "name": json_values},
)
chat_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"messages": st.lists(message, max_size=4)}, optional={
        "temperature": json_values, "top_p": json_values, "max_tokens": json_values, "stream": json_values,
        "metadata": json_values, "model": json_values, "max_completion_tokens": json_values,
        "stop": json_values,
    }),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chat_bodies)
def test_chat_request_only_validation_errors(body):
    try:
        chat = ChatRequest.model_validate(body)
    except ValidationError:
        with pytest.raises(ValidationFailed) as raised:
            validate(ChatRequest, body)
        assert raised.value.status == 422 and raised.value.param
        return
    # Valid requests may still exceed a limit: only ValidationFailed, never anything else.
    try:
        check_chat_request(chat, RelaySettings(max_messages=2, max_content_chars=30, max_tokens_cap=100))
    except ValidationFailed as exc:
        assert exc.status == 422
    else:
        body_out = chat.upstream_body("m")
        assert body_out["model"] == "m" and orjson.loads(orjson.dumps(body_out)) == body_out


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([RegisterRequest, UpdateInstanceRequest, CreateKeyRequest]),
       st.one_of(json_values, st.dictionaries(st.sampled_from(["name", "description", "visibility", "key"]),
                                              json_values, max_size=4)))
def test_small_models_only_validation_errors(model, body):
    try:
        model.model_validate(body)
    except ValidationError:
        with pytest.raises(ValidationFailed):
            validate(model, body)


# -- the document and the relay agree ---------------------------------------------------------

DOCUMENT = build_openapi("http://127.0.0.1:1")


def document_validator(model: type) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{model.__name__}",
                                            "components": DOCUMENT["components"]})


#: The relay with its shape limits off but its type checks on (the cap is the
#: document's largest count): what it accepts then is what the document may promise.
EXACT = RelaySettings(max_messages=0, max_content_chars=0, max_tokens_cap=MAX_COUNT)


def as_the_relay_reads_it(body: Any) -> Any:
    """``body`` sent as JSON and parsed the way the relay parses it (orjson: big ints become floats)."""
    try:
        return orjson.loads(json.dumps(body))
    except (orjson.JSONDecodeError, ValueError):
        assume(False)  # Infinity and friends: not JSON, a 400 before any model


def relay_accepts(model: type, data: Any) -> bool:
    try:
        parsed = validate(model, data)
        if model is ChatRequest:
            check_chat_request(parsed, EXACT)
    except ValidationFailed:
        return False
    return True


counts = st.one_of(json_values, st.integers(min_value=-2, max_value=2**64 + 2), st.sampled_from([1.0, 2.0, 2.5, 0.0]))
part = st.fixed_dictionaries(
    {},
    optional={"type": st.one_of(st.sampled_from(["text", "image_url", "input_audio", "file", ""]), json_values),
              "text": st.one_of(st.none(), st.text(max_size=8), json_values),
              "image_url": json_values, "input_audio": json_values},
)
near_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "function", "robot"])},
    optional={"content": st.one_of(st.none(), st.text(max_size=8), json_values, st.lists(part, max_size=3),
                                   st.lists(json_values, max_size=2)),
              "name": json_values, "tool_calls": json_values},
)
near_chat_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"messages": st.one_of(st.lists(near_message, max_size=3), json_values)}, optional={
        "temperature": st.one_of(json_values, st.floats(min_value=-1, max_value=3)),
        "top_p": st.one_of(json_values, st.floats(min_value=-1, max_value=2)),
        "max_tokens": counts, "max_completion_tokens": counts, "stream": json_values, "model": json_values,
        "metadata": json_values,
        "stream_options": st.one_of(json_values, st.fixed_dictionaries(
            {}, optional={"include_usage": json_values, "other": json_values})),
    }),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_chat_bodies)
@example({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]})
@example({"messages": [{"role": "user", "content": [{"type": "image_url", "text": None}]}]})
@example({"messages": [{"role": "user"}], "max_tokens": 2.0})
@example({"messages": [{"role": "user"}], "max_tokens": 2**64})
@example({"messages": [{"role": "user"}], "max_completion_tokens": "many"})
@example({"messages": [{"role": "user"}], "stream_options": True})
def test_the_document_says_exactly_what_the_relay_accepts_in_a_chat(body):
    data = as_the_relay_reads_it(body)
    documented = document_validator(ChatRequest).is_valid(data)
    assert relay_accepts(ChatRequest, data) == documented, f"document says {'valid' if documented else 'invalid'}"


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([RegisterRequest, UpdateInstanceRequest, CreateKeyRequest]),
       st.one_of(json_values, st.dictionaries(st.sampled_from(["name", "description", "visibility", "key"]),
                                              st.one_of(json_values, st.sampled_from(["public", "private"])),
                                              max_size=3)))
@example(UpdateInstanceRequest, {})
@example(UpdateInstanceRequest, {"name": None})
@example(UpdateInstanceRequest, {"description": ""})
def test_the_document_says_exactly_what_the_relay_accepts_elsewhere(model, body):
    data = as_the_relay_reads_it(body)
    assert relay_accepts(model, data) == document_validator(model).is_valid(data)


# -- the demo backend answers whatever the document allows -------------------------------------

CHAT_OPERATION = schemathesis.openapi.from_dict(DOCUMENT)["/api/chat/{instance_id}"]["POST"]


async def run_demo(body: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    backend = DemoBackend(rate=0)
    chunks = [orjson.loads(chunk) async for batch in backend.stream(body) for chunk in batch]
    return chunks, orjson.loads(await backend.complete(body))


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=CHAT_OPERATION.as_strategy())
def test_the_demo_backend_answers_every_documented_chat(case):
    """Bodies generated from the document: the relay accepts them, and the demo answers them."""
    data = as_the_relay_reads_it(case.body)
    chat = validate(ChatRequest, data)
    check_chat_request(chat, EXACT)
    body = chat.upstream_body("demo")
    for message in body["messages"]:
        assert isinstance(text_of(message.get("content")), str)
    assert _count_tokens(body["messages"]) >= 3 * len(body["messages"])
    chunks, completion = asyncio.run(run_demo(body))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finished = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finished) == 1 and finished[0]["choices"][0]["finish_reason"] in ("stop", "length")
    if (body.get("stream_options") or {}).get("include_usage"):
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    ChatCompletion.model_validate(completion)
    said = completion["choices"][0]["message"]["content"]
    assert said == "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    limit = min(body["max_tokens"], body.get("max_completion_tokens") or MAX_COUNT)
    assert 1 <= len(said.split()) <= limit


wild_bodies = st.dictionaries(
    st.sampled_from(["messages", "max_tokens", "max_completion_tokens", "stream_options", "model", "stream"]),
    st.one_of(json_values, st.lists(near_message, max_size=3), st.fixed_dictionaries(
        {}, optional={"include_usage": json_values})),
    max_size=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wild_bodies)
@example({"messages": None})
@example({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]})
@example({"messages": [{"role": "user"}], "stream_options": True, "max_tokens": "many"})
@example({"messages": [{"role": "user"}], "max_tokens": -1, "max_completion_tokens": 0})
def test_the_demo_backend_never_raises(body):
    """Even what the relay would refuse (the agent may sit behind another relay version) gets an answer."""
    chunks, completion = asyncio.run(run_demo(body))
    assert chunks[-1]["choices"] == [] or chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert isinstance(completion["choices"][0]["message"]["content"], str)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_text_of_and_count_tokens_take_any_json(value):
    assert isinstance(text_of(value), str)
    assert isinstance(_count_tokens(value), int) and _count_tokens(value) >= 0
    assert isinstance(_count_tokens([{"content": value}, value]), int)
