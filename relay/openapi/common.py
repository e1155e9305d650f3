"""What every part of the document is built with: references, error responses, parameters, security.

An operation is a plain dict, as OpenAPI 3.1 writes it; ``relay.routes`` pairs
each with the route it describes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from relay.bodies.openai import ErrorResponse
from relay.bodies.swiftchat import SwiftChatError

#: One OpenAPI operation (``summary``, ``operationId``, ``responses`` ...).
Operation = dict[str, Any]

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


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def json_content(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": ref(model)}}


#: How errors read on a route (``errors.render_error``): OpenAI's body everywhere,
#: except SwiftChat's routes, which keep SwiftChat's own backend's shapes.
ERROR_BODIES: dict[str, dict[str, Any]] = {
    "openai": json_content(ErrorResponse),
    "swiftchat": json_content(SwiftChatError),
    "text": {"text/plain": {"schema": {"type": "string", "pattern": "^Error: ",
                                       "description": "Error: <message>"}}},
}


def error_responses(*statuses: int, dialect: str = "openai",
                    meaning: dict[int, str] | None = None) -> dict[str, Any]:
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


def path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string", "pattern": ID_PATTERN}}


def cursor_param(name: str) -> dict[str, Any]:
    """The query parameter that asks for the page after the one whose ``next_cursor`` it gives."""
    return {"name": name, "in": "query", "allowEmptyValue": True, "description": "``next_cursor`` of the previous page",
            "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"}}


INSTANCE_ID = path_param("instance_id", "Instance id, as returned at registration")
KEY_ID = path_param("key_id", "Caller key id, as returned when the key was created")
OWNER: list[dict[str, list[str]]] = [{"agentToken": []}]
CALLER: list[dict[str, list[str]]] = [{}, {"callerKey": []}]  # public instances need nothing; private ones a caller key


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": json_content(model)}


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

#: What every image operation says about where it runs and what ``response_format: url`` gets.
IMAGES_NOTE = (
    "Runs on an agent that declared the images operation (501 capability_not_supported when none of the "
    "instance's agents did). The agent sends every image inline, so ``response_format: url`` gets ``data:`` URLs."
)
