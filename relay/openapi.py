"""The relay's OpenAPI 3.1 document, served at ``GET /openapi.json``.

Schemas come from the pydantic models in :mod:`relay.bodies` (the same models
that validate requests), so the document cannot drift from what the relay
accepts.  Where a door checks more than its model before validating (the
global doors read the instance out of ``model``/``modelId`` first), the
document's schema is a subclass of the model that says so; ``/api/converse``
is checked by ``relay.doors.converse``, which ``ConverseRequest`` describes; and
the bodies read by hand have hand-written schemas: ``/api/upgrade``'s, the
Dify ``DELETE …/conversations/{id}`` body, and the audio doors' multipart
forms (from ``audio.py``'s own bounds).  The few bodies ``api.py`` builds as
dicts (``GET /api/relay``, an owner's settings, the live status events) are
described by the models of this module, which ``tests/test_dashboard.py``
holds the answers to.
Operations are a table below: one entry per route, with the statuses it can
answer.  ``tests/test_openapi.py`` checks that every route of
the app is described here and runs schemathesis against the document.

The agent websocket (``GET /api/agent/connect``) is not an HTTP operation; it
is described under the ``x-websockets`` extension so that HTTP tools and
fuzzers leave it alone; the web dashboard's pages (HTML for browsers, and
absent when ``RELAY_DASHBOARD=false``) under ``x-pages``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from relay import __version__
from relay.bodies.dify import (
    ConversationsPurged,
    DifyAnswer,
    DifyChatRequest,
    DifyConversationPage,
    DifyErrorEvent,
    DifyFeedback,
    DifyMessageEndEvent,
    DifyMessageEvent,
    DifyMessagePage,
    DifyParameters,
    DifyRename,
    DifyRenamed,
    DifyResult,
    DifyUser,
)
from relay.bodies.instances import (
    CallerKey,
    CallerKeyCreated,
    CallerKeyList,
    CreateKeyRequest,
    Health,
    InstanceDeleted,
    InstancePage,
    InstanceSettings,
    InstanceView,
    Ready,
    Registered,
    RegisterRequest,
    RelayInfo,
    TokenRotated,
    UpdateInstanceRequest,
)
from relay.bodies.openai import (
    ChatCompletion,
    ChatRequest,
    ErrorResponse,
    GlobalChatRequest,
    GlobalImageRequest,
    ImageRequest,
    ImagesResponse,
    ModelList,
    ModelPage,
    Transcription,
)
from relay.bodies.swiftchat import (
    ConverseRequest,
    SwiftChatError,
    SwiftChatImageRequest,
    SwiftChatImageResponse,
    SwiftChatModels,
    UpgradeInfo,
)
from relay.doors.dify import PAGE_DEFAULT, PAGE_MAX
from relay.doors.relay_api import KEEPALIVE_SECONDS, MAX_QUERY_CHARS
from relay.doors.transcription import (
    AUDIO_EXTENSIONS,
    AUDIO_TYPES,
    MAX_FIELD_BYTES,
    MAX_FIELDS,
    MAX_LANGUAGE,
    RESPONSE_FORMATS,
)
from relay.web.live import MAX_IDS
from wire.frames import MAX_MODEL_NAME_LENGTH

REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    RegisterRequest, UpdateInstanceRequest, CreateKeyRequest, ChatRequest, GlobalChatRequest, ImageRequest,
    GlobalImageRequest, ConverseRequest, SwiftChatImageRequest, DifyChatRequest, DifyRename, DifyFeedback,
)
RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    Registered, InstanceView, InstancePage, TokenRotated, CallerKey, CallerKeyCreated, CallerKeyList,
    ChatCompletion, ModelList, ModelPage, ImagesResponse, ErrorResponse, Health, Ready,
    SwiftChatModels, SwiftChatImageResponse, SwiftChatError, UpgradeInfo, DifyAnswer, DifyMessageEvent,
    DifyMessageEndEvent, DifyErrorEvent, DifyMessagePage, DifyConversationPage, DifyRenamed, DifyResult,
    DifyParameters, ConversationsPurged, Transcription, RelayInfo, InstanceSettings, InstanceDeleted,
)

ERROR_MEANING = {
    400: "Malformed request (body is not JSON, or a credential was put in the URL)",
    401: "Credential missing or unknown",
    403: "Credential valid but not for this",
    404: "Instance (or key) not found; on the global doors (/v1 and SwiftChat's) also model_not_found: "
         "`model`/`modelId` names no instance, or (/v1) a model its agents do not serve",
    413: "Request body too large",
    415: "The body is not multipart/form-data (multipart_required), or its file is not one of the audio "
         "formats (unsupported_file_format)",
    422: "Invalid parameters, or a request limit exceeded (the error names the field)",
    429: "Rate or concurrency limit reached; see Retry-After",
    501: "No connected agent of the instance can run this operation (capability_not_supported), "
         "such as image generation when none declared images",
    502: "The agent or its model failed",
    503: "Instance offline or at capacity, or relay storage unavailable; see Retry-After",
    504: "The model sent nothing in time",
}

ID_PATTERN = "^[A-Za-z0-9_-]{1,64}$"

#: One Server-Sent Event of a chat stream (WHATWG HTML s9.2): ``data`` is a
#: ``chat.completion.chunk`` JSON object, an ``{"error": ...}`` object, or the
#: final ``[DONE]``.
SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string", "description": "chat.completion.chunk JSON, an error object, or [DONE]"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}


#: One Server-Sent Event of a live status stream (``GET /api/instances/events``).
STATUS_EVENT = {
    "type": "object",
    "description": "``retry: 2000`` first (no data); then ``event: instance`` (``data``: the InstanceView, as GET "
                   "/api/instances/{instance_id} answers it) or ``event: deleted`` (``data``: InstanceDeleted); "
                   "``: keep-alive`` comments between them.",
    "properties": {
        "event": {"enum": ["instance", "deleted"]},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"oneOf": [{"$ref": "#/components/schemas/InstanceView"},
                                             {"$ref": "#/components/schemas/InstanceDeleted"}]},
                 "description": "An InstanceView (event instance) or InstanceDeleted (event deleted) object"},
        "retry": {"type": "integer", "description": "Milliseconds EventSource waits before it reconnects"},
    },
}
#: ``ids`` of a live status stream, as a browser sends them.
STATUS_IDS = f"^[0-9a-f]{{16}}(,[0-9a-f]{{16}}){{0,{MAX_IDS - 1}}}$"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


#: How errors read on a route (``errors.render_error``): OpenAI's body everywhere,
#: except SwiftChat's routes, which keep SwiftChat's own backend's shapes.
ERROR_BODIES: dict[str, dict[str, Any]] = {
    "openai": _json(ErrorResponse),
    "swiftchat": _json(SwiftChatError),
    "text": {"text/plain": {"schema": {"type": "string", "pattern": "^Error: ",
                                       "description": "Error: <message>"}}},
}


def _errors(*statuses: int, dialect: str = "openai", meaning: dict[int, str] | None = None) -> dict[str, Any]:
    """The error responses of an operation; ``meaning`` replaces the general description of a status."""
    out: dict[str, Any] = {}
    for status in statuses:
        description = (meaning or {}).get(status, ERROR_MEANING[status])
        response: dict[str, Any] = {"description": description, "content": ERROR_BODIES[dialect]}
        if status in (429, 503):
            response["headers"] = {
                "Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "string"}}
            }
        out[str(status)] = response
    return out


#: What the HTTP edge answers on every route (``server.EdgeProtocol``, ``observe.body_deadline``).
EDGE_MEANING = {
    408: "The request's header block took longer than RELAY_HEADER_TIMEOUT, or its body paused longer than "
         "RELAY_BODY_TIMEOUT (request_timeout); the connection is closed",
    431: "The request's header block (request line, names and values) is past RELAY_MAX_HEADER_BYTES "
         "(headers_too_large); the connection is closed",
}


def _with_edge_errors(paths: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every operation, with the edge's 408 and 431 added to its responses.

    A 431 and a header timeout's 408 are written before any route is known,
    in OpenAI's shape; a body's 408 is the route's own error, in its dialect.
    """
    openai = ERROR_BODIES["openai"]["application/json"]
    for item in paths.values():
        for operation in item.values():
            responses = operation["responses"]
            errors = [r["content"] for status, r in responses.items() if status.startswith("4") and "content" in r]
            content = dict(errors[0]) if errors else {}
            json_body = content.get("application/json")
            if json_body is None or json_body == openai:
                content["application/json"] = openai
            else:  # SwiftChat's JSON errors: its shape for a body's 408, OpenAI's for the header's
                content["application/json"] = {"schema": {"oneOf": [openai["schema"], json_body["schema"]]}}
            responses.setdefault("408", {"description": EDGE_MEANING[408], "content": content})
            responses.setdefault("431", {"description": EDGE_MEANING[431], "content": ERROR_BODIES["openai"]})
    return paths


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string", "pattern": ID_PATTERN}}


