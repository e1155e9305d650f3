"""The relay's OpenAPI 3.1 document, served at ``GET /openapi.json``.

Schemas come from the pydantic models in :mod:`relay.models` (the same models
that validate requests), so the document cannot drift from what the relay
accepts.  Operations are a table below: one entry per route, with the
statuses it can answer.  ``tests/test_openapi.py`` checks that every route of
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
    CreateKeyRequest,
    ErrorResponse,
    Health,
    InstancePage,
    InstanceView,
    ModelList,
    Ready,
    Registered,
    RegisterRequest,
    TokenRotated,
    UpdateInstanceRequest,
)

REQUEST_MODELS: tuple[type[BaseModel], ...] = (RegisterRequest, UpdateInstanceRequest, CreateKeyRequest, ChatRequest)
RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    Registered, InstanceView, InstancePage, TokenRotated, CallerKey, CallerKeyCreated, CallerKeyList,
    ChatCompletion, ModelList, ErrorResponse, Health, Ready,
)

ERROR_MEANING = {
    400: "Malformed request (body is not JSON, or a credential was put in the URL)",
    401: "Credential missing or unknown",
    403: "Credential valid but not for this",
    404: "Instance (or key) not found",
    413: "Request body too large",
    422: "Invalid parameters, or a request limit exceeded (the error names the field)",
    429: "Rate or concurrency limit reached; see Retry-After",
    501: "No connected agent of the instance can run this operation (capability_not_supported)",
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


def _errors(*statuses: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status in statuses:
        response: dict[str, Any] = {"description": ERROR_MEANING[status], "content": _json(ErrorResponse)}
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


def _chat_operation(summary: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "operationId": None,  # filled per path
        "tags": ["chat"],
        "security": CALLER,
        "parameters": [INSTANCE_ID],
        "requestBody": _body(ChatRequest),
        "responses": {
            "200": {
                "description": "``stream: true`` (the default): Server-Sent Events, each "
                               "``data: {chat.completion.chunk}``, ending with ``data: [DONE]``. "
                               "``stream: false``: one ``chat.completion``.",
                "content": {
                    "text/event-stream": {"schema": SSE_EVENT},
                    "application/json": {"schema": _ref(ChatCompletion)},
                },
            },
            **_errors(400, 401, 403, 404, 413, 422, 429, 501, 502, 503, 504),
        },
    }


def operations() -> dict[str, dict[str, Any]]:
    """Every HTTP operation of the relay: ``{path: {method: operation}}``."""
    chat = _chat_operation("Chat completion (OpenAI-compatible)")
    chat_alias = _chat_operation("Chat completion (OpenAI SDK path)")
    chat["operationId"], chat_alias["operationId"] = "chat", "chatCompletions"
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
    return top.get("$defs", {})


def build_openapi(base_url: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "instance-relay",
            "version": __version__,
            "description": (
                "A public, OpenAI-compatible chat URL for a model running on someone's machine. "
                "Errors use OpenAI's shape. Credentials go in `Authorization: Bearer`, never in URLs. "
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
