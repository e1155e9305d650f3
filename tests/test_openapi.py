"""``/openapi.json``: complete, well-formed, and true — schemathesis checks the relay against it.

A relay runs in a background thread on 127.0.0.1 with a real agent connected,
once per backend the agent can run: the built-in demo model, and the OpenAI
backend talking over HTTP to the fake OpenAI-compatible model of
``tests/helpers.py``.  So a fuzzed chat request goes all the way: relay,
websocket, agent, backend (and model server), and back.

schemathesis generates requests from the relay's own document, bounded and
derandomized (the same examples every run), and checks that

* no answer is a 5xx other than a documented ``503``/``504`` (an agent or a
  model that works never justifies a ``502``), or the ``501`` of an image
  request to an instance whose agent cannot draw (the OpenAI backend here);
* every status, content type, header and body matches the document, and a
  chat stream is well formed to its end (chunks, then ``data: [DONE]``, no
  error event), as is SwiftChat's plain-text answer (text, then the usage line);
* what the document allows is accepted, and what it forbids is refused with
  a 4xx (for the requests that reach the agent, which is where the document,
  the relay's validators and the backends must agree);
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
import functools
import itertools
import json
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import jsonschema_rs  # schemathesis' validator: JSON Schema's own regex dialect
import pytest
import redis as sync_redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
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
from relay.models import MAX_COUNT, MAX_SIDE, SwiftChatImage
from relay.openapi import build_openapi, operations
from relay.settings import RelaySettings
from tests.helpers import FakeUpstream, openai_backend, running_agent, running_relay, running_upstream
from wire.converse import InvalidConverse, converse_request

#: No rate or stream limits (the fuzzer sends bursts), no shape limits the
#: document cannot know; the token cap is the document's own maximum (a cap of
#: 0 would also turn off the relay's type check of ``max_completion_tokens``).
NO_LIMITS = dict(rate_per_caller=0, rate_per_instance=0, rate_register_per_ip=0,
                 max_streams_per_caller=0, max_streams_per_instance=0,
                 max_messages=0, max_content_chars=0, max_tokens_cap=MAX_COUNT)

BACKENDS = ("demo", "openai")
CHAT_OPERATIONS = {"POST /api/chat/{instance_id}", "POST /api/chat/{instance_id}/chat/completions"}
IMAGE_OPERATIONS = {"POST /api/chat/{instance_id}/images/generations", "POST /v1/images/generations",
                    "POST /api/image"}
CONVERSE = "POST /api/converse"
#: Operations that reach the agent, besides the chat ones, and where they take
#: the instance from: the path, or a field of the body.
AGENT_OPERATIONS = {
    "POST /api/chat/{instance_id}/images/generations": None,
    "POST /v1/chat/completions": "model",
    "POST /v1/images/generations": "model",
    CONVERSE: "modelId",
    "POST /api/image": "modelId",
}
#: Which backends can make images (the OpenAI one in this fixture has no image model).
DRAWS = {"demo": True, "openai": False}

#: The only 5xx a relay with a working agent may answer, with their codes (README).
DOCUMENTED_SERVER_ERRORS = {
    503: {"instance_offline", "instance_at_capacity", "node_draining", "not_ready"},
    504: {"model_timeout"},
}
#: ... and on the image operations of an instance whose agents cannot draw.
NO_IMAGES = {501: {"capability_not_supported"}}


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


@functools.cache
def _validator(name: str) -> Any:
    """A validator for one of the document's schemas, with the fuzzer's own engine.

    jsonschema_rs (what schemathesis validates with) reads ``pattern`` as
    JSON Schema says, ECMA-262: ``$`` is the end of the string.  Python's
    ``jsonschema`` uses ``re.search``, where ``$`` also matches before a final
    newline, which would make ``"AAAA\\n"`` look like valid base64 here.
    """
    components = build_openapi("http://x")["components"]
    return jsonschema_rs.validator_for({"$ref": f"#/components/schemas/{name}", "components": components})


def test_the_global_bodies_are_their_validating_models():
    """The /v1 and SwiftChat bodies differ from the models that validate them only where the document says."""
    schemas = build_openapi("http://x")["components"]["schemas"]
    for documented, validating, field in (("GlobalChatRequest", "ChatRequest", "model"),
                                          ("GlobalImageRequest", "ImageRequest", "model"),
                                          ("SwiftChatImageRequest", "SwiftChatImage", "modelId")):
        ours = schemas[documented]
        theirs = SwiftChatImage.model_json_schema() if validating == "SwiftChatImage" else schemas[validating]
        assert ours["properties"].keys() == theirs["properties"].keys(), documented
        assert set(ours["required"]) == {*theirs.get("required", ()), field}, documented
        assert ours["properties"][field]["minLength"] == 1
        same = {k for k in ours["properties"] if k not in (field, "stream", "description")}
        for name in same:
            assert ours["properties"][name] == theirs["properties"][name], (documented, name)


def _converse(block: Any = None, *, role: Any = "user", **fields: Any) -> dict[str, Any]:
    content = [{"text": "hi"}] if block is None else [block]
    return {"modelId": "m", "messages": [{"role": role, "content": content}], **fields}


def _accepted(body: Any) -> bool:
    try:
        converse_request(body)
    except InvalidConverse:
        return False
    return True


def test_the_converse_schema_takes_the_base64_wire_takes():
    """Every string of up to 6 characters from a telling alphabet: the pattern and wire.converse agree."""
    validator = _validator("ConverseRequest")
    for size in range(7):
        for chars in itertools.product("A/=\n-", repeat=size):
            body = _converse({"image": {"format": "png", "source": {"bytes": "".join(chars)}}})
            assert validator.is_valid(body) == _accepted(body), body


def test_the_converse_schema_takes_the_formats_wire_takes():
    validator = _validator("ConverseRequest")
    for fmt in ("png", "PNG", "jpg", "JpEg", "jpe", "jepg", "gif", "webp", "WEBP", "tiff", "", " png", "png ",
                "svg", 5, None):
        body = _converse({"image": {"format": fmt, "source": {"bytes": "AAAA"}}})
        assert validator.is_valid(body) == _accepted(body), fmt


def _mostly(valid: st.SearchStrategy[Any], *invalid: Any) -> st.SearchStrategy[Any]:
    """``valid`` four times in five, else one of ``invalid`` (strategies or plain values)."""
    wrong = st.one_of(*(v if isinstance(v, st.SearchStrategy) else st.just(v) for v in invalid))
    return st.integers(0, 4).flatmap(lambda roll: valid if roll else wrong)


_IMAGE = st.fixed_dictionaries({
    "format": _mostly(st.sampled_from(["png", "JPG", "jpeg", "gif", "WebP"]), "bmp", "", 1, None),
    "source": _mostly(st.fixed_dictionaries({"bytes": st.sampled_from(["AAAA", "AA==", "AAA=", "AAAAAAAA"])}),
                      {"bytes": "A"}, {"bytes": ""}, {"bytes": 5}, {}, "AAAA"),
}, optional={"extra": st.just(1)})
_BLOCKS = _mostly(
    st.one_of(st.fixed_dictionaries({"text": st.text(max_size=3)}), st.fixed_dictionaries({"image": _IMAGE})),
    {"text": 5}, {"text": None}, {"image": "png"}, {}, {"text": "a", "image": {}}, {"video": {}},
    {"toolUse": {}}, {"cachePoint": {}}, "text", None)
_MESSAGES = _mostly(
    st.fixed_dictionaries({"role": _mostly(st.sampled_from(["user", "assistant"]), "system", "", "User", None),
                           "content": _mostly(st.lists(_BLOCKS, min_size=1, max_size=2), [], "hi", None)},
                          optional={"name": st.just("x")}),
    "hi", [], None)


@given(body=_mostly(
    st.fixed_dictionaries(
        {"modelId": _mostly(st.sampled_from(["m", "i/m"]), "", None, 5),
         "messages": _mostly(st.lists(_MESSAGES, min_size=1, max_size=2), [], {}, None)},
        optional={"system": _mostly(st.one_of(st.none(), st.lists(_BLOCKS, max_size=2)), "be brief", {}),
                  "region": _mostly(st.sampled_from([None, "us-west-2"]), 5, []),
                  "enableThinking": _mostly(st.sampled_from([None, True, False]), "yes", 0),
                  "other": st.integers()}),
    [], "hi", None))
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_converse_schema_is_what_wire_converse_accepts(body):
    """Text and image blocks (documents aside, which the schema leaves to its description)."""
    assert _validator("ConverseRequest").is_valid(body) == _accepted(body)


def test_the_document_says_what_a_side_may_be():
    """SwiftChatImage's width and height: the schema and the model agree, strings of digits included."""
    validator = _validator("SwiftChatImageRequest")
    values: list[Any] = [*range(-1, MAX_SIDE + 3), *map(str, range(-1, MAX_SIDE + 3)), "0001", "04096", "04097",
                         " 12", "12 ", "+12", "1_2", "\u0663", "1e3", "", 12.0, 12.5, True, None]
    for value in values:
        body = {"prompt": "p", "modelId": "m", "width": value}
        try:
            SwiftChatImage.model_validate(body)
            valid = True
        except ValidationError:
            valid = False
        assert validator.is_valid(body) == valid, value


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
    """The error's code: OpenAI's ``{"error": {"code"}}`` or SwiftChat's ``{"error": "...", "code"}``."""
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return error.get("code")
    return body.get("code") if isinstance(error, str) else None


