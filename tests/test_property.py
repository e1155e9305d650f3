"""Property tests: arbitrary input reaches only the documented errors, never a crash.

* ``relay.protocol.decode`` raises :class:`ProtocolError` and nothing else,
  whether fed random bytes, random text, or JSON objects that look almost
  right (a real ``type`` tag, fields of random types).
* The request models raise pydantic's ``ValidationError`` and nothing else;
  through the API's ``validate`` that becomes :class:`ValidationFailed` (422)
  naming a field, and the request limits raise only ``ValidationFailed``.
"""

from __future__ import annotations

import json
import struct

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import wire
from relay.api import validate
from relay.errors import ValidationFailed
from relay.limits import check_chat_request
from relay.models import (
    ChatRequest,
    CreateKeyRequest,
    RegisterRequest,
    UpdateInstanceRequest,
)
from relay.settings import RelaySettings

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
