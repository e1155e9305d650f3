"""``/openapi.json``: complete, well-formed, and true — schemathesis checks the relay against it.

A relay runs in a background thread on 127.0.0.1 with a real agent connected,
once per backend the agent can run: the built-in demo model, and the OpenAI
backend talking over HTTP to the fake OpenAI-compatible model of
``tests/helpers.py``.  So a fuzzed chat request goes all the way: relay,
websocket, agent, backend (and model server), and back.

schemathesis generates requests from the relay's own document, bounded and
derandomized (the same examples every run), and checks that

* no answer is a 5xx other than a documented ``503``/``504`` (an agent or a
  model that works never justifies a ``502``), or the ``501`` of an image or
  audio request to an instance whose agent cannot draw or transcribe (the
  OpenAI backend here);
* every status, content type, header and body matches the document, and a
  chat stream is well formed to its end (chunks, then ``data: [DONE]``, no
  error event), as are SwiftChat's plain-text answer (text, then the usage
  line) and a Dify stream (``message`` events, then ``message_end``);
* what the document allows is accepted, and what it forbids is refused with
  a 4xx (for the requests that reach the agent, which is where the document,
  the relay's validators and the backends must agree);
* nothing was logged at ERROR by the relay, uvicorn or the agent, and the
  agent neither failed a request nor lost its connection.

The relay's configurable shape limits (messages, content size) are off here
and its ``max_tokens`` cap is the document's maximum, since the document
cannot know a relay's settings; rate and stream limits are off so that the
fuzzer's bursts are not throttled.

What the fuzzer cannot know, the test supplies: the live instance's id in
most paths; a caller key on the Dify routes (``/v1`` needs one), and often
the ids and ``user`` of conversations that exist, so that their answers are
checked too; an owner token and an instance of its own for ``PATCH`` and the
purge.

Audio bodies are multipart.  schemathesis sends the file as a part named
``file`` or ``file.<ext>`` (an extension only for the image and document
samples it knows) with one of the content types the document lists, which
the relay takes; every other field is text on the wire (``false``, ``5``),
so a form is judged valid or not as the relay reads it (``data_acceptance``).
It never sends a file the relay would not take as audio, nor a body that is no form: those
refusals (415, 400, 422) are requests of their own
(``test_audio_doors_answer_forms_the_fuzzer_does_not_send``).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import functools
import inspect
import itertools
import json
import logging
import re
import threading
from collections.abc import Iterator
from email.parser import BytesParser
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
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.transport.serialization import Binary
from starlette.routing import Match, Mount, Route, WebSocketRoute

from agent.demo_model import DemoBackend
from relay.app import create_app
from relay.bodies.dify import PYTHON_WHITESPACE, DifyRename
from relay.bodies.instances import UpdateInstanceRequest
from relay.bodies.openai import MAX_COUNT
from relay.bodies.swiftchat import MAX_SIDE, SwiftChatImage
from relay.doors import relay_api
from relay.doors.converse import InvalidConverse, converse_request
from relay.doors.transcription import MAX_FIELD_BYTES, MAX_FIELDS, transcription_fields
from relay.errors import ValidationFailed
from relay.routes import ENDPOINTS, build_openapi
from relay.settings import RelaySettings
from relay.store.registry import InstanceRegistry
from relay.telemetry.logs import DeliberateEndings
from relay.web import pages
from relay.web.live import MAX_IDS
from tests.helpers import FakeUpstream, openai_backend, running_agent, running_relay, running_upstream
from wire.frames import MAX_MODEL_NAME_LENGTH

pytestmark = pytest.mark.slow

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
#: The Dify chat-app API's two bases.
DIFY_BASES = ("/api/chat/{instance_id}", "/v1")
DIFY_TURNS = {f"POST {base}/chat-messages" for base in DIFY_BASES}
TRANSCRIBE_OPERATIONS = {"POST /api/chat/{instance_id}/audio/transcriptions", "POST /v1/audio/transcriptions",
                         *(f"POST {base}/audio-to-text" for base in DIFY_BASES)}
#: Operations that reach the agent, besides the chat ones, and where they take
#: the instance from: the path, or a field of the body (None: the path, or on
#: the Dify API at /v1 the caller key).
AGENT_OPERATIONS = {
    "POST /api/chat/{instance_id}/images/generations": None,
    "POST /v1/chat/completions": "model",
    "POST /v1/images/generations": "model",
    CONVERSE: "modelId",
    "POST /api/image": "modelId",
    "POST /api/chat/{instance_id}/audio/transcriptions": None,
    "POST /v1/audio/transcriptions": "model",
    **dict.fromkeys(DIFY_TURNS),
    **{f"POST {base}/audio-to-text": None for base in DIFY_BASES},
}
#: Owner actions fuzzed with an owner token, on an instance of their own (the live one must keep its settings).
OWNER_OPERATIONS = {"PATCH /api/instances/{instance_id}", "DELETE /api/instances/{instance_id}/conversations",
                    "GET /api/instances/{instance_id}/settings"}
#: The live status stream never ends (its events come while an instance changes): no fuzzer call
#: would return.  tests/test_dashboard.py reads it as a stream, refusals (422, 429, 503) included.
NOT_FUZZED = {"GET /api/instances/events"}
#: Which backends can make images and transcribe (the OpenAI one in this fixture serves neither).
DRAWS = {"demo": True, "openai": False}
HEARS = {"demo": True, "openai": False}
#: The end user of the conversations the fixture starts.
KNOWN_USER = "fuzz-user"

#: The only 5xx a relay with a working agent may answer, with their codes (README).
DOCUMENTED_SERVER_ERRORS = {
    503: {"instance_offline", "instance_at_capacity", "node_draining", "not_ready"},
    504: {"model_timeout"},
}
#: ... and on the image (transcription) operations of an instance whose agents cannot draw (hear).
NO_CAPABILITY = {501: {"capability_not_supported"}}


def _dify_route(label: str) -> tuple[str, str] | None:
    """(base, route) of a Dify API operation, such as ("/v1", "/chat-messages"); None for any other."""
    path = label.split(" ", 1)[1]
    for base in DIFY_BASES:
        route = path[len(base):]
        if path.startswith(base) and route[1:].split("/", 1)[0] in (
                "chat-messages", "messages", "conversations", "parameters", "audio-to-text"):
            return base, route
    return None


def _lacks_capability(label: str, backend: str) -> bool:
    return (label in IMAGE_OPERATIONS and not DRAWS[backend]) or (label in TRANSCRIBE_OPERATIONS
                                                                   and not HEARS[backend])


def _page_path(route: Any) -> str:
    """A route's path as ``x-pages`` names it (a mount of files: ``/static/{path}``)."""
    return f"{route.path}/{{path}}" if isinstance(route, Mount) else route.path


