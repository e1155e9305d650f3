"""The OpenAI doors' operations: chat completions, model lists and images, per instance and at /v1."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from relay.bodies.openai import (
    ChatCompletion,
    ChatRequest,
    GlobalChatRequest,
    GlobalImageRequest,
    ImageRequest,
    ImagesResponse,
    ModelList,
    ModelPage,
)
from relay.openapi.common import (
    AGENT_ERRORS,
    CALLER,
    GLOBAL_MODEL_RULE,
    IMAGES_NOTE,
    INSTANCE_ID,
    Operation,
    cursor_param,
    error_responses,
    json_content,
    ref,
    request_body,
)

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


def _chat_operation(summary: str, operation_id: str, body: type[BaseModel], stream_default: str,
                    parameters: list[dict[str, Any]], description: str | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "operationId": operation_id,
        "tags": ["chat"],
        "security": CALLER,
        "parameters": parameters,
        "requestBody": request_body(body),
        "responses": {
            "200": {
                "description": f"``stream: true``{stream_default}: Server-Sent Events, each "
                               "``data: {chat.completion.chunk}``, ending with ``data: [DONE]``. "
                               "``stream: false``: one ``chat.completion``.",
                "content": {
                    "text/event-stream": {"schema": SSE_EVENT},
                    "application/json": {"schema": ref(ChatCompletion)},
                },
            },
            **error_responses(*AGENT_ERRORS),
        },
    }
    if description:
        operation["description"] = description
    return operation


def _images_operation(summary: str, operation_id: str, body: type[BaseModel], parameters: list[dict[str, Any]],
                      description: str) -> dict[str, Any]:
    return {
        "summary": summary, "operationId": operation_id, "tags": ["images"], "security": CALLER,
        "description": description, "parameters": parameters, "requestBody": request_body(body),
        "responses": {"200": {"description": "The images, inline (``b64_json``) or as ``data:`` URLs "
                                             "(``response_format: url``)", "content": json_content(ImagesResponse)},
                      **error_responses(*AGENT_ERRORS)},
    }


#: An instance's chat URL streams unless told not to (Second Me's callers expect SSE).
PER_INSTANCE = " (the default when left out, unless ``Accept`` asks for JSON only)"
CHAT = _chat_operation("Chat completion (OpenAI-compatible)", "chat", ChatRequest, PER_INSTANCE, [INSTANCE_ID])
CHAT_COMPLETIONS = _chat_operation("Chat completion (OpenAI SDK path)", "chatCompletions", ChatRequest, PER_INSTANCE,
                                   [INSTANCE_ID])
GLOBAL_CHAT = _chat_operation("Chat completion on any instance (OpenAI base URL)", "globalChat",
                              GlobalChatRequest, "", [], GLOBAL_MODEL_RULE + " `stream` defaults to false.")

MODELS: Operation = {
    "summary": "OpenAI model list of the instance",
    "operationId": "listModels", "tags": ["chat"], "security": CALLER, "parameters": [INSTANCE_ID],
    "responses": {"200": {"description": "Models", "content": json_content(ModelList)},
                  **error_responses(400, 401, 403, 404, 503)},
}

GLOBAL_MODELS: Operation = {
    "summary": "OpenAI model list: a caller key's instance, or every online public instance",
    "description": "With a caller key as the API key: its instance's models, by their plain names, "
                   "in one page. Without: the models of online public instances as "
                   "'<instance_id>/<model>', a page of `limit` instances at a time.",
    "operationId": "globalModels", "tags": ["chat"], "security": CALLER,
    "parameters": [
        {"name": "limit", "in": "query", "allowEmptyValue": True,
         "description": "Instances per page (without a caller key)",
         "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 100}},
        cursor_param("after"),
    ],
    "responses": {"200": {"description": "One page of models", "content": json_content(ModelPage)},
                  **error_responses(400, 401, 403, 404, 422, 503)},
}

IMAGES = _images_operation(
    "Image generation (OpenAI-compatible)", "images", ImageRequest, [INSTANCE_ID], IMAGES_NOTE)
GLOBAL_IMAGES = _images_operation(
    "Image generation on any instance (OpenAI base URL)", "globalImages", GlobalImageRequest, [],
    f"{GLOBAL_MODEL_RULE} {IMAGES_NOTE}")
