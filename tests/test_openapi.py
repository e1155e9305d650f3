"""``/openapi.json``: complete, well-formed, and true — schemathesis checks the relay against it.

A relay runs in a background thread on 127.0.0.1 with a real agent connected,
once per backend the agent can run: the built-in demo model, and the OpenAI
backend talking over HTTP to the fake OpenAI-compatible model of
``tests/helpers.py``.  So a fuzzed chat request goes all the way: relay,
websocket, agent, backend (and model server), and back.

schemathesis generates requests from the relay's own document, bounded and
derandomized (the same examples every run), and checks that

* no answer is a 5xx other than a documented ``503``/``504`` (an agent or a
  model that works never justifies a ``502``);
* every status, content type, header and body matches the document, and a
  chat stream is well formed to its end (chunks, then ``data: [DONE]``, no
  error event);
* what the document allows is accepted, and what it forbids is refused with
  a 4xx (for chat requests, which is where the document and the backends
  must agree on what a message may hold);
* nothing was logged at ERROR by the relay, uvicorn or the agent, and the
  agent neither failed a request nor lost its connection.

The relay's configurable shape limits (messages, content size) are off here
and its ``max_tokens`` cap is the document's maximum, since the document
cannot know a relay's settings; rate and stream limits are off so that the
fuzzer's bursts are not throttled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
import redis as sync_redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route, WebSocketRoute

from agent.backends import DemoBackend
from relay.app import create_app
from relay.logs import DeliberateEndings
from relay.models import MAX_COUNT
from relay.openapi import build_openapi, operations
from relay.settings import RelaySettings
from tests.helpers import FakeUpstream, openai_backend, running_agent, running_relay, running_upstream

#: No rate or stream limits (the fuzzer sends bursts), no shape limits the
#: document cannot know; the token cap is the document's own maximum (a cap of
#: 0 would also turn off the relay's type check of ``max_completion_tokens``).
NO_LIMITS = dict(rate_per_caller=0, rate_per_instance=0, rate_register_per_ip=0,
                 max_streams_per_caller=0, max_streams_per_instance=0,
                 max_messages=0, max_content_chars=0, max_tokens_cap=MAX_COUNT)

BACKENDS = ("demo", "openai")
CHAT_OPERATIONS = {"POST /api/chat/{instance_id}", "POST /api/chat/{instance_id}/chat/completions"}

#: The only 5xx a relay with a working agent may answer, with their codes (README).
DOCUMENTED_SERVER_ERRORS = {
    503: {"instance_offline", "instance_at_capacity", "node_draining", "not_ready"},
    504: {"model_timeout"},
}


def test_every_route_is_documented():
    app = create_app(RelaySettings(), redis_url="redis://127.0.0.1:1")  # never connected: routes only
    documented = operations()
    websockets = build_openapi("http://x")["x-websockets"]
    for route in app.routes:
        if isinstance(route, WebSocketRoute):
            assert route.path in websockets
            continue
        assert isinstance(route, Route)
        for method in route.methods - {"HEAD"}:
            assert method.lower() in documented.get(route.path, {}), f"{method} {route.path} is not in /openapi.json"
    # ... and nothing is documented that does not exist.
    real = {(r.path, m.lower()) for r in app.routes if isinstance(r, Route) for m in r.methods}
    for path, methods in documented.items():
        for method in methods:
            assert (path, method) in real, f"/openapi.json documents {method.upper()} {path}, which does not exist"


def test_document_is_self_consistent():
    doc = build_openapi("http://x")
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for item in node:
                yield from refs(item)

    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    ids = [op["operationId"] for methods in doc["paths"].values() for op in methods.values()]
    assert len(ids) == len(set(ids))
    # Request bodies are the very models the handlers validate with.
    assert "ChatRequest" in schemas and "messages" in schemas["ChatRequest"]["properties"]


def test_document_says_what_a_content_part_needs():
    """The model's own rule (a ``text`` part needs a ``text`` string) is in the schema, not only in code."""
    validator = jsonschema.Draft202012Validator(build_openapi("http://x")["components"]["schemas"]["ContentPart"])
    assert validator.is_valid({"type": "text", "text": "hi"})
    assert validator.is_valid({"type": "image_url", "text": None, "image_url": {"url": "data:,"}})
    assert validator.is_valid({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}})
    assert not validator.is_valid({"type": "text", "text": None})
    assert not validator.is_valid({"type": "text"})
    assert not validator.is_valid({"type": ""})


# -- schemathesis against a live relay, one per backend ------------------------------------


