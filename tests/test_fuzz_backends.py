"""Unusual messages through a real relay and agent, for every backend.

Each body below is one the document (``/openapi.json``) allows but a backend
might not expect: parts without text or with ``"text": null``, audio parts,
``content: null`` on a tool-calling assistant turn, an empty part list,
``name`` fields, parts with fields nobody declared, token counts written
``2.0``.  Through the demo backend and through the OpenAI backend (to the
fake model server of ``tests/helpers.py``), streaming and not, each must be
answered ``200`` with a well-formed answer, and the model must receive the
messages exactly as sent.

Each body the document forbids must be refused by the relay itself: ``422``
naming the field, without reaching the agent (so never a ``502``).

Both lists are checked against the document first, so they say what the
document says, not what someone believed it says.  Nothing may be logged
at ERROR meanwhile, and the agent must not fail a request or lose its link.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import orjson
import pytest
from redis.asyncio import Redis

from agent.demo_model import DemoBackend
from relay.routes import build_openapi
from relay.telemetry.logs import DeliberateEndings
from tests.helpers import FakeUpstream, openai_backend, running_agent, running_relay, running_upstream, sse_lines

pytestmark = pytest.mark.anyio

BACKENDS = ("demo", "openai")
NO_RATE_LIMITS = dict(rate_per_caller=0, rate_per_instance=0, rate_register_per_ip=0,
                      max_streams_per_caller=0, max_streams_per_instance=0)

USER = {"role": "user", "content": "hello"}
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\": 1}"}}

#: name -> request body (without ``stream``); the document allows each.
ALLOWED: dict[str, dict[str, Any]] = {
    "image part with text null": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "text": None, "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]},
    "image part without text": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}}]}]},
    "image part with a caption": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "text": "a caption", "image_url": {"url": "https://example.com/cat.png"}}]}]},
    "input_audio part": {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "UklGRiQAAABXQVZF", "format": "wav"}},
        {"type": "text", "text": "transcribe this"}]}]},
    "unknown part type with text null": {"messages": [{"role": "user", "content": [
        {"type": "file", "text": None, "file": {"file_id": "file-1"}}]}]},
    "assistant content null with tool_calls": {"messages": [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"answer\": 42}"},
        {"role": "user", "content": "and so?"}]},
    "assistant without content key": {"messages": [USER, {"role": "assistant", "tool_calls": [TOOL_CALL]}]},
    "content empty list": {"messages": [{"role": "user", "content": []}]},
    "content null on a user message": {"messages": [{"role": "user", "content": None}]},
    "content empty string": {"messages": [{"role": "user", "content": ""}]},
    "name fields": {"messages": [{"role": "system", "name": "rules", "content": "be brief"},
                                 {"role": "user", "name": "alice", "content": "hi, I am alice"},
                                 {"role": "function", "name": "lookup", "content": "42"}]},
    "parts with extra fields": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "cached", "cache_control": {"type": "ephemeral"}, "x-extra": [1, {"y": None}]},
        {"type": "refusal", "refusal": "no", "nested": {"deep": [[], {}, None, 1.5, True]}}]}]},
    "message with extra fields": {"messages": [{"role": "user", "content": "hi", "audio": None,
                                                "weird": {"a": [1, "b"]}}]},
    "developer role only, no user": {"messages": [{"role": "developer", "content": "you are a test"}]},
    "whitespace, control and astral text": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": " \n\t\u2028 "}, {"type": "text", "text": "nul\u0000byte \U0001f600 \ufeff"}]}]},
    "max_tokens written 2.0, max_completion_tokens": {"messages": [USER], "max_tokens": 2.0,
                                                      "max_completion_tokens": 3},
    "stream_options include_usage": {"messages": [USER], "stream_options": {"include_usage": True}},
    "stream_options null, unknown option": {"messages": [USER], "stream_options": None, "n": 1,
                                            "seed": 7, "stop": ["\n"], "tools": [], "metadata": {"k": [None]}},
}

#: name -> (raw JSON body, the field the 422 must name); the document forbids each.
FORBIDDEN: dict[str, tuple[str, str]] = {
    "text part with text null": (
        '{"messages": [{"role": "user", "content": [{"type": "text", "text": null}]}]}', "messages.0.content.parts.0"),
    "text part without text": (
        '{"messages": [{"role": "user", "content": [{"type": "image_url"}, {"type": "text"}]}]}',
        "messages.0.content.parts.1"),
    "part without type": ('{"messages": [{"role": "user", "content": [{"text": "hi"}]}]}',
                          "messages.0.content.parts.0.type"),
    "part with empty type": ('{"messages": [{"role": "user", "content": [{"type": "", "text": "hi"}]}]}',
                             "messages.0.content.parts.0.type"),
    "part that is a string": ('{"messages": [{"role": "user", "content": ["hi"]}]}', "messages.0.content.parts.0"),
    "text that is a number": ('{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
                              "messages.0.content.parts.0.text"),
    "content a number": ('{"messages": [{"role": "user", "content": 5}]}', "messages.0.content"),
    "content an object": ('{"messages": [{"role": "user", "content": {"type": "text", "text": "hi"}}]}',
                          "messages.0.content"),
    "unknown role": ('{"messages": [{"role": "robot", "content": "hi"}]}', "messages.0.role"),
    "no role": ('{"messages": [{"content": "hi"}]}', "messages.0.role"),
    "message not an object": ('{"messages": ["hi"]}', "messages.0"),
    "no messages": ('{"messages": []}', "messages"),
    "stream_options not an object": ('{"messages": [{"role": "user"}], "stream_options": true}', "stream_options"),
    "include_usage not a boolean": ('{"messages": [{"role": "user"}], "stream_options": {"include_usage": "yes"}}',
                                    "stream_options.include_usage"),
    "max_tokens zero": ('{"messages": [{"role": "user"}], "max_tokens": 0}', "max_tokens"),
    "max_tokens fractional": ('{"messages": [{"role": "user"}], "max_tokens": 2.5}', "max_tokens"),
    "max_tokens a string": ('{"messages": [{"role": "user"}], "max_tokens": "5"}', "max_tokens"),
    "max_tokens beyond 64 bits": ('{"messages": [{"role": "user"}], "max_tokens": 18446744073709551616}',
                                  "max_tokens"),
    "max_completion_tokens a string": ('{"messages": [{"role": "user"}], "max_completion_tokens": "many"}',
                                       "max_completion_tokens"),
    "max_completion_tokens zero": ('{"messages": [{"role": "user"}], "max_completion_tokens": 0}',
                                   "max_completion_tokens"),
    "temperature too hot": ('{"messages": [{"role": "user"}], "temperature": 3}', "temperature"),
    "stream not a boolean": ('{"messages": [{"role": "user"}], "stream": "yes"}', "stream"),
}


def chat_request_validator() -> jsonschema.Draft202012Validator:
    doc = build_openapi("http://x")
    return jsonschema.Draft202012Validator({"$ref": "#/components/schemas/ChatRequest",
                                            "components": doc["components"]})


def test_the_allowed_bodies_are_allowed_by_the_document():
    validator = chat_request_validator()
    for name, body in ALLOWED.items():
        for stream in (True, False):
            errors = [e.message for e in validator.iter_errors({**body, "stream": stream})]
            assert not errors, f"{name}: {errors}"


def test_the_forbidden_bodies_are_forbidden_by_the_document():
    validator = chat_request_validator()
    for name, (raw, _) in FORBIDDEN.items():
        assert not validator.is_valid(orjson.loads(raw)), f"{name}: the document allows it"


# -- through a live relay and agent --------------------------------------------------------


class ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.addFilter(DeliberateEndings())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module", params=BACKENDS)
async def live(request, redis_server) -> AsyncIterator[dict[str, Any]]:
    client = Redis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    errors = ErrorRecords()
    logging.getLogger().addHandler(errors)
    try:
        async with contextlib.AsyncExitStack() as stack:
            relay = await stack.enter_async_context(running_relay(redis_server.url, **NO_RATE_LIMITS))
            instance_id, token = await relay.register(f"unusual-{request.param}")
            upstream = None
            if request.param == "openai":
                upstream = await stack.enter_async_context(running_upstream(FakeUpstream(chunks=3)))
                backend = openai_backend(upstream)
                stack.push_async_callback(backend.aclose)
            else:
                backend = DemoBackend(rate=0)
            agent = await stack.enter_async_context(running_agent(relay.url, token, backend))
            http = await stack.enter_async_context(relay.client())
            yield {"backend": request.param, "url": f"/api/chat/{instance_id}/chat/completions", "http": http,
                   "agent": agent, "upstream": upstream, "errors": errors}
    finally:
        logging.getLogger().removeHandler(errors)


@pytest.fixture
def healthy(live) -> Any:
    """Call at the end of a test: nothing logged at ERROR, nothing failed, no reconnect, during it."""
    agent, errors = live["agent"], live["errors"].records
    logged, failed = len(errors), agent.status.failed

    def check() -> None:
        assert [r.getMessage() for r in errors[logged:]] == []
        assert agent.status.failed == failed and agent.status.last_error == "", agent.status

    return check


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "complete"])
@pytest.mark.parametrize("name", list(ALLOWED))
async def test_allowed_message_is_answered(live, healthy, name, stream):
    body = {**ALLOWED[name], "stream": stream}
    upstream: FakeUpstream | None = live["upstream"]
    asked = len(upstream.requests) if upstream else 0
    async with live["http"].stream("POST", live["url"], json=body) as response:
        if response.status_code != 200:
            pytest.fail(f"{response.status_code}: {(await response.aread()).decode()}")
        content_type = response.headers["content-type"]
        if stream:
            assert content_type.startswith("text/event-stream")
            events = await sse_lines(response)
        else:
            assert content_type.startswith("application/json")
            answer = orjson.loads(await response.aread())
    if stream:
        assert events and events[-1] == "[DONE]", events[-3:]
        chunks = [orjson.loads(e) for e in events[:-1]]
        assert chunks and all("error" not in c and c["object"] == "chat.completion.chunk" for c in chunks), chunks
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] in ("stop", "length")
        if (body.get("stream_options") or {}).get("include_usage") and live["backend"] == "demo":
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] > 0
    else:
        assert answer["object"] == "chat.completion", answer
        text = answer["choices"][0]["message"]["content"]
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    assert isinstance(text, str) and text
    if live["backend"] == "demo" and "max_completion_tokens" in body:
        assert len(text.split()) == min(body["max_tokens"], body["max_completion_tokens"])
    if upstream is not None:
        # The model gets the messages exactly as the caller sent them (explicit nulls, extra fields and all).
        assert len(upstream.requests) == asked + 1
        assert upstream.requests[-1]["messages"] == body["messages"]
    healthy()


@pytest.mark.parametrize("name", list(FORBIDDEN))
async def test_forbidden_message_is_refused_by_the_relay(live, healthy, name):
    raw, param = FORBIDDEN[name]
    served = live["agent"].status.served
    response = await live["http"].post(live["url"], content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_parameter", param), error
    assert live["agent"].status.served == served, "a refused request reached the agent"
    if live["upstream"] is not None:
        assert all(r.get("messages") != orjson.loads(raw).get("messages") for r in live["upstream"].requests)
    healthy()