INSTANCE_ID = _path_param("instance_id", "Instance id, as returned at registration")
KEY_ID = _path_param("key_id", "Caller key id, as returned when the key was created")
OWNER: list[dict[str, list[str]]] = [{"agentToken": []}]
CALLER: list[dict[str, list[str]]] = [{}, {"callerKey": []}]  # public instances need nothing; private ones a caller key


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": _json(model)}


#: Every status an operation that runs on an agent can answer: admission
#: (400/401/403/404/429), the body (413/422), the pick (404/501/503) and the
#: agent's answer (a 4xx its model server gave, 502/504).
AGENT_ERRORS = (400, 401, 403, 404, 413, 422, 429, 501, 502, 503, 504)

#: How the global doors find the instance (``targets.resolve``).
GLOBAL_MODEL_RULE = (
    "The instance is named by `model`: '<instance_id>' (its agent's default model) or "
    "'<instance_id>/<model>'. With a caller key (irk_...) as the API key, `model` may also be a plain model "
    "name of the key's instance, or be left out; without one, a missing `model` is 422 and a `model` that "
    "names no instance is 404 model_not_found (type invalid_request_error), as OpenAI answers."
)


def _chat_operation(summary: str, operation_id: str, body: type[BaseModel], stream_default: str,
                    parameters: list[dict[str, Any]], description: str | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "operationId": operation_id,
        "tags": ["chat"],
        "security": CALLER,
        "parameters": parameters,
        "requestBody": _body(body),
        "responses": {
            "200": {
                "description": f"``stream: true``{stream_default}: Server-Sent Events, each "
                               "``data: {chat.completion.chunk}``, ending with ``data: [DONE]``. "
                               "``stream: false``: one ``chat.completion``.",
                "content": {
                    "text/event-stream": {"schema": SSE_EVENT},
                    "application/json": {"schema": _ref(ChatCompletion)},
                },
            },
            **_errors(*AGENT_ERRORS),
        },
    }
    if description:
        operation["description"] = description
    return operation


def _images_operation(summary: str, operation_id: str, body: type[BaseModel], parameters: list[dict[str, Any]],
                      description: str) -> dict[str, Any]:
    return {
        "summary": summary, "operationId": operation_id, "tags": ["images"], "security": CALLER,
        "description": description, "parameters": parameters, "requestBody": _body(body),
        "responses": {"200": {"description": "The images, inline (``b64_json``) or as ``data:`` URLs "
                                             "(``response_format: url``)", "content": _json(ImagesResponse)},
                      **_errors(*AGENT_ERRORS)},
    }


IMAGES_NOTE = (
    "Runs on an agent that declared the images operation (501 capability_not_supported when none of the "
    "instance's agents did). The agent sends every image inline, so ``response_format: url`` gets ``data:`` URLs."
)