def test_every_route_is_in_the_table_and_documented():
    """The app serves the route table (relay.routes), all of it and nothing else, and the document says it.

    Besides: every documented operation is answered by its own route, not by an earlier one whose path
    matches too (Starlette takes the first: ``/api/instances/events`` before ``/api/instances/{instance_id}``),
    and names its path's parameters.  The agent websocket is under x-websockets; the dashboard's pages are
    HTML for browsers, not API operations (and not there at all with RELAY_DASHBOARD=false, while the
    document stays the same): x-pages names them, the fuzzer leaves them alone, and tests/test_dashboard.py
    checks what they serve.
    """
    document = build_openapi("http://x")
    documented, websockets, page_paths = document["paths"], document["x-websockets"], document["x-pages"]
    assert {_page_path(route) for route in pages.routes()} == set(page_paths)
    table = {(endpoint.path, method.upper()) for endpoint in ENDPOINTS for method in endpoint.operations()}
    for dashboard in (True, False):
        app = create_app(RelaySettings(dashboard=dashboard), redis_url="redis://127.0.0.1:1")  # routes only
        served = set()
        for route in app.routes:
            if isinstance(route, WebSocketRoute):
                assert route.path in websockets
            elif _page_path(route) in page_paths:
                assert dashboard, f"{route.path} is served with RELAY_DASHBOARD=false"
            else:
                assert isinstance(route, Route)
                for method in route.methods - {"HEAD"}:
                    assert (route.path, method) in table, f"{method} {route.path} is served but not in relay.routes"
                    assert method.lower() in documented.get(route.path, {}), f"{method} {route.path} is undocumented"
                    served.add((route.path, method))
        assert served == table, f"in relay.routes but not served: {table - served}"
        for path, methods in documented.items():
            request_path = re.sub(r"\{\w+\}", "x", path)
            for method, operation in methods.items():
                scope = {"type": "http", "method": method.upper(), "path": request_path, "root_path": ""}
                answering = next(r for r in app.routes if r.matches(scope)[0] == Match.FULL)
                assert answering.path == path, f"{method.upper()} {path} is answered by {answering.path}"
                named = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
                assert named == set(re.findall(r"\{(\w+)\}", path)), f"{method.upper()} {path}: {named}"