def _content_type(response: schemathesis.Response) -> str:
    return (response.headers.get("content-type") or [""])[0]


def server_error_check(backend: str):
    """Replaces schemathesis' ``not_a_server_error``: a documented 5xx with its documented code is an answer."""

    def no_undocumented_server_error(ctx, response: schemathesis.Response, case: schemathesis.Case) -> None:
        status = response.status_code
        if status < 500:
            return
        allowed = dict(DOCUMENTED_SERVER_ERRORS)
        if case.operation.label in IMAGE_OPERATIONS and not DRAWS[backend]:
            allowed.update(NO_IMAGES)
        if _content_type(response).startswith("text/plain"):
            # /api/converse's errors are "Error: <message>" and carry no code, so
            # the status is all there is to judge.  It is enough: every code of a
            # 503 is documented, and what matters (no 500 or 502 from a working
            # agent) is a status too.
            documented = status in allowed
        else:
            documented = _error_code(response) in allowed.get(status, ())
        if not documented:
            raise AssertionError(f"{case.operation.label} answered {status}: {response.content[:500]!r}")

    return no_undocumented_server_error


def chat_stream_is_well_formed(ctx, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """A 200 event stream: chunk objects, then ``[DONE]``; a mid-stream error event is a failure too."""
    if response.status_code != 200 or not _content_type(response).startswith("text/event-stream"):
        return
    if case.operation.label == CONVERSE:
        return  # not SSE: converse_body_is_well_formed
    assert not response.stream_cut_short, "the stream was not read to its end (raise max-stream-events)"
    data = [line[6:] for line in response.content.decode().splitlines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", f"the stream does not end with [DONE]: {data[-3:]}"
    for payload in data[:-1]:
        event = json.loads(payload)
        assert "error" not in event, f"error event in a 200 stream: {payload}"
        assert event.get("object") == "chat.completion.chunk" and isinstance(event.get("choices"), list), payload


#: How SwiftChat's body ends when the answer is complete (an ``Error: ...`` ending is a failure here).
USAGE_LINE = re.compile(rb'\n\{"inputTokens": [0-9]+, "outputTokens": [0-9]+, "totalTokens": [0-9]+\}\Z')


def converse_body_is_well_formed(ctx, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """A 200 from ``/api/converse``: the answer text, then the usage line, and nothing after it."""
    if case.operation.label != CONVERSE or response.status_code != 200:
        return
    assert not response.stream_cut_short, "the answer was not read to its end"
    assert USAGE_LINE.search(response.content), f"no usage line at the end: {response.content[-300:]!r}"


CHECKS = [status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, chat_stream_is_well_formed, converse_body_is_well_formed,
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
#: Examples per operation and generation mode.  Requests that reach the agent
#: are fuzzed harder, and with every backend; chat ones hardest.
EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 15}
CHAT_EXAMPLES = {GenerationMode.POSITIVE: 150, GenerationMode.NEGATIVE: 60}
#: The other doors share the chat requests' path to the agent from admission
#: on: what is theirs is the body (and where the instance is named), which
#: needs fewer examples.
AGENT_EXAMPLES = {GenerationMode.POSITIVE: 100, GenerationMode.NEGATIVE: 50}


def _body_validator(operation) -> Any:
    """The operation's JSON body schema, as the fuzzer validates it."""
    schema = operation.definition.raw["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema_rs.validator_for({**schema, "components": build_openapi("x")["components"]})


def _fuzz(operation, live_relay: dict[str, Any], mode: GenerationMode, examples: int) -> None:
    label = operation.label
    on_agent = label in CHAT_OPERATIONS or label in AGENT_OPERATIONS
    field = AGENT_OPERATIONS.get(label)
    instance_id = live_relay["instance_id"]
    # Invalid requests are sent to the live instance (a broken id would only find a 404).
    fixed = {"path_parameters": {"instance_id": instance_id}} if on_agent and not field and mode.is_negative else {}
    checks = [server_error_check(live_relay["backend"]), *CHECKS]
    body_schema = _body_validator(operation) if field and mode.is_negative else None
    turns = itertools.count()

    @given(case=operation.as_strategy(generation_mode=mode, **fixed))
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def conforms(case):
        params = case.path_parameters or {}
        # Random ids only ever find 404s: use the live instance's id most of the time.
        if "instance_id" in params and not fixed and str(params["instance_id"])[:1] < ("x" if on_agent else "V"):
            params["instance_id"] = instance_id
        if field and isinstance(case.body, dict) and isinstance(case.body.get(field), str):
            # The same for an instance named in the body: mostly the live one, some of it with
            # the generated name as its model, the rest as generated (a 404).  Taken in turn
            # rather than by the name, since hypothesis often generates the same one.
            named = case.body[field]
            share = next(turns) % 10
            if share < 8:
                case.body[field] = instance_id if share < 6 else f"{instance_id}/{named}"
            if body_schema is not None and body_schema.is_valid(case.body):
                case.body[field] = named  # the name was what made the body invalid: keep it
        case.call_and_validate(base_url=live_relay["url"], checks=checks, timeout=30)

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
    backend = live_relay["backend"]
    for operation in all_operations:
        label = operation.label
        if label in CHAT_OPERATIONS:
            examples = CHAT_EXAMPLES
        elif label in AGENT_OPERATIONS and (label not in IMAGE_OPERATIONS or DRAWS[backend]):
            examples = AGENT_EXAMPLES
        elif backend == "demo" or label in IMAGE_OPERATIONS:
            # The rest never reaches the agent: once (with the first backend) is enough;
            # images without an agent that draws only need to show their 501 is documented.
            examples = EXAMPLES
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