#: ``/api/upgrade``'s version check: ``version`` must parse as a version
#: (``wire.parse_version``: it starts with a digit) when ``os`` says an agent asks.
VERSION_PATTERN = "^[0-9]"
#: ``os`` absent or falsy (as Python reads JSON) or ``"agent"``: an agent is asking.
_AGENT_ASKS: dict[str, Any] = {"anyOf": [
    {"not": {"required": ["os"]}},
    {"required": ["os"], "properties": {"os": {"enum": [None, False, 0, "", "agent"]}}},
    {"required": ["os"], "properties": {"os": {"type": "array", "maxItems": 0}}},
    {"required": ["os"], "properties": {"os": {"type": "object", "maxProperties": 0}}},
]}
UPGRADE_REQUEST: dict[str, Any] = {
    "description": "Any JSON: an object's `version` and `os` are read, anything else is ignored. `os` absent, "
                   "null, empty or 'agent' means an agent asks, and `version` (when not null) must be a version "
                   "such as 0.2.0; SwiftChat sends its app's own `os` (android, ios, mac ...) and `version`, "
                   "which the relay does not check and never answers `needUpgrade: true` to.",
    "anyOf": [
        {"type": "object",
         "properties": {"version": {}, "os": {}},
         "if": _AGENT_ASKS,
         "then": {"properties": {"version": {"anyOf": [{"type": "null"},
                                                        {"type": "string", "pattern": VERSION_PATTERN}]}}}},
        {"not": {"type": "object"}},
    ],
}


# -- speech to text (audio.py) -------------------------------------------------------------

#: The audio file part: what ``audio.audio_file`` takes.
AUDIO_FILE: dict[str, Any] = {
    "type": "string", "format": "binary", "minLength": 1,
    "description": f"The audio, not empty, at most RELAY_MAX_UPLOAD_BYTES (15 MiB unless the relay says "
                   f"otherwise; 413 past it). The file name's extension decides the format: "
                   f"{', '.join(AUDIO_EXTENSIONS)}. A name without one of them is taken when the part's "
                   f"Content-Type is one of {', '.join(AUDIO_TYPES)}. Anything else is 415 "
                   f"unsupported_file_format.",
}
#: The file part's encoding: the content types that name a format, for a file whose name does not.
AUDIO_ENCODING: dict[str, Any] = {"file": {"contentType": ", ".join(AUDIO_TYPES)}}


def _audio_form(*, model: Literal["optional", "required", "ignored"]) -> dict[str, Any]:
    """A transcription's multipart body.  Text fields are text on the wire: the types say how they read."""
    properties: dict[str, Any] = {"file": AUDIO_FILE}
    required = ["file"]
    if model != "ignored":
        name: dict[str, Any] = {"type": "string", "maxLength": MAX_MODEL_NAME_LENGTH}
        properties.update({
            "model": {**name, "minLength": 1} if model == "required" else name,
            "language": {"type": "string", "maxLength": MAX_LANGUAGE,
                         "description": "The audio's language, ISO-639-1 ('en'); empty: the model decides"},
            # A field is at most MAX_FIELD_BYTES of UTF-8, so never more characters than that.
            "prompt": {"type": "string", "maxLength": MAX_FIELD_BYTES,
                       "description": f"Text to guide the model; at most {MAX_FIELD_BYTES} bytes of UTF-8 "
                                      "(400 past it)"},
            "response_format": {"enum": [*RESPONSE_FORMATS, ""],
                                "description": "json (the default, also when empty) and verbose_json answer "
                                               "JSON; text and srt answer text/plain, vtt text/vtt"},
            # A number from 0 to 1, or the empty string (no anyOf: fuzzers negate its branches one by one).
            "temperature": {"type": ["number", "string"], "minimum": 0, "maximum": 1, "maxLength": 0,
                            "description": "From 0 to 1; empty: the model's default"},
        })
        if model == "required":
            required.append("model")
    return {
        "type": "object", "properties": properties, "required": required,
        # python-multipart's bounds (audio.MAX_FIELDS parts besides the one file; 400 past them).  An array
        # is one part per item, which no schema can count across fields: other fields are single parts here.
        "maxProperties": MAX_FIELDS + 1, "additionalProperties": {"not": {"type": "array"}},
        "description": f"Other text fields are ignored. At most {MAX_FIELDS} text parts of at most "
                       f"{MAX_FIELD_BYTES} bytes each, and one file (400 past those); a field sent twice counts "
                       f"twice, and its first value is the one read.",
    }


def _multipart(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True,
            "content": {"multipart/form-data": {"schema": schema, "encoding": AUDIO_ENCODING}}}


TRANSCRIBE_ERRORS = (*AGENT_ERRORS, 415)
TRANSCRIBE_MEANING = {
    400: "Malformed request: a credential in the URL, or a multipart body that does not parse (no boundary, "
         "a field past its size, too many fields or files)",
    413: "The file (or the whole body, the file plus 64 KiB) is past RELAY_MAX_UPLOAD_BYTES",
    422: "No `file` part (an application/x-www-form-urlencoded body has none), an empty file, or a field out of "
         "its range; or what the model server refused",
    501: "No connected agent of the instance can transcribe (capability_not_supported)",
    429: "Rate or concurrency limit reached, or too_many_uploads: uploads from this client address already hold "
         "a quarter of the node's RELAY_UPLOAD_MEMORY_BYTES; see Retry-After",
    503: "Instance offline or at capacity, relay storage unavailable, or this node already holds "
         "RELAY_UPLOAD_MEMORY_BYTES of uploads (uploads_busy); see Retry-After",
}

TRANSCRIPTION_ANSWER: dict[str, Any] = {
    "200": {
        "description": "json, verbose_json: the model's JSON (``text``, and for verbose_json the model's "
                       "details). text, srt: the text itself, text/plain. vtt: text/vtt.",
        "content": {
            "application/json": {"schema": _ref(Transcription)},
            "text/plain": {"schema": {"type": "string"}},
            "text/vtt": {"schema": {"type": "string"}},
        },
    },
}
TRANSCRIBE_NOTE = (
    "Runs on an agent that declared the transcribe operation (501 capability_not_supported when none of the "
    "instance's agents did). The file goes to the agent in frames of one credit window each."
)


