"""The relay's own API: instances, their owners' actions, the live status stream, health and this document.

Bodies ``relay.doors.relay_api`` builds as dicts (``GET /api/relay``, an
owner's settings, the live status events) are described by the models of
``relay.bodies.instances``, which ``tests/test_dashboard.py`` holds the answers to.
"""

from __future__ import annotations

from typing import Any

from relay.bodies.instances import (
    CallerKeyCreated,
    CallerKeyList,
    CreateKeyRequest,
    Health,
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
from relay.doors.relay_api import KEEPALIVE_SECONDS, MAX_QUERY_CHARS
from relay.openapi.common import (
    INSTANCE_ID,
    KEY_ID,
    OWNER,
    Operation,
    cursor_param,
    error_responses,
    json_content,
    request_body,
)
from relay.web.live import MAX_IDS

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


REGISTER_INSTANCE: Operation = {
    "summary": "Register an instance; the agent token is shown once",
    "operationId": "registerInstance", "tags": ["instances"],
    "security": [{}, {"registrationKey": []}],
    "requestBody": request_body(RegisterRequest),
    "responses": {"201": {"description": "Registered", "content": json_content(Registered)},
                  **error_responses(400, 401, 403, 413, 422, 429, 503)},
}

LIST_INSTANCES: Operation = {
    "summary": "List public instances, in registration order",
    "operationId": "listInstances", "tags": ["instances"],
    # An empty parameter (``?status=&limit=``, as forms send them) means its default.
    "parameters": [
        {"name": "status", "in": "query", "allowEmptyValue": True,
         "schema": {"type": "string", "enum": ["online", "offline"]}},
        {"name": "limit", "in": "query", "allowEmptyValue": True,
         "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}},
        cursor_param("cursor"),
        {"name": "q", "in": "query", "allowEmptyValue": True,
         "description": "Search: instances whose name, description, id or one of whose models "
                        "contains it, ignoring case (leading and trailing whitespace aside; empty: "
                        "no search)",
         "schema": {"type": "string", "maxLength": MAX_QUERY_CHARS}},
    ],
    "description": "A page holds `limit` instances, or fewer at the end of the list. With a filter "
                   "(`status`, `q`) one request examines at most 2000 instances: a page may then be "
                   "short, even empty, with a `next_cursor` to go on from.",
    "responses": {"200": {"description": "One page", "content": json_content(InstancePage)},
                  **error_responses(400, 422, 503)},
}

INSTANCE_EVENTS: Operation = {
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
        **error_responses(422, 429, 503, meaning={
            422: "`ids` missing or empty, more than 100 of them, or one that is not 16 hexadecimal "
                 "digits",
            429: "This address already holds RELAY_WATCHERS_PER_ADDRESS live status streams on this "
                 "node; see Retry-After",
            503: "This node serves RELAY_MAX_WATCHERS live status streams already, is draining, or "
                 "its storage is unavailable; see Retry-After",
        }),
    },
}

GET_INSTANCE: Operation = {
    "summary": "An instance's public view and live status",
    "operationId": "getInstance", "tags": ["instances"], "parameters": [INSTANCE_ID],
    "responses": {"200": {"description": "The instance", "content": json_content(InstanceView)},
                  **error_responses(404, 503)},
}

UPDATE_INSTANCE: Operation = {
    "summary": "Change name, description, visibility, the Dify API's parameters (introduction, "
               "variables) or whether conversations are kept (owner)",
    "description": "Only the fields given change. `variables`: each `key` at most once (422 "
                   "otherwise, which the schema cannot say). `conversations: false` turns the "
                   "Dify API's chat-messages off (422 conversations_disabled); stored "
                   "conversations stay until they expire or are purged.",
    "operationId": "updateInstance", "tags": ["owner"], "security": OWNER,
    "parameters": [INSTANCE_ID], "requestBody": request_body(UpdateInstanceRequest),
    "responses": {"200": {"description": "The updated instance", "content": json_content(InstanceView)},
                  **error_responses(400, 401, 403, 404, 413, 422, 503)},
}

DELETE_INSTANCE: Operation = {
    "summary": "Delete the instance; its agents are disconnected (owner)",
    "operationId": "deleteInstance", "tags": ["owner"], "security": OWNER,
    "parameters": [INSTANCE_ID],
    "responses": {"204": {"description": "Deleted"}, **error_responses(400, 401, 403, 404, 503)},
}

INSTANCE_SETTINGS: Operation = {
    "summary": "What the owner may change, as it stands, the Dify API's parameters included (owner)",
    "description": "`introduction` and `variables` are the owner's (PATCH), else what the "
                   "instance's agent suggested; the public view does not show them.",
    "operationId": "instanceSettings", "tags": ["owner"], "security": OWNER,
    "parameters": [INSTANCE_ID],
    "responses": {"200": {"description": "The settings", "content": json_content(InstanceSettings)},
                  **error_responses(400, 401, 403, 404, 503)},
}

ROTATE_TOKEN: Operation = {
    "summary": "Rotate the agent token: the old one stops at once, its agents are closed (owner)",
    "operationId": "rotateToken", "tags": ["owner"], "security": OWNER,
    "parameters": [INSTANCE_ID],
    "responses": {"200": {"description": "The new token, shown once", "content": json_content(TokenRotated)},
                  **error_responses(400, 401, 403, 404, 503)},
}

CREATE_KEY: Operation = {
    "summary": "Create a caller API key; the key is shown once (owner)",
    "operationId": "createKey", "tags": ["owner"], "security": OWNER,
    "parameters": [INSTANCE_ID], "requestBody": request_body(CreateKeyRequest),
    "responses": {"201": {"description": "The new key", "content": json_content(CallerKeyCreated)},
                  **error_responses(400, 401, 403, 404, 413, 422, 503)},
}

LIST_KEYS: Operation = {
    "summary": "List caller keys, without secrets (owner)",
    "operationId": "listKeys", "tags": ["owner"], "security": OWNER, "parameters": [INSTANCE_ID],
    "responses": {"200": {"description": "The keys", "content": json_content(CallerKeyList)},
                  **error_responses(400, 401, 403, 404, 503)},
}

REVOKE_KEY: Operation = {
    "summary": "Revoke a caller key; it stops working at once (owner)",
    "operationId": "revokeKey", "tags": ["owner"], "security": OWNER,
    "parameters": [INSTANCE_ID, KEY_ID],
    "responses": {"204": {"description": "Revoked"}, **error_responses(400, 401, 403, 404, 503)},
}

RELAY_INFO: Operation = {
    "summary": "This relay: its public URL, version, and whether registering needs a key",
    "operationId": "relayInfo", "tags": ["ops"],
    "responses": {"200": {"description": "The relay", "content": json_content(RelayInfo)}},
}
HEALTHZ: Operation = {"summary": "Liveness", "operationId": "healthz", "tags": ["ops"],
                      "responses": {"200": {"description": "Alive", "content": json_content(Health)}}}
READYZ: Operation = {"summary": "Readiness (Redis reachable, not draining)", "operationId": "readyz",
                     "tags": ["ops"],
                     "responses": {"200": {"description": "Ready", "content": json_content(Ready)},
                                   **error_responses(503)}}
METRICS: Operation = {"summary": "Prometheus metrics of this node", "operationId": "metrics", "tags": ["ops"],
                      "responses": {"200": {"description": "Prometheus text format",
                                            "content": {"text/plain": {"schema": {"type": "string"}}}}}}
OPENAPI: Operation = {
    "summary": "This document", "operationId": "openapi", "tags": ["ops"],
    "responses": {"200": {"description": "OpenAPI 3.1",
                          "content": {"application/json": {"schema": {"type": "object"}}}}},
}


#: The agent websocket: not an HTTP operation, described under the document's ``x-websockets`` extension
#: so that HTTP tools and fuzzers leave it alone.
AGENT_CONNECT: dict[str, Any] = {
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
