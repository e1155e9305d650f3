"""The relay's OpenAPI 3.1 document, served at ``GET /openapi.json``.

Schemas come from the pydantic models in :mod:`relay.models` (the same models
that validate requests), so the document cannot drift from what the relay
accepts.  Where a door checks more than its model before validating (the
global doors read the instance out of ``model``/``modelId`` first), the
document's schema is a subclass of the model that says so; ``/api/converse``
is checked by ``wire.converse``, which ``ConverseRequest`` describes; and
``/api/upgrade``'s body, read by hand, has a hand-written schema.
Operations are a table below: one entry per route, with the statuses it can
answer.  ``tests/test_openapi.py`` checks that every route of
the app is described here and runs schemathesis against the document.

The agent websocket (``GET /api/agent/connect``) is not an HTTP operation; it
is described under the ``x-websockets`` extension so that HTTP tools and
fuzzers leave it alone.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import __version__
from .models import (
    CallerKey,
    CallerKeyCreated,
    CallerKeyList,
    ChatCompletion,
    ChatRequest,
    ConverseRequest,
    CreateKeyRequest,
    ErrorResponse,
    GlobalChatRequest,
    GlobalImageRequest,
    Health,
    ImageRequest,
    ImagesResponse,
    InstancePage,
    InstanceView,
    ModelList,
    ModelPage,
    Ready,
    Registered,
    RegisterRequest,
    SwiftChatError,
    SwiftChatImageRequest,
    SwiftChatImageResponse,
    SwiftChatModels,
    TokenRotated,
    UpdateInstanceRequest,
    UpgradeInfo,
)

REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    RegisterRequest, UpdateInstanceRequest, CreateKeyRequest, ChatRequest, GlobalChatRequest, ImageRequest,
    GlobalImageRequest, ConverseRequest, SwiftChatImageRequest,
)
RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    Registered, InstanceView, InstancePage, TokenRotated, CallerKey, CallerKeyCreated, CallerKeyList,
    ChatCompletion, ModelList, ModelPage, ImagesResponse, ErrorResponse, Health, Ready,
    SwiftChatModels, SwiftChatImageResponse, SwiftChatError, UpgradeInfo,
)

ERROR_MEANING = {
    400: "Malformed request (body is not JSON, or a credential was put in the URL)",
    401: "Credential missing or unknown",
    403: "Credential valid but not for this",
    404: "Instance (or key) not found; on the global doors (/v1 and SwiftChat's) also model_not_found: "
         "`model`/`modelId` names no instance, or (/v1) a model its agents do not serve",
    413: "Request body too large",
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


def _errors(*statuses: int, dialect: str = "openai") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status in statuses:
        response: dict[str, Any] = {"description": ERROR_MEANING[status], "content": ERROR_BODIES[dialect]}
        if status in (429, 503):
            response["headers"] = {
                "Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "string"}}
            }
        out[str(status)] = response
    return out


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
                ],
                "responses": {"200": {"description": "One page", "content": _json(InstancePage)},
                              **_errors(400, 422, 503)},
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
                "summary": "Change name, description or visibility (owner)",
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
        "paths": operations(),
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
    }