def test_the_status_stream_and_the_search_are_documented_as_the_relay_reads_them():
    """The numbers the words of the document state, and the ``ids`` pattern at its bounds."""
    doc = build_openapi("http://x")
    events = doc["paths"]["/api/instances/events"]["get"]
    assert set(events["responses"]["200"]["content"]) == {"text/event-stream"}
    assert f"every {relay_api.KEEPALIVE_SECONDS:g} s" in events["description"]
    (ids,) = events["parameters"]
    assert ids["required"] and f"1 to {MAX_IDS}" in ids["description"]
    pattern = jsonschema_rs.validator_for(ids["schema"])
    one = "0123456789abcdef"
    assert pattern.is_valid(one) and pattern.is_valid(",".join([one] * MAX_IDS))
    for refused in ("", ",".join([one] * (MAX_IDS + 1)), one.upper(), one[:-1], one + "0", f"{one},", f" {one}"):
        assert not pattern.is_valid(refused), refused
    listing = doc["paths"]["/api/instances"]["get"]
    (q,) = [p for p in listing["parameters"] if p["name"] == "q"]
    assert q["schema"]["maxLength"] == relay_api.MAX_QUERY_CHARS
    scan_limit = inspect.signature(InstanceRegistry.list).parameters["scan_limit"].default
    assert f"at most {scan_limit} instances" in listing["description"]


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
    """Every string of up to 6 characters from a telling alphabet: the pattern and relay.doors.converse agree."""
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


def _seldom_wrong(valid: st.SearchStrategy[Any], *invalid: Any) -> st.SearchStrategy[Any]:
    """``valid`` nine times in ten, else one of ``invalid``: a body of many fields then often has one fault."""
    wrong = st.one_of(*(v if isinstance(v, st.SearchStrategy) else st.just(v) for v in invalid))
    return st.integers(0, 9).flatmap(lambda roll: valid if roll else wrong)


_KEYS = _seldom_wrong(st.sampled_from(["a", "B_1", "_x", "city"]), "", "1a", "a-b", "a\n", "x" * 65, 5, None)
_VARIABLE = _seldom_wrong(st.fixed_dictionaries(
    {"key": _KEYS},
    optional={
        "name": _seldom_wrong(st.text(max_size=3), "x" * 101, None, 5),
        "description": _seldom_wrong(st.one_of(st.none(), st.text(max_size=3)), "x" * 1001, 5),
        "type": _seldom_wrong(st.sampled_from(["string", "paragraph", "select", "number"]), "text", "", None),
        "default": _seldom_wrong(st.one_of(st.none(), st.text(max_size=2), st.integers(),
                                     st.floats(allow_nan=False, allow_infinity=False)), True, False, [], {}),
        "options": _seldom_wrong(st.one_of(st.none(), st.lists(st.text(max_size=2), max_size=3)),
                           [1], [None], "a", [""] * 101),
        "required": _seldom_wrong(st.booleans(), "true", "yes", 1, 0, None),
        "max_length": _seldom_wrong(st.one_of(st.none(), st.integers(1, 100_000), st.sampled_from([5.0, 1e5])),
                              0, 100_001, "5", 5.5, True, -1),
    }), {"key": "a", "other": 1}, "a", [], None)


@given(body=_seldom_wrong(st.fixed_dictionaries({}, optional={
    "name": _seldom_wrong(st.one_of(st.none(), st.text(min_size=1, max_size=3)), "", "x" * 101, 5),
    "description": _seldom_wrong(st.one_of(st.none(), st.text(max_size=3)), "x" * 1001, 5),
    "visibility": _seldom_wrong(st.sampled_from([None, "public", "private"]), "secret", 1),
    "introduction": _seldom_wrong(st.one_of(st.none(), st.text(max_size=3)), "x" * 4001, 5),
    "variables": _seldom_wrong(st.one_of(st.none(), st.lists(_VARIABLE, max_size=3)), "x", {}, [None] * 51),
    "conversations": _seldom_wrong(st.sampled_from([None, True, False]), "true", "off", 1, 0),
}), {"name": "n", "other": 1}, [], "name", None))
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_patch_schema_is_what_the_relay_accepts(body):
    """``PATCH /api/instances/{id}``: the schema and UpdateInstanceRequest agree, but on repeated keys.

    That one rule no JSON Schema can state (the operation's description says it).
    """
    variables = body.get("variables") if isinstance(body, dict) else None
    keys = [v.get("key") for v in variables if isinstance(v, dict)] if isinstance(variables, list) else []
    repeated = len(keys) != len({repr(k) for k in keys})
    try:
        UpdateInstanceRequest.model_validate(body)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == (_validator("UpdateInstanceRequest").is_valid(body) and not repeated), body