def _transcriptions(summary: str, operation_id: str, parameters: list[dict[str, Any]], description: str,
                    *, model: Literal["optional", "required"]) -> dict[str, Any]:
    return {
        "summary": summary, "operationId": operation_id, "tags": ["audio"], "security": CALLER,
        "description": description, "parameters": parameters, "requestBody": _multipart(_audio_form(model=model)),
        "responses": {**TRANSCRIPTION_ANSWER, **_errors(*TRANSCRIBE_ERRORS, meaning=TRANSCRIBE_MEANING)},
    }


# -- the Dify chat-app API (dify.py) -------------------------------------------------------

USER_SCHEMA: dict[str, Any] = DifyUser.model_json_schema()["properties"]["user"]
#: Ids the conversation store hands out: canonical uuids; any other string is simply not found.
UUID: dict[str, Any] = {"type": "string", "format": "uuid"}
DIFY_USER = {"name": "user", "in": "query", "required": True, "schema": USER_SCHEMA,
             "description": "The caller's own name for its end user: conversations are kept per user"}
DIFY_LIMIT = {"name": "limit", "in": "query", "allowEmptyValue": True,
              "schema": {"type": "integer", "minimum": 1, "maximum": PAGE_MAX, "default": PAGE_DEFAULT}}
CONVERSATION_ID = {"name": "conversation_id", "in": "path", "required": True, "schema": UUID,
                   "description": "A conversation id, as chat-messages answered it"}
MESSAGE_ID = {"name": "message_id", "in": "path", "required": True, "schema": UUID,
              "description": "A message id (``message_id`` of a chat-messages answer)"}

#: One Dify event: ``data`` is one JSON object, its ``event`` saying which.
DIFY_SSE_EVENT = {
    "type": "object",
    "properties": {
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"oneOf": [_ref(DifyMessageEvent), _ref(DifyMessageEndEvent),
                                             _ref(DifyErrorEvent)]},
                 "description": "A DifyMessageEvent, DifyMessageEndEvent or DifyErrorEvent object"},
    },
    "required": ["data"],
}

#: ``DELETE …/conversations/{id}`` reads ``user`` from a JSON object body when it is
#: truthy (as Python reads JSON), else from the query; any other body is ignored.
_FALSY: list[Any] = [None, False, 0, "", [], {}]
DIFY_DELETE_BODY: dict[str, Any] = {
    "description": "Optional. A JSON object whose `user` names the end user (Dify's own form); anything else, "
                   "a `user` that is null, false, 0, empty or absent included, leaves `user` to the query.",
    "anyOf": [
        {"not": {"type": "object"}},
        {"type": "object", "properties": {"user": {"anyOf": [{"enum": _FALSY}, USER_SCHEMA]}}},
    ],
}

DIFY_SCOPE = (
    "A conversation belongs to the instance, the caller (the caller key presented, or anonymous on a public "
    "instance) and `user`; anything outside that scope is the same 404 as an id that never existed."
)
DIFY_404 = ("Instance not found; or conversation_not_found / message_not_found: the id is not one of this "
            "caller's and user's (or it expired)")
DIFY_CHAT_422 = (
    "Invalid parameters (the error names the field), or: conversations_disabled (the owner turned conversations "
    "off), input_required (a variable the instance declares is missing from `inputs`), message_too_large (the "
    "query past RELAY_CONVERSATION_MESSAGE_BYTES), inputs_too_large, conversation_full (the conversation holds "
    "RELAY_CONVERSATION_MAX_MESSAGES messages), too_many_conversations (this user, or without a caller key this "
    "client address, already keeps RELAY_CONVERSATIONS_PER_USER), caller_conversations_full (this caller's "
    "conversations hold RELAY_CONVERSATION_BYTES_PER_CALLER), instance_conversations_full (the instance keeps "
    "RELAY_CONVERSATIONS_PER_INSTANCE conversations or RELAY_CONVERSATION_BYTES_PER_INSTANCE bytes), "
    "json_too_deep, too_many_messages / content_too_large (the relay's request limits), or what "
    "the model server refused"
)
V1_401 = ("No caller key, or not a known one (api_key_required): on /v1 the caller key says which instance")