class ErrorRecords(logging.Handler):
    """Every record at ERROR or above, from any logger (relay, uvicorn, agent), any thread."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.addFilter(DeliberateEndings())  # what the relay's own handler drops too
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> list[str]:
        formatter = logging.Formatter("%(name)s %(levelname)s: %(message)s")
        return [formatter.format(record) for record in self.records]


@pytest.fixture(scope="module", params=BACKENDS)
def live_relay(request, redis_server) -> Iterator[dict[str, Any]]:
    backend_name = request.param
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    errors = ErrorRecords()
    logging.getLogger().addHandler(errors)
    info: dict[str, Any] = {"backend": backend_name, "errors": errors}
    ready = threading.Event()

    async def main() -> None:
        stop = asyncio.Event()
        info["stop"] = (asyncio.get_running_loop(), stop)
        try:
            async with contextlib.AsyncExitStack() as stack:
                relay = await stack.enter_async_context(running_relay(redis_server.url, **NO_LIMITS))
                instance_id, token = await relay.register(f"fuzzed-{backend_name}")
                if backend_name == "openai":
                    upstream = await stack.enter_async_context(running_upstream(FakeUpstream(chunks=3)))
                    backend = openai_backend(upstream)
                    stack.push_async_callback(backend.aclose)
                    info["upstream"] = upstream
                else:
                    backend = DemoBackend(rate=0)
                agent = await stack.enter_async_context(running_agent(relay.url, token, backend))
                info.update(url=relay.url, instance_id=instance_id, agent=agent)
                ready.set()
                await stop.wait()
        finally:
            ready.set()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(30) and "url" in info, "relay did not start"
        yield info
    finally:
        if "stop" in info:
            loop, stop = info["stop"]
            loop.call_soon_threadsafe(stop.set)
        thread.join(15)
        logging.getLogger().removeHandler(errors)


def _error_code(response: schemathesis.Response) -> str | None:
    try:
        error = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return error.get("code") if isinstance(error, dict) else None


def no_undocumented_server_error(ctx, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Replaces schemathesis' ``not_a_server_error``: a 503 or 504 with its documented code is an answer."""
    status = response.status_code
    if status >= 500 and _error_code(response) not in DOCUMENTED_SERVER_ERRORS.get(status, ()):
        raise AssertionError(f"{case.operation.label} answered {status}: {response.content[:500]!r}")


def chat_stream_is_well_formed(ctx, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """A 200 event stream: chunk objects, then ``[DONE]``; a mid-stream error event is a failure too."""
    content_type = (response.headers.get("content-type") or [""])[0]
    if response.status_code != 200 or not content_type.startswith("text/event-stream"):
        return
    assert not response.stream_cut_short, "the stream was not read to its end (raise max-stream-events)"
    data = [line[6:] for line in response.content.decode().splitlines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", f"the stream does not end with [DONE]: {data[-3:]}"
    for payload in data[:-1]:
        event = json.loads(payload)
        assert "error" not in event, f"error event in a 200 stream: {payload}"
        assert event.get("object") == "chat.completion.chunk" and isinstance(event.get("choices"), list), payload


CHECKS = [no_undocumented_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, chat_stream_is_well_formed,
          positive_data_acceptance, negative_data_rejection]
#: Streams are read to their end (schemathesis reads 20 events by default).
#: Valid data may still meet a 401/403/404 (random ids, no credentials); 5xx
#: are judged by ``no_undocumented_server_error``.
CONFIG = {
    "max-stream-events": 10_000,
    "checks": {
        "positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "404", "5xx"]},
        "negative_data_rejection": {"expected-statuses": ["400", "401", "403", "404", "413", "422", "5xx"]},
    },
}
#: Examples per operation and generation mode.  Chat requests are what reaches
#: the agent: they are fuzzed harder, and with every backend.
EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 15}
CHAT_EXAMPLES = {GenerationMode.POSITIVE: 150, GenerationMode.NEGATIVE: 60}


def _fuzz(operation, live_relay: dict[str, Any], mode: GenerationMode, examples: int) -> None:
    chat = operation.label in CHAT_OPERATIONS
    # Invalid requests are sent to the live instance (a broken id would only find a 404).
    fixed = {"path_parameters": {"instance_id": live_relay["instance_id"]}} if chat and mode.is_negative else {}

    @given(case=operation.as_strategy(generation_mode=mode, **fixed))
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def conforms(case):
        params = case.path_parameters or {}
        # Random ids only ever find 404s: use the live instance's id most of the time.
        if "instance_id" in params and not fixed and str(params["instance_id"])[:1] < ("x" if chat else "V"):
            params["instance_id"] = live_relay["instance_id"]
        case.call_and_validate(base_url=live_relay["url"], checks=CHECKS, timeout=30)

    conforms()


def test_relay_conforms_to_its_openapi_document(live_relay):
    # Driven through hypothesis directly (one property per operation) rather
    # than schemathesis' pytest plugin, which lags behind pytest releases.
    schema = schemathesis.openapi.from_url(f"{live_relay['url']}/openapi.json",
                                           config=schemathesis.Config.from_dict(CONFIG))
    all_operations = [result.ok() for result in schema.get_all_operations()]
    documented = {f"{m.upper()} {path}" for path, methods in build_openapi("x")["paths"].items() for m in methods}
    # schemathesis leaves out the document's own URL.
    assert {o.label for o in all_operations} == documented - {"GET /openapi.json"}
    for operation in all_operations:
        if operation.label in CHAT_OPERATIONS:
            examples = CHAT_EXAMPLES
        elif live_relay["backend"] == "demo":
            examples = EXAMPLES  # the rest never reaches the agent: once (with the first backend) is enough
        else:
            continue
        for mode, count in examples.items():
            takes_input = {"parameters", "requestBody"} & operation.definition.raw.keys()
            if mode.is_positive or takes_input:  # nothing to get wrong in GET /healthz
                _fuzz(operation, live_relay, mode, count)


def test_the_fuzzed_instance_survived(live_relay):
    """After the fuzzing the instance still answers, and nothing anywhere went wrong on the way."""
    response = httpx.post(f"{live_relay['url']}/api/chat/{live_relay['instance_id']}",
                          json={"messages": [{"role": "user", "content": "still there?"}], "stream": False},
                          timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"
    agent = live_relay["agent"]
    assert agent.status.served > 1 and agent.status.failed == 0, agent.status
    assert agent.status.last_error == "", f"the agent lost its connection: {agent.status.last_error}"
    assert live_relay["errors"].lines() == []
    if live_relay["backend"] == "openai":
        assert len(live_relay["upstream"].requests) == agent.status.served