def test_the_document_says_what_a_conversation_name_may_be():
    """Not only whitespace (as ``str.split`` counts it: the store makes each run one space), at most 256 long."""
    assert all(bool(re.fullmatch(f"[{PYTHON_WHITESPACE}]", chr(c))) == chr(c).isspace() for c in range(0x110000))
    validator = _validator("DifyRename")
    names: list[Any] = ["a", " a ", "a b", "\ufeff", "\u200b", "x" * 256, "x" * 257, " " * 300 + "x", "", None, 5,
                        *(chr(c) for c in range(0x3001) if chr(c).isspace()), "\x1f\x1c a"]
    for name in names:
        body = {"user": "u", "name": name}
        try:
            DifyRename.model_validate(body)
            accepted = True
        except ValidationError:
            accepted = False
        assert validator.is_valid(body) == accepted, repr(name)


def test_the_transcription_fields_are_what_audio_py_accepts():
    """Each text field of the form: valid (as text, or as the number the text spells) iff the relay takes it.

    Python's ``float`` reads more than JSON numbers (``+0.5``, ``0_5``, Arabic-Indic
    digits ...): the relay reads JSON numbers only, so those are refused by both.
    """
    form = build_openapi("x")["paths"]["/api/chat/{instance_id}/audio/transcriptions"]["post"]["requestBody"]
    schema = form["content"]["multipart/form-data"]["schema"]
    lenient: set[tuple[str, str]] = set()  # none any more: the relay reads what the document says
    strict = ["+0.5", "0.0_1", "\u0661"]
    values = {
        "model": ["", "whisper-1", "m" * MAX_MODEL_NAME_LENGTH, "m" * (MAX_MODEL_NAME_LENGTH + 1)],
        "language": ["", "en", "x" * 32, "x" * 33],
        "response_format": ["", "json", "text", "srt", "verbose_json", "vtt", "JSON", "mp3"],
        "temperature": ["", "0", "1", "0.5", "1e-1", " 0.5 ", "1.5", "-0.1", "abc", "nan", "Infinity", "true",
                        "null", "[]", *strict],
        "prompt": ["", "hi"],
    }
    for name, texts in values.items():
        validator = jsonschema_rs.validator_for({**schema["properties"][name]})
        for text in texts:
            readings: list[Any] = [text]
            with contextlib.suppress(ValueError):
                readings.append(json.loads(text))
            documented = any(validator.is_valid(reading) for reading in readings)
            try:
                transcription_fields({name: text})
                accepted = True
            except ValidationFailed:
                accepted = False
            assert accepted == (documented or (name, text) in lenient), (name, text)
            if (name, text) in lenient:
                assert accepted and not documented, (name, text)


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
                info.update(await _dify_fixtures(relay, instance_id, token))
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


async def _dify_fixtures(relay: Any, instance_id: str, token: str) -> dict[str, Any]:
    """A caller key of the live instance, a conversation of each kind of caller, an instance for owner actions."""
    async with relay.client() as client:
        created = await client.post(f"/api/instances/{instance_id}/keys", json={"name": "fuzz"},
                                    headers={"Authorization": f"Bearer {token}"})
        created.raise_for_status()
        key = created.json()["key"]
        known = {}
        for who, url, headers in (("key", "/v1", {"Authorization": f"Bearer {key}"}),
                                  ("anon", f"/api/chat/{instance_id}", {})):
            answer = await client.post(f"{url}/chat-messages", json={"query": "hello", "user": KNOWN_USER},
                                       headers=headers)
            answer.raise_for_status()
            known[who] = (answer.json()["conversation_id"], answer.json()["message_id"])
    owned_id, owned_token = await relay.register("fuzzed-owner-actions")
    return {"key": key, "known": known, "owned": (owned_id, owned_token)}


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
        if _lacks_capability(case.operation.label, backend):
            allowed.update(NO_CAPABILITY)
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
    if case.operation.label in DIFY_TURNS:
        _dify_stream_is_well_formed(data)
        return
    assert data and data[-1] == "[DONE]", f"the stream does not end with [DONE]: {data[-3:]}"
    for payload in data[:-1]:
        event = json.loads(payload)
        assert "error" not in event, f"error event in a 200 stream: {payload}"
        assert event.get("object") == "chat.completion.chunk" and isinstance(event.get("choices"), list), payload