def dify_operations(base: str) -> dict[str, dict[str, Any]]:
    """The Dify chat-app API at ``base``: per instance (its chat URL) or ``/v1`` (the caller key's instance)."""
    per_instance = base != "/v1"
    params: list[dict[str, Any]] = [INSTANCE_ID] if per_instance else []
    security = CALLER if per_instance else [{"callerKey": []}]
    prefix = "dify" if per_instance else "v1Dify"
    where = ("The instance is the one in the path." if per_instance else
             "The instance is the caller key's: send it as `Authorization: Bearer irk_...` (401 "
             "api_key_required without one).")
    meaning: dict[int, str] = {404: "Instance not found"}
    if not per_instance:
        meaning[401] = V1_401

    def op(summary: str, operation_id: str, answer: dict[str, Any], statuses: tuple[int, ...],
           extra: dict[str, Any] | None = None, more: str = "", tags: str = "dify",
           errors: dict[int, str] | None = None) -> dict[str, Any]:
        # On /v1 the key names its own instance, so it is never one "not for this instance" (403).
        statuses = statuses if per_instance else tuple(s for s in statuses if s != 403)
        return {"summary": summary, "operationId": prefix + operation_id, "tags": [tags], "security": security,
                "description": " ".join(filter(None, [where, more])), **(extra or {}),
                "responses": {**answer, **_errors(*statuses, meaning={**meaning, **(errors or {})})}}

    def ok(description: str, model: type[BaseModel]) -> dict[str, Any]:
        return {"200": {"description": description, "content": _json(model)}}

    # Writes (a small JSON body, at most 16 KiB) count against the caller's rate limits like turns; reads do not.
    small = (400, 401, 403, 404, 413, 422, 429, 503)
    reads = (400, 401, 403, 404, 422, 503)
    chat = op(
        "Dify: send a message (one turn of a conversation the relay keeps)", "ChatMessages",
        {"200": {
            "description": "``blocking`` (the default): one JSON answer. ``streaming``: Server-Sent Events, each "
                           "``data: {event}``: ``message`` events with the answer's pieces, then ``message_end``; "
                           "a failure after the first event ends the stream with an ``error`` event instead. "
                           "Never ``data: [DONE]``.",
            "content": {"application/json": {"schema": _ref(DifyAnswer)},
                        "text/event-stream": {"schema": DIFY_SSE_EVENT}},
        }},
        AGENT_ERRORS, {"parameters": params, "requestBody": _body(DifyChatRequest)},
        "Without `conversation_id` a new conversation starts (named after the query); with one, the turn continues "
        "it, the model seeing its earlier turns. `inputs`: the values of the variables the instance declares (GET "
        "parameters), checked; others are dropped, and a continued conversation keeps the inputs it started "
        "with. " + DIFY_SCOPE, errors={404: DIFY_404, 422: DIFY_CHAT_422})
    messages = op(
        "Dify: a conversation's messages, newest first", "Messages",
        ok("One page", DifyMessagePage), reads,
        {"parameters": [*params,
                        {"name": "conversation_id", "in": "query", "required": True, "schema": UUID},
                        {"name": "first_id", "in": "query", "allowEmptyValue": True, "schema": UUID,
                         "description": "The oldest message id of the previous page (message_not_found if it "
                                        "is not in the conversation)"},
                        DIFY_LIMIT, DIFY_USER]},
        DIFY_SCOPE, errors={404: DIFY_404})
    conversations = op(
        "Dify: the user's conversations, most recently active first (needs a caller key)", "Conversations",
        ok("One page", DifyConversationPage), reads,
        {"parameters": [*params,
                        {"name": "last_id", "in": "query", "allowEmptyValue": True, "schema": UUID,
                         "description": "The last conversation id of the previous page (conversation_not_found "
                                        "if it is not one of this user's)"},
                        DIFY_LIMIT, DIFY_USER]},
        "Without a caller key, 401 api_key_required: an anonymous caller reaches a conversation by its id only.",
        errors={404: DIFY_404, 401: "No caller key (api_key_required): listing needs one; or a private "
                                     "instance's key is missing or unknown"})
    rename = op(
        "Dify: rename a conversation", "RenameConversation", ok("The conversation, renamed", DifyRenamed), small,
        {"parameters": [*params, CONVERSATION_ID], "requestBody": _body(DifyRename)}, DIFY_SCOPE,
        errors={404: DIFY_404})
    delete = op(
        "Dify: delete a conversation and its messages", "DeleteConversation", ok("Deleted", DifyResult), small,
        {"parameters": [*params, CONVERSATION_ID,
                        {**DIFY_USER, "required": False,
                         "description": "The end user, when the body does not name it"}],
         "requestBody": {"required": False, "content": {"application/json": {"schema": DIFY_DELETE_BODY}}}},
        "`user` in the body (as Dify sends it) or in the query: one of them is required (422 otherwise), the "
        "body's wins. " + DIFY_SCOPE, errors={404: DIFY_404})
    feedback = op(
        "Dify: rate an answer (like, dislike; null takes the rating back)", "MessageFeedback",
        ok("Rated", DifyResult), small,
        {"parameters": [*params, MESSAGE_ID], "requestBody": _body(DifyFeedback)}, DIFY_SCOPE,
        errors={404: DIFY_404})
    parameters = op(
        "Dify: the opening statement and the inputs a conversation takes", "Parameters",
        ok("The instance's parameters (the owner's, else what its agent suggested)", DifyParameters),
        (400, 401, 403, 404, 503), {"parameters": params})
    audio = op(
        "Dify: speech to text", "AudioToText", ok("The transcript", Transcription), TRANSCRIBE_ERRORS,
        {"parameters": params, "requestBody": _multipart(_audio_form(model="ignored"))},
        "The operation of …/audio/transcriptions, with the agent's default model. " + TRANSCRIBE_NOTE,
        tags="audio", errors={k: v for k, v in TRANSCRIBE_MEANING.items() if k != 422} | {
            422: "No `file` part, or an empty file; or what the model server refused"})
    return {
        f"{base}/chat-messages": {"post": chat},
        f"{base}/messages": {"get": messages},
        f"{base}/messages/{{message_id}}/feedbacks": {"post": feedback},
        f"{base}/conversations": {"get": conversations},
        f"{base}/conversations/{{conversation_id}}/name": {"post": rename},
        f"{base}/conversations/{{conversation_id}}": {"delete": delete},
        f"{base}/parameters": {"get": parameters},
        f"{base}/audio-to-text": {"post": audio},
    }


