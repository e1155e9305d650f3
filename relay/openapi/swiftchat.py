"""SwiftChat's operations: Converse, its model list, images, and the upgrade check (agents ask it too)."""

from __future__ import annotations

from typing import Any

from relay.bodies.swiftchat import (
    ConverseRequest,
    SwiftChatImageRequest,
    SwiftChatImageResponse,
    SwiftChatModels,
    UpgradeInfo,
)
from relay.openapi.common import (
    AGENT_ERRORS,
    CALLER,
    IMAGES_NOTE,
    Operation,
    error_responses,
    json_content,
    request_body,
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

CONVERSE: Operation = {
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
    "requestBody": request_body(ConverseRequest),
    "responses": {
        "200": {
            "description": "Not Server-Sent Events, despite the media type (SwiftChat's own "
                           "backend's format): the answer text as it is generated, then one last "
                           "line, ``\\n{\"inputTokens\": N, \"outputTokens\": N, "
                           "\"totalTokens\": N}``; a failure after the answer began ends the body "
                           "with ``Error: <message>`` instead.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **error_responses(*AGENT_ERRORS, dialect="text"),
    },
}


#: Whose models ``/api/models`` lists.
MODELS_RULE = ("With a caller key as the API key, its instance's models by their plain names; without, "
               "those of the first 100 online public instances, as '<instance_id>/<model>'.")
_MODELS: Operation = {
    "summary": "SwiftChat: the instance's text and image models", "description": MODELS_RULE,
    "tags": ["swiftchat"], "security": CALLER,
    "responses": {"200": {"description": "Models", "content": json_content(SwiftChatModels)},
                  **error_responses(400, 401, 403, 404, 503, dialect="swiftchat")},
}
MODELS: Operation = {**_MODELS, "operationId": "swiftchatModels"}
MODELS_POST: Operation = {**_MODELS, "operationId": "swiftchatModelsPost",
                          "description": f"{MODELS_RULE} A body is ignored."}


IMAGE: Operation = {
    "summary": "SwiftChat: generate one image",
    "description": "The instance is named by `modelId`, as on /api/converse. " + IMAGES_NOTE,
    "operationId": "swiftchatImage", "tags": ["swiftchat"], "security": CALLER,
    "requestBody": request_body(SwiftChatImageRequest),
    "responses": {"200": {"description": "The image", "content": json_content(SwiftChatImageResponse)},
                  **error_responses(*AGENT_ERRORS, dialect="swiftchat")},
}

UPGRADE_ANSWER: dict[str, Any] = {"200": {"description": "What this relay ships", "content": json_content(UpgradeInfo)}}
# Only `version` is a parameter here: whether it is checked depends on `os`,
# and no schema can tie one query parameter to another.
UPGRADE: Operation = {
    "summary": "The agent version and protocol versions this relay ships",
    "description": "`version`: an agent's version, answered with whether to upgrade. An `os` "
                   "parameter other than 'agent' turns the check off, as described on POST.",
    "operationId": "upgrade", "tags": ["ops"],
    "parameters": [{"name": "version", "in": "query", "description": "A version such as 0.2.0",
                    "schema": {"type": "string", "pattern": VERSION_PATTERN}}],
    "responses": {**UPGRADE_ANSWER, **error_responses(422, dialect="swiftchat")},
}
UPGRADE_POST: Operation = {
    "summary": "The agent version and protocol versions this relay ships (SwiftChat's form)",
    "description": "An empty body means no question; query parameters are read as on GET, and "
                   "the body's fields win.",
    "operationId": "upgradePost", "tags": ["ops"],
    "requestBody": {"required": False,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/"
                                                                        "UpgradeRequest"}}}},
    "responses": {**UPGRADE_ANSWER, **error_responses(400, 413, 422, dialect="swiftchat")},
}