def _dify_stream_is_well_formed(data: list[str]) -> None:
    """Dify's events: ``message`` pieces of one turn, then ``message_end``; no error event, no ``[DONE]``.

    A 200 stream ends with an ``error`` event only when the model fails or goes
    silent after its first piece, which a working agent does not.
    """
    assert data, "an empty Dify stream"
    events = [json.loads(payload) for payload in data]
    assert all(isinstance(event, dict) for event in events), data[:3]
    kinds = [event.get("event") for event in events]
    assert "error" not in kinds, f"error event in a 200 stream: {data[kinds.index('error')]}"
    assert kinds[-1] == "message_end" and set(kinds[:-1]) <= {"message"}, f"not message... message_end: {kinds}"
    turns = {(event["conversation_id"], event["message_id"], event["task_id"], event["id"]) for event in events}
    assert len(turns) == 1, f"events of more than one turn: {turns}"
    assert all(isinstance(event["answer"], str) and event["answer"] for event in events[:-1]), data[:-1]


#: How SwiftChat's body ends when the answer is complete (an ``Error: ...`` ending is a failure here).
USAGE_LINE = re.compile(rb'\n\{"inputTokens": [0-9]+, "outputTokens": [0-9]+, "totalTokens": [0-9]+\}\Z')


def converse_body_is_well_formed(ctx, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """A 200 from ``/api/converse``: the answer text, then the usage line, and nothing after it."""
    if case.operation.label != CONVERSE or response.status_code != 200:
        return
    assert not response.stream_cut_short, "the answer was not read to its end"
    assert USAGE_LINE.search(response.content), f"no usage line at the end: {response.content[-300:]!r}"


def _sent_form(response: schemathesis.Response) -> list[tuple[str, str, bool]]:
    """The parts of the multipart body sent: (name, text, whether it is a file)."""
    head = f"Content-Type: {response.request.headers.get('Content-Type', '')}\r\n\r\n".encode()
    body = response.request.body
    message = BytesParser(policy=email.policy.HTTP).parsebytes(head + (body.encode() if isinstance(body, str)
                                                                      else body or b""))
    parts = []
    for part in message.iter_parts():
        payload = bytes(part.get_payload(decode=True) or b"")
        name = str(part.get_param("name", header="content-disposition"))
        parts.append((name, payload.decode(errors="replace"), part.get_filename() is not None))
    return parts


def _form_is_valid_as_sent(response: schemathesis.Response, case: schemathesis.Case) -> bool:
    """Whether a multipart body, read as the relay reads it (text, or text that parses as a number), is valid.

    Every field of a form is text on the wire: a "negative" boolean ``false``
    arrives as the text ``false``, which a string field takes.  schemathesis
    judges forms as sent too, but not one with a file part (it keeps the
    generated bytes, which no JSON Schema validator reads).
    """
    validator = _body_validator(case.operation)
    parts = _sent_form(response)
    if sum(not is_file for _, _, is_file in parts) > MAX_FIELDS or sum(is_file for _, _, is_file in parts) > 1:
        return False  # past python-multipart's bounds, which the document states in words
    form: dict[str, Any] = {}
    for name, text, is_file in parts:
        if name in form:
            continue  # a field sent twice: the relay reads the first
        if is_file:
            form[name] = text[:1]  # empty or not: what else its bytes are is the relay's to judge (415)
            continue
        readings: list[Any] = [text]
        with contextlib.suppress(ValueError):
            readings.append(json.loads(text))
        form[name] = next((reading for reading in readings
                           if not any(error.instance_path[:1] == [name]
                                      for error in validator.iter_errors({**form, name: reading}))), text)
    return validator.is_valid(form)


#: What a valid request may meet (random ids, no credentials; 5xx are judged by
#: ``no_undocumented_server_error``), and an invalid one.  415: a negative audio
#: file (a part that is no audio) is refused as one.
ACCEPTED = ["2xx", "401", "403", "404", "5xx"]
REFUSED = ["400", "401", "403", "404", "413", "415", "422", "5xx"]


def _one_of(status: int, expected: list[str]) -> bool:
    return any(str(status) == code or (code.endswith("xx") and str(status)[0] == code[0]) for code in expected)


def data_acceptance(ctx, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """schemathesis' ``positive_data_acceptance`` and ``negative_data_rejection``; a form judged as sent.

    A multipart case's generation metadata cannot be trusted either way: a
    negative field may be valid text on the wire, and a body holding a file is
    negative to schemathesis' own revalidation once the test has edited it
    (it cannot validate the file's bytes).  So such a case is valid when its
    form, read as the relay reads it, is valid and nothing else is negated.
    """
    if not (case.media_type or "").startswith("multipart/"):
        positive_data_acceptance(ctx, response, case)
        negative_data_rejection(ctx, response, case)
        return
    meta = case.meta
    elsewhere = meta is not None and any(meta.is_negative_at(location) for location in (
        ParameterLocation.PATH, ParameterLocation.QUERY, ParameterLocation.HEADER, ParameterLocation.COOKIE))
    valid = not elsewhere and _form_is_valid_as_sent(response, case)
    expected = ACCEPTED if valid else REFUSED
    assert _one_of(response.status_code, expected), (
        f"{case.operation.label}: a {'valid' if valid else 'invalid'} form answered {response.status_code}, "
        f"expected {', '.join(expected)}: {response.content[:300]!r}; sent {_sent_form(response)!r:.500}")


CHECKS = [status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, chat_stream_is_well_formed, converse_body_is_well_formed, data_acceptance]
#: Streams are read to their end (schemathesis reads 20 events by default).
CONFIG = {
    "max-stream-events": 10_000,
    "checks": {
        "positive_data_acceptance": {"expected-statuses": ACCEPTED},
        "negative_data_rejection": {"expected-statuses": REFUSED},
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
#: Dify turns and transcriptions: the agent's part is the chat (or transcribe)
#: operation fuzzed above; theirs is the body and the conversation store.
TURN_EXAMPLES = {GenerationMode.POSITIVE: 50, GenerationMode.NEGATIVE: 25}


def _wire_json(value: Any) -> Any:
    """A generated body as JSON: a multipart file (bytes) as a one-character string, for schema checks."""
    if isinstance(value, dict):
        return {k: _wire_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_wire_json(v) for v in value]
    return "x" if isinstance(value, (bytes, Binary)) else value


def _body_validator(operation) -> Any:
    """The operation's body schema (JSON or multipart), as the fuzzer validates it."""
    return _body_validator_of(operation.label)


@functools.cache
def _body_validator_of(label: str) -> Any:
    method, path = label.split(" ", 1)
    document = build_openapi("x")
    content = document["paths"][path][method.lower()]["requestBody"]["content"]
    schema = next(iter(content.values()))["schema"]
    return jsonschema_rs.validator_for({**schema, "components": document["components"]})


class Rewrites:
    """What the fuzzer cannot know, put into its cases: ids that exist, credentials.

    Each rewrite takes the generated value's place in some of the cases, in
    turn (hypothesis often generates the same value, so shares by value would
    be lopsided).  Ids and users are only rewritten in positive cases: a
    negative one may be negative by the very value replaced.  A case's mode
    is its own, not the one it was drawn in: a case drawn in negative mode
    with nothing negated in it is a positive one.
    """

    def __init__(self, live_relay: dict[str, Any], label: str):
        self.live, self.label = live_relay, label
        self.dify = _dify_route(label)
        self.turns = itertools.count()

    def share(self, tenths: int) -> bool:
        return next(self.turns) % 10 < tenths

    def credential(self, case: schemathesis.Case, token: str) -> bool:
        """Send ``token``, unless the case is negative by a credential schemathesis made (then it stays)."""
        if case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER):
            return False
        case.headers["Authorization"] = f"Bearer {token}"
        return True

    def apply(self, case: schemathesis.Case) -> None:
        positive = case.meta is None or case.meta.generation.mode.is_positive
        if self.label in OWNER_OPERATIONS:
            owned_id, owned_token = self.live["owned"]
            if self.share(8) and self.credential(case, owned_token):
                case.path_parameters["instance_id"] = owned_id
                if positive and isinstance(case.body, dict):
                    _unique_variable_keys(case.body)
            return
        if self.dify is None:
            return
        base, route = self.dify
        # /v1 needs the key (without it: 401 api_key_required); per instance, anonymous callers too.
        keyed = self.share(9 if base == "/v1" else 5) and self.credential(case, self.live["key"])
        if not keyed and base == "/v1":
            return
        if positive:
            self._known_ids(case, route, "key" if keyed else "anon")

    def _known_ids(self, case: schemathesis.Case, route: str, who: str) -> None:
        """A conversation and message of this caller and ``KNOWN_USER``, in more than half the cases."""
        conversation_id, message_id = self.live["known"][who]
        body = case.body if isinstance(case.body, dict) else None
        query, path = case.query, case.path_parameters
        method = self.label.split(" ", 1)[0]
        if route == "/conversations/{conversation_id}":
            if not (body and body.get("user")) and not query.get("user"):
                query["user"] = KNOWN_USER  # the document: one of them (no schema ties the body to the query)
            if self.share(3):
                path["conversation_id"] = self._new_conversation(who)
                query["user"] = KNOWN_USER
                if body and body.get("user"):
                    body["user"] = KNOWN_USER
            return
        if route == "/chat-messages" and body is not None and self.share(5):
            body["response_mode"] = "streaming"  # left to the fuzzer, it is mostly left out: blocking
        if not self.share(6) or (method == "POST" and body is None):
            return
        if route == "/chat-messages":
            if self.share(5):
                body.pop("conversation_id", None)  # a new conversation
            else:
                body.update(conversation_id=conversation_id, user=KNOWN_USER)
        elif route in ("/conversations/{conversation_id}/name", "/messages/{message_id}/feedbacks"):
            body["user"] = KNOWN_USER
            path.update(conversation_id=conversation_id) if "conversation_id" in path else path.update(
                message_id=message_id)
        elif route in ("/messages", "/conversations"):
            query["user"] = KNOWN_USER
            if route == "/messages":
                query["conversation_id"] = conversation_id
            for name, value in (("first_id", message_id), ("last_id", conversation_id)):
                if query.get(name):
                    query[name] = value

    def _new_conversation(self, who: str) -> str:
        """A conversation to delete."""
        if who == "key":
            url, headers = f"{self.live['url']}/v1", {"Authorization": f"Bearer {self.live['key']}"}
        else:
            url, headers = f"{self.live['url']}/api/chat/{self.live['instance_id']}", {}
        answer = httpx.post(f"{url}/chat-messages", json={"query": "to delete", "user": KNOWN_USER},
                            headers=headers, timeout=30)
        answer.raise_for_status()
        return str(answer.json()["conversation_id"])


def _unique_variable_keys(body: dict[str, Any]) -> None:
    """PATCH's one rule the schema cannot state (its description does): each variable's key once."""
    variables = body.get("variables")
    if isinstance(variables, list):
        seen: set[Any] = set()
        body["variables"] = [v for v in variables
                             if not (isinstance(v, dict) and (v.get("key") in seen or seen.add(v.get("key"))))]


def _fuzz(operation, live_relay: dict[str, Any], mode: GenerationMode, examples: int) -> None:
    label = operation.label
    on_agent = label in CHAT_OPERATIONS or label in AGENT_OPERATIONS
    field = AGENT_OPERATIONS.get(label)
    instance_id = live_relay["instance_id"]
    in_path = "{instance_id}" in label
    # Invalid requests are sent to the live instance (a broken id would only find a 404).
    fixed = ({"path_parameters": {"instance_id": instance_id}}
             if on_agent and in_path and not field and mode.is_negative else {})
    checks = [server_error_check(live_relay["backend"]), *CHECKS]
    body_schema = _body_validator(operation) if field and mode.is_negative else None
    turns = itertools.count()
    rewrites = Rewrites(live_relay, label)
    # Random ids only ever find 404s: use the live instance's id most of the time (the Dify API's too).
    live_share = "x" if on_agent or _dify_route(label) else "V"

    @given(case=operation.as_strategy(generation_mode=mode, **fixed))
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def conforms(case):
        params = case.path_parameters or {}
        if "instance_id" in params and not fixed and str(params["instance_id"])[:1] < live_share:
            params["instance_id"] = instance_id
        if field and isinstance(case.body, dict) and isinstance(case.body.get(field), str):
            # The same for an instance named in the body: mostly the live one, some of it with
            # the generated name as its model, the rest as generated (a 404).  Taken in turn
            # rather than by the name, since hypothesis often generates the same one.
            named = case.body[field]
            share = next(turns) % 10
            if share < 8:
                case.body[field] = instance_id if share < 6 else f"{instance_id}/{named}"
            if body_schema is not None and body_schema.is_valid(_wire_json(case.body)):
                case.body[field] = named  # the name was what made the body invalid: keep it
        rewrites.apply(case)
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
        if label in NOT_FUZZED:
            continue
        capable = not _lacks_capability(label, backend)
        if label in CHAT_OPERATIONS:
            examples = CHAT_EXAMPLES
        elif label in AGENT_OPERATIONS and capable:
            examples = TURN_EXAMPLES if label in DIFY_TURNS | TRANSCRIBE_OPERATIONS else AGENT_EXAMPLES
        elif backend == "demo" or not capable:
            # The rest never reaches the agent: once (with the first backend) is enough;
            # operations without an agent that can run them only need to show their 501 is documented.
            examples = EXAMPLES
        else:
            continue
        for mode, count in examples.items():
            if backend != BACKENDS[0]:
                # Derandomized, so the same inputs as the first backend's run, against
                # another agent backend: the first half of them is enough for that.
                count = max(count // 2, 10)
            takes_input = {"parameters", "requestBody"} & operation.definition.raw.keys()
            if mode.is_positive or takes_input:  # nothing to get wrong in GET /healthz
                _fuzz(operation, live_relay, mode, count)


#: What schemathesis does not send an audio door: bodies that are no multipart form,
#: files that are no audio, forms past their bounds (and one file it does not
#: name as audio, taken by its content type).  (status, code) per request.
WAV = (b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00@\x1f\x00\x00\x80>\x00\x00\x02\x00\x10\x00"
       b"data\x00\x00\x00\x00")
AUDIO_REFUSALS: list[tuple[str, dict[str, Any], int, str | None]] = [
    ("JSON", {"json": {"file": "x"}}, 415, "multipart_required"),
    ("no content type", {"content": b"RIFF"}, 415, "multipart_required"),
    ("urlencoded", {"data": {"file": "x"}}, 422, "invalid_parameter"),
    ("no boundary", {"content": b"--x\r\n\r\n--x--\r\n", "headers": {"Content-Type": "multipart/form-data"}},
     400, "invalid_request"),
    ("not multipart inside", {"content": b"just bytes",
                              "headers": {"Content-Type": "multipart/form-data; boundary=zz"}}, 400, "invalid_request"),
    ("no file", {"files": {"model": (None, "m")}}, 422, "invalid_parameter"),
    ("empty file", {"files": {"file": ("a.wav", b"", "audio/wav")}}, 422, "invalid_parameter"),
    ("text file", {"files": {"file": ("notes.txt", b"hello", "text/plain")}}, 415, "unsupported_file_format"),
    ("neither name nor type", {"files": {"file": ("audio", WAV, "application/octet-stream")}},
     415, "unsupported_file_format"),
    ("a named type", {"files": {"file": ("audio", WAV, "audio/x-wav")}}, 200, None),
    ("two files", {"files": [("file", ("a.wav", WAV, "audio/wav")), ("file", ("b.wav", WAV, "audio/wav"))]},
     400, "invalid_request"),
    ("too many fields", {"files": [("file", ("a.wav", WAV, "audio/wav")),
                                   *((f"f{i}", (None, "x")) for i in range(MAX_FIELDS + 1))]}, 400, "invalid_request"),
    ("a field too long", {"files": {"file": ("a.wav", WAV, "audio/wav"), "prompt": (None, "é" * MAX_FIELD_BYTES)}},
     400, "invalid_request"),
    ("a bad format", {"files": {"file": ("a.wav", WAV, "audio/wav"), "response_format": (None, "mp3")}},
     422, "invalid_parameter"),
    ("too warm", {"files": {"file": ("a.wav", WAV, "audio/wav"), "temperature": (None, "1.5")}},
     422, "invalid_parameter"),
]


@pytest.mark.parametrize("name, request_kwargs, status, code", AUDIO_REFUSALS, ids=[r[0] for r in AUDIO_REFUSALS])
def test_audio_doors_answer_forms_the_fuzzer_does_not_send(live_relay, name, request_kwargs, status, code):
    """Every audio door refuses what is no audio form with a documented 4xx, before any agent is asked.

    413 is left to ``test_uploads`` (it takes a body of RELAY_MAX_UPLOAD_BYTES).
    """
    if live_relay["backend"] != "demo":
        pytest.skip("refused before the agent: one backend is enough")
    document = build_openapi("x")
    paths = {"/api/chat/{instance_id}/audio/transcriptions": {},
             "/v1/audio/transcriptions": {"model": live_relay["instance_id"]},
             "/api/chat/{instance_id}/audio-to-text": {},
             "/v1/audio-to-text": {"Authorization": f"Bearer {live_relay['key']}"}}
    for path, extra in paths.items():
        kwargs = {**request_kwargs, "headers": {**request_kwargs.get("headers", {})}}
        if "Authorization" in extra:
            kwargs["headers"]["Authorization"] = extra["Authorization"]
        elif "model" in extra and "files" in kwargs:
            files = kwargs["files"]
            parts = list(files.items() if isinstance(files, dict) else files)
            kwargs["files"] = [*parts, ("model", (None, extra["model"]))]
        if path.endswith("/audio-to-text") and name in ("a bad format", "too warm"):
            continue  # Dify's form has no such fields: they are ignored
        url = live_relay["url"] + path.replace("{instance_id}", live_relay["instance_id"])
        response = httpx.post(url, timeout=30, **kwargs)
        assert response.status_code == status, (path, response.status_code, response.text)
        assert str(status) in document["paths"][path]["post"]["responses"], (path, status)
        answer = "ErrorResponse" if status >= 400 else "Transcription"
        assert _validator(answer).is_valid(response.json()), response.text
        if code is not None:
            assert response.json()["error"]["code"] == code, (path, response.text)


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
