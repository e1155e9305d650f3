"""The relay's OpenAPI 3.1 document, served at ``GET /openapi.json``.

Schemas come from the pydantic models of :mod:`relay.bodies` (the same models
that validate requests), so the document cannot drift from what the relay
accepts.  Where a door checks more than its model before validating (the
global doors read the instance out of ``model``/``modelId`` first), the
document's schema is a subclass of the model that says so; ``/api/converse``
is checked by ``relay.doors.converse``, which ``ConverseRequest`` describes; and
the bodies read by hand have hand-written schemas: ``/api/upgrade``'s, the
Dify ``DELETE …/conversations/{id}`` body, and the audio doors' multipart
forms (from ``relay.doors.transcription``'s own bounds).

The operations are built beside each other by door family (``relay_api``,
``openai``, ``transcription``, ``swiftchat``, ``dify``, with what they share in
``common``); ``relay.routes`` pairs each with its route, and hands this module
the table's ``paths``, with the statuses each operation can answer.
``tests/test_openapi.py`` checks that every route of the app is in the table
and runs schemathesis against the document.

The agent websocket (``GET /api/agent/connect``) is not an HTTP operation; it
is described under the ``x-websockets`` extension so that HTTP tools and
fuzzers leave it alone; the web dashboard's pages (HTML for browsers, and
absent when ``RELAY_DASHBOARD=false``) under ``x-pages``.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from relay import __version__
from relay.bodies import dify, instances, openai, swiftchat
from relay.openapi.common import ERROR_BODIES, Operation
from relay.openapi.swiftchat import UPGRADE_REQUEST

REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    instances.RegisterRequest, instances.UpdateInstanceRequest, instances.CreateKeyRequest, openai.ChatRequest,
    openai.GlobalChatRequest, openai.ImageRequest, openai.GlobalImageRequest, swiftchat.ConverseRequest,
    swiftchat.SwiftChatImageRequest, dify.DifyChatRequest, dify.DifyRename, dify.DifyFeedback,
)
RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    instances.Registered, instances.InstanceView, instances.InstancePage, instances.TokenRotated,
    instances.CallerKey, instances.CallerKeyCreated, instances.CallerKeyList, openai.ChatCompletion,
    openai.ModelList, openai.ModelPage, openai.ImagesResponse, openai.ErrorResponse, instances.Health,
    instances.Ready, swiftchat.SwiftChatModels, swiftchat.SwiftChatImageResponse, swiftchat.SwiftChatError,
    swiftchat.UpgradeInfo, dify.DifyAnswer, dify.DifyMessageEvent, dify.DifyMessageEndEvent, dify.DifyErrorEvent,
    dify.DifyMessagePage, dify.DifyConversationPage, dify.DifyRenamed, dify.DifyResult, dify.DifyParameters,
    dify.ConversationsPurged, openai.Transcription, instances.RelayInfo, instances.InstanceSettings,
    instances.InstanceDeleted,
)

#: What the HTTP edge answers on every route (``server.edge.EdgeProtocol``, ``telemetry.requests.body_deadline``).
EDGE_MEANING = {
    408: "The request's header block took longer than RELAY_HEADER_TIMEOUT, or its body paused longer than "
         "RELAY_BODY_TIMEOUT (request_timeout); the connection is closed",
    431: "The request's header block (request line, names and values) is past RELAY_MAX_HEADER_BYTES "
         "(headers_too_large); the connection is closed",
}


def with_edge_errors(operation: Operation) -> Operation:
    """A copy of an operation, with the edge's 408 and 431 added to its responses.

    A 431 and a header timeout's 408 are written before any route is known,
    in OpenAI's shape; a body's 408 is the route's own error, in its dialect.
    """
    operation = copy.deepcopy(operation)  # the table's operations are shared constants
    openai = ERROR_BODIES["openai"]["application/json"]
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
    return operation


#: The web dashboard (``relay.web.pages``): HTML pages and their assets, for browsers, not API operations.
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


def document(base_url: str, paths: dict[str, dict[str, Operation]],
             websockets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The whole document, from the route table's ``paths`` and websockets (``relay.routes.build_openapi``)."""
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
        "paths": {path: {method: with_edge_errors(operation) for method, operation in item.items()}
                  for path, item in paths.items()},
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
        "x-websockets": copy.deepcopy(websockets),
        "x-pages": PAGES,
    }