def operations() -> dict[str, dict[str, Any]]:
    """Every HTTP operation of the relay: ``{path: {method: operation}}``."""
    per_instance = " (the default when left out, unless ``Accept`` asks for JSON only)"
    chat = _chat_operation("Chat completion (OpenAI-compatible)", "chat", ChatRequest, per_instance, [INSTANCE_ID])
    chat_alias = _chat_operation("Chat completion (OpenAI SDK path)", "chatCompletions", ChatRequest, per_instance,
                                 [INSTANCE_ID])
    global_chat = _chat_operation("Chat completion on any instance (OpenAI base URL)", "globalChat",
                                  GlobalChatRequest, "", [], GLOBAL_MODEL_RULE + " `stream` defaults to false.")
    upgrade_answer = {"200": {"description": "What this relay ships", "content": _json(UpgradeInfo)}}
    models_rule = ("With a caller key as the API key, its instance's models by their plain names; without, "
                   "those of the first 100 online public instances, as '<instance_id>/<model>'.")
    swiftchat_models: dict[str, Any] = {
        "summary": "SwiftChat: the instance's text and image models", "description": models_rule,
        "tags": ["swiftchat"], "security": CALLER,
        "responses": {"200": {"description": "Models", "content": _json(SwiftChatModels)},
                      **_errors(400, 401, 403, 404, 503, dialect="swiftchat")},
    }
    return {
        "/api/instances": {
            "post": {
                "summary": "Register an instance; the agent token is shown once",
                "operationId": "registerInstance", "tags": ["instances"],
                "security": [{}, {"registrationKey": []}],
                "requestBody": _body(RegisterRequest),
                "responses": {"201": {"description": "Registered", "content": _json(Registered)},
                              **_errors(400, 401, 403, 413, 422, 429, 503)},
            },
            "get": {
                "summary": "List public instances, in registration order",
                "operationId": "listInstances", "tags": ["instances"],
                # An empty parameter (``?status=&limit=``, as forms send them) means its default.
                "parameters": [
                    {"name": "status", "in": "query", "allowEmptyValue": True,
                     "schema": {"type": "string", "enum": ["online", "offline"]}},
                    {"name": "limit", "in": "query", "allowEmptyValue": True,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}},
                    {"name": "cursor", "in": "query", "allowEmptyValue": True,
                     "description": "``next_cursor`` of the previous page",
                     "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"}},
                    {"name": "q", "in": "query", "allowEmptyValue": True,
                     "description": "Search: instances whose name, description, id or one of whose models "
                                    "contains it, ignoring case (leading and trailing whitespace aside; empty: "
                                    "no search)",
                     "schema": {"type": "string", "maxLength": MAX_QUERY_CHARS}},
                ],
                "description": "A page holds `limit` instances, or fewer at the end of the list. With a filter "
                               "(`status`, `q`) one request examines at most 2000 instances: a page may then be "
                               "short, even empty, with a `next_cursor` to go on from.",
                "responses": {"200": {"description": "One page", "content": _json(InstancePage)},
                              **_errors(400, 422, 503)},
            },
        },
        "/api/instances/events": {
            "get": {
                "summary": "Live status of instances (Server-Sent Events, for EventSource)",
                "description": (
                    "The stream never ends by itself. First ``retry: 2000``; then an ``instance`` event with each "
                    "instance's view (private instances too: the id is what shows them), and another whenever "
                    "it changes (an online instance's `last_seen` aside); a ``deleted`` event for an id that is "
                    "not (or no longer) registered. A ``: keep-alive`` comment every "
                    f"{KEEPALIVE_SECONDS:g} s on a quiet stream. The node reads the instances every "
                    "RELAY_WATCH_INTERVAL seconds (2 unless the relay says otherwise). The stream ends when "
                    "the node shuts down: EventSource reconnects, to another node behind a load balancer."
                ),
                "operationId": "instanceEvents", "tags": ["instances"],
                "parameters": [{
                    "name": "ids", "in": "query", "required": True,
                    "description": f"Instance ids, comma-separated: 1 to {MAX_IDS} (an id given twice counts "
                                   "once, empty ones are ignored)",
                    "schema": {"type": "string", "pattern": STATUS_IDS},
                }],
                "responses": {
                    "200": {"description": "The events (never one body: read it as a stream)",
                            "content": {"text/event-stream": {"schema": STATUS_EVENT}}},
                    **_errors(422, 429, 503, meaning={
                        422: "`ids` missing or empty, more than 100 of them, or one that is not 16 hexadecimal "
                             "digits",
                        429: "This address already holds RELAY_WATCHERS_PER_ADDRESS live status streams on this "
                             "node; see Retry-After",
                        503: "This node serves RELAY_MAX_WATCHERS live status streams already, is draining, or "
                             "its storage is unavailable; see Retry-After",
                    }),
                },
            },
        },
        "/api/instances/{instance_id}": {
            "get": {
                "summary": "An instance's public view and live status",
                "operationId": "getInstance", "tags": ["instances"], "parameters": [INSTANCE_ID],
                "responses": {"200": {"description": "The instance", "content": _json(InstanceView)},
                              **_errors(404, 503)},
            },
            "patch": {
                "summary": "Change name, description, visibility, the Dify API's parameters (introduction, "
                           "variables) or whether conversations are kept (owner)",
                "description": "Only the fields given change. `variables`: each `key` at most once (422 "
                               "otherwise, which the schema cannot say). `conversations: false` turns the "
                               "Dify API's chat-messages off (422 conversations_disabled); stored "
                               "conversations stay until they expire or are purged.",
                "operationId": "updateInstance", "tags": ["owner"], "security": OWNER,
                "parameters": [INSTANCE_ID], "requestBody": _body(UpdateInstanceRequest),
                "responses": {"200": {"description": "The updated instance", "content": _json(InstanceView)},
                              **_errors(400, 401, 403, 404, 413, 422, 503)},
            },
            "delete": {
                "summary": "Delete the instance; its agents are disconnected (owner)",
                "operationId": "deleteInstance", "tags": ["owner"], "security": OWNER,
                "parameters": [INSTANCE_ID],
                "responses": {"204": {"description": "Deleted"}, **_errors(400, 401, 403, 404, 503)},
            },
        },
        "/api/instances/{instance_id}/settings": {
            "get": {
                "summary": "What the owner may change, as it stands, the Dify API's parameters included (owner)",
                "description": "`introduction` and `variables` are the owner's (PATCH), else what the "
                               "instance's agent suggested; the public view does not show them.",
                "operationId": "instanceSettings", "tags": ["owner"], "security": OWNER,
                "parameters": [INSTANCE_ID],
                "responses": {"200": {"description": "The settings", "content": _json(InstanceSettings)},
                              **_errors(400, 401, 403, 404, 503)},
            },
        },
        "/api/instances/{instance_id}/token": {
            "post": {
                "summary": "Rotate the agent token: the old one stops at once, its agents are closed (owner)",
                "operationId": "rotateToken", "tags": ["owner"], "security": OWNER,
                "parameters": [INSTANCE_ID],
                "responses": {"200": {"description": "The new token, shown once", "content": _json(TokenRotated)},
                              **_errors(400, 401, 403, 404, 503)},
            },
        },
        "/api/instances/{instance_id}/keys": {
            "post": {
                "summary": "Create a caller API key; the key is shown once (owner)",
                "operationId": "createKey", "tags": ["owner"], "security": OWNER,
                "parameters": [INSTANCE_ID], "requestBody": _body(CreateKeyRequest),
                "responses": {"201": {"description": "The new key", "content": _json(CallerKeyCreated)},
                              **_errors(400, 401, 403, 404, 413, 422, 503)},
            },
            "get": {
                "summary": "List caller keys, without secrets (owner)",
                "operationId": "listKeys", "tags": ["owner"], "security": OWNER, "parameters": [INSTANCE_ID],
                "responses": {"200": {"description": "The keys", "content": _json(CallerKeyList)},
                              **_errors(400, 401, 403, 404, 503)},
            },
        },
        "/api/instances/{instance_id}/conversations": {
            "delete": {
                "summary": "Delete every stored conversation of the instance (owner)",
                "operationId": "purgeConversations", "tags": ["owner"], "security": OWNER,
                "parameters": [INSTANCE_ID],
                "responses": {"200": {"description": "How many were deleted", "content": _json(ConversationsPurged)},
                              **_errors(400, 401, 403, 404, 503)},
            },
        },
        "/api/instances/{instance_id}/keys/{key_id}": {
            "delete": {
                "summary": "Revoke a caller key; it stops working at once (owner)",
                "operationId": "revokeKey", "tags": ["owner"], "security": OWNER,
                "parameters": [INSTANCE_ID, KEY_ID],
                "responses": {"204": {"description": "Revoked"}, **_errors(400, 401, 403, 404, 503)},
            },
        },
        "/api/chat/{instance_id}": {"post": chat},
        "/api/chat/{instance_id}/chat/completions": {"post": chat_alias},
        "/api/chat/{instance_id}/models": {
            "get": {
                "summary": "OpenAI model list of the instance",
                "operationId": "listModels", "tags": ["chat"], "security": CALLER, "parameters": [INSTANCE_ID],
                "responses": {"200": {"description": "Models", "content": _json(ModelList)},
                              **_errors(400, 401, 403, 404, 503)},
            },
        },
        "/api/chat/{instance_id}/images/generations": {"post": _images_operation(
            "Image generation (OpenAI-compatible)", "images", ImageRequest, [INSTANCE_ID], IMAGES_NOTE)},
        "/api/chat/{instance_id}/audio/transcriptions": {"post": _transcriptions(
            "Speech to text (OpenAI-compatible)", "transcriptions", [INSTANCE_ID],
            "`model`: run when the chosen agent serves it, else the agent's default transcription model. "
            + TRANSCRIBE_NOTE, model="optional")},
        **dify_operations("/api/chat/{instance_id}"),
        "/v1/chat/completions": {"post": global_chat},
        "/v1/models": {
            "get": {
                "summary": "OpenAI model list: a caller key's instance, or every online public instance",
                "description": "With a caller key as the API key: its instance's models, by their plain names, "
                               "in one page. Without: the models of online public instances as "
                               "'<instance_id>/<model>', a page of `limit` instances at a time.",
                "operationId": "globalModels", "tags": ["chat"], "security": CALLER,
                "parameters": [
                    {"name": "limit", "in": "query", "allowEmptyValue": True,
                     "description": "Instances per page (without a caller key)",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 100}},
                    {"name": "after", "in": "query", "allowEmptyValue": True,
                     "description": "``next_cursor`` of the previous page",
                     "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"}},
                ],
                "responses": {"200": {"description": "One page of models", "content": _json(ModelPage)},
                              **_errors(400, 401, 403, 404, 422, 503)},
            },
        },
        "/v1/images/generations": {"post": _images_operation(
            "Image generation on any instance (OpenAI base URL)", "globalImages", GlobalImageRequest, [],
            f"{GLOBAL_MODEL_RULE} {IMAGES_NOTE}")},
        "/v1/audio/transcriptions": {"post": _transcriptions(
            "Speech to text on any instance (OpenAI base URL)", "globalTranscriptions", [],
            GLOBAL_MODEL_RULE.replace("(its agent's default model)", "(its agent's default transcription model)")
            + " A model the instance's agents do not serve is 404 model_not_found. " + TRANSCRIBE_NOTE,
            model="required")},
        **dify_operations("/v1"),
        "/api/converse": {
            "post": {
                "summary": "SwiftChat: chat in Bedrock Converse messages, the answer streamed as text",
                "description": (
                    "The instance is named by `modelId` ('<instance_id>' or '<instance_id>/<model>'), or by a "
                    "caller key sent as the API key (then `modelId` may be any name). Content blocks: text, "
                    "and images in user messages (the schema); text documents (txt, md, csv, html) whose bytes "
                    "are UTF-8 are accepted too and reach the model as text. pdf, doc, docx, xls and xlsx "
                    "documents, video, tool and other blocks are 422 unsupported_content. Errors are "
                    "``Error: <message>`` as text, with the status."
                ),
                "operationId": "converse", "tags": ["swiftchat"], "security": CALLER,
                "requestBody": _body(ConverseRequest),
                "responses": {
                    "200": {
                        "description": "Not Server-Sent Events, despite the media type (SwiftChat's own "
                                       "backend's format): the answer text as it is generated, then one last "
                                       "line, ``\\n{\"inputTokens\": N, \"outputTokens\": N, "
                                       "\"totalTokens\": N}``; a failure after the answer began ends the body "
                                       "with ``Error: <message>`` instead.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_errors(*AGENT_ERRORS, dialect="text"),
                },
            },
        },
        "/api/models": {"get": {**swiftchat_models, "operationId": "swiftchatModels"},
                        "post": {**swiftchat_models, "operationId": "swiftchatModelsPost",
                                 "description": f"{models_rule} A body is ignored."}},
        "/api/image": {
            "post": {
                "summary": "SwiftChat: generate one image",
                "description": "The instance is named by `modelId`, as on /api/converse. " + IMAGES_NOTE,
                "operationId": "swiftchatImage", "tags": ["swiftchat"], "security": CALLER,
                "requestBody": _body(SwiftChatImageRequest),
                "responses": {"200": {"description": "The image", "content": _json(SwiftChatImageResponse)},
                              **_errors(*AGENT_ERRORS, dialect="swiftchat")},
            },
        },
        "/api/upgrade": {
            # Only `version` is a parameter here: whether it is checked depends on `os`,
            # and no schema can tie one query parameter to another.
            "get": {
                "summary": "The agent version and protocol versions this relay ships",
                "description": "`version`: an agent's version, answered with whether to upgrade. An `os` "
                               "parameter other than 'agent' turns the check off, as described on POST.",
                "operationId": "upgrade", "tags": ["ops"],
                "parameters": [{"name": "version", "in": "query", "description": "A version such as 0.2.0",
                                "schema": {"type": "string", "pattern": VERSION_PATTERN}}],
                "responses": {**upgrade_answer, **_errors(422, dialect="swiftchat")},
            },
            "post": {
                "summary": "The agent version and protocol versions this relay ships (SwiftChat's form)",
                "description": "An empty body means no question; query parameters are read as on GET, and "
                               "the body's fields win.",
                "operationId": "upgradePost", "tags": ["ops"],
                "requestBody": {"required": False,
                                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/"
                                                                                    "UpgradeRequest"}}}},
                "responses": {**upgrade_answer, **_errors(400, 413, 422, dialect="swiftchat")},
            },
        },
        "/api/relay": {"get": {
            "summary": "This relay: its public URL, version, and whether registering needs a key",
            "operationId": "relayInfo", "tags": ["ops"],
            "responses": {"200": {"description": "The relay", "content": _json(RelayInfo)}},
        }},
        "/healthz": {"get": {"summary": "Liveness", "operationId": "healthz", "tags": ["ops"],
                             "responses": {"200": {"description": "Alive", "content": _json(Health)}}}},
        "/readyz": {"get": {"summary": "Readiness (Redis reachable, not draining)", "operationId": "readyz",
                            "tags": ["ops"],
                            "responses": {"200": {"description": "Ready", "content": _json(Ready)},
                                          **_errors(503)}}},
        "/metrics": {"get": {"summary": "Prometheus metrics of this node", "operationId": "metrics", "tags": ["ops"],
                             "responses": {"200": {"description": "Prometheus text format",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {
            "summary": "This document", "operationId": "openapi", "tags": ["ops"],
            "responses": {"200": {"description": "OpenAPI 3.1",
                                  "content": {"application/json": {"schema": {"type": "object"}}}}},
        }},
    }


#: The web dashboard (``dashboard.py``): HTML pages and their assets, for browsers, not API operations.
#: Every one is served with a strict Content-Security-Policy, ``X-Frame-Options: DENY``, ``nosniff``, no
#: referrer and ``Cache-Control: no-cache``; none of them exists when the relay runs with RELAY_DASHBOARD=false.
PAGES = {
    "/": "The directory of public instances: search, status live",
    "/register": "Register an instance (the agent token is shown once, in the page)",
    "/i/{instance_id}": "An instance: its status live, how to call it, and its owner's settings (with the "
                        "agent token, kept in the browser); 404 unless the id is 16 hexadecimal digits",
    "/static/{path}": "The pages' scripts and styles",
}


def schemas() -> dict[str, Any]:
    pairs: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        *((m, "validation") for m in REQUEST_MODELS), *((m, "serialization") for m in RESPONSE_MODELS)]
    _, top = models_json_schema(pairs, ref_template="#/components/schemas/{model}")
    # Hand-written: /api/upgrade reads its body by hand, with no model.
    return {**top.get("$defs", {}), "UpgradeRequest": UPGRADE_REQUEST}


def build_openapi(base_url: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "instance-relay",
            "version": __version__,
            "description": (
                "A public, OpenAI-compatible chat URL for a model running on someone's machine. "
                "Errors use OpenAI's shape, except on SwiftChat's routes, which answer as SwiftChat's own "
                "backend does. Credentials go in `Authorization: Bearer`, never in URLs. "
                "See SECURITY.md for who may do what and every limit."
            ),
        },
        "servers": [{"url": base_url}],
        "paths": _with_edge_errors(operations()),
        "components": {
            "schemas": schemas(),
            "securitySchemes": {
                "agentToken": {"type": "http", "scheme": "bearer",
                               "description": "The instance's agent token (ira_...): owner credential"},
                "callerKey": {"type": "http", "scheme": "bearer",
                              "description": "A caller API key (irk_...) made by the owner; "
                                             "required for private instances"},
                "registrationKey": {"type": "http", "scheme": "bearer",
                                    "description": "RELAY_REGISTRATION_KEY, when the relay sets one"},
            },
        },
        "x-websockets": {
            "/api/agent/connect": {
                "summary": "Agent connection (websocket; the wire protocol, versions 1 and 2, see ARCHITECTURE.md)",
                "security": "Authorization: Bearer <agent_token> on the upgrade request",
                "denials": {"401": "unknown or rotated token", "503": "relay storage unavailable"},
                "close_codes": {
                    "1002": "protocol error (malformed frame, unknown or ended stream, window overrun)",
                    "1008": "policy violation (frame or byte rate above the limit)",
                    "1009": "frame larger than RELAY_MAX_FRAME_BYTES",
                    "4001": "no protocol version in common (the reason names the side to upgrade)",
                    "4003": "token rotated or instance deleted",
                    "4008": "heartbeat timeout",
                    "4009": "replaced by a newer connection of the same agent",
                },
            }
        },
        "x-pages": PAGES,
    }
