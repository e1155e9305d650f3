"""The route table: every HTTP route of the relay, declared once.

An ``Endpoint`` is a path, the handler that answers it, and the OpenAPI
operation of each method it answers (built in ``relay.openapi``).  Starlette's
routes (``starlette_routes``, for ``app.create_app``) and the document's
``paths`` (``operations``, for ``build_openapi``) are both read off
``ENDPOINTS``, so a route cannot be served undocumented, nor documented
without being served.

Order matters where paths overlap: ``/api/instances/events`` comes before
``/api/instances/{instance_id}``.  The agent websocket has no HTTP operation
(the document lists it under ``x-websockets``); the dashboard's pages
(``relay.web.pages``, under ``x-pages``) come last, when the dashboard is on.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute

from relay.doors import dify, openai, relay_api, swiftchat, transcription
from relay.openapi import dify as dify_doc
from relay.openapi import openai as openai_doc
from relay.openapi import relay_api as relay_api_doc
from relay.openapi import swiftchat as swiftchat_doc
from relay.openapi import transcription as transcription_doc
from relay.openapi.common import Operation
from relay.openapi.document import document
from relay.services import Services
from relay.web import pages


class Handler(Protocol):
    """What every route's handler is: the request, and the node's parts it may use."""

    def __call__(self, request: Request, services: Services) -> Awaitable[Response]: ...


#: The methods an endpoint may answer, in the order the document lists them.
METHODS = ("get", "post", "patch", "delete")


@dataclass(frozen=True)
class Endpoint:
    """One route: a handler at a path, and the documented operation of each method it answers."""

    path: str
    handler: Handler
    get: Operation | None = None
    post: Operation | None = None
    patch: Operation | None = None
    delete: Operation | None = None

    def operations(self) -> dict[str, Operation]:
        """``{method: operation}``, methods in lower case as OpenAPI writes them."""
        found = {method: getattr(self, method) for method in METHODS}
        return {method: operation for method, operation in found.items() if operation is not None}


def dify_endpoints(base: str) -> tuple[Endpoint, ...]:
    """The Dify chat-app API at ``base``: an instance's chat URL, or ``/v1`` (the caller key's instance)."""
    documented = dify_doc.dify_operations(base)
    return (
        Endpoint(f"{base}/chat-messages", dify.chat_messages, post=documented.chat),
        Endpoint(f"{base}/messages", dify.list_messages, get=documented.messages),
        Endpoint(f"{base}/messages/{{message_id}}/feedbacks", dify.message_feedback, post=documented.feedback),
        Endpoint(f"{base}/conversations", dify.list_conversations, get=documented.conversations),
        Endpoint(f"{base}/conversations/{{conversation_id}}/name", dify.rename_conversation,
                 post=documented.rename),
        Endpoint(f"{base}/conversations/{{conversation_id}}", dify.delete_conversation, delete=documented.delete),
        Endpoint(f"{base}/parameters", dify.parameters, get=documented.parameters),
        Endpoint(f"{base}/audio-to-text", dify.audio_to_text, post=documented.audio),
    )


ENDPOINTS: tuple[Endpoint, ...] = (
    # The relay's own API: instances, and their owners' actions.
    Endpoint("/api/instances", relay_api.register_instance, post=relay_api_doc.REGISTER_INSTANCE),
    Endpoint("/api/instances", relay_api.list_instances, get=relay_api_doc.LIST_INSTANCES),
    Endpoint("/api/instances/events", relay_api.instance_events, get=relay_api_doc.INSTANCE_EVENTS),
    Endpoint("/api/instances/{instance_id}", relay_api.get_instance, get=relay_api_doc.GET_INSTANCE),
    Endpoint("/api/instances/{instance_id}", relay_api.update_instance, patch=relay_api_doc.UPDATE_INSTANCE),
    Endpoint("/api/instances/{instance_id}", relay_api.delete_instance, delete=relay_api_doc.DELETE_INSTANCE),
    Endpoint("/api/instances/{instance_id}/settings", relay_api.instance_settings,
             get=relay_api_doc.INSTANCE_SETTINGS),
    Endpoint("/api/instances/{instance_id}/token", relay_api.rotate_token, post=relay_api_doc.ROTATE_TOKEN),
    Endpoint("/api/instances/{instance_id}/keys", relay_api.create_key, post=relay_api_doc.CREATE_KEY),
    Endpoint("/api/instances/{instance_id}/keys", relay_api.list_keys, get=relay_api_doc.LIST_KEYS),
    Endpoint("/api/instances/{instance_id}/conversations", dify.purge, delete=dify_doc.PURGE_CONVERSATIONS),
    Endpoint("/api/instances/{instance_id}/keys/{key_id}", relay_api.revoke_key, delete=relay_api_doc.REVOKE_KEY),
    # The OpenAI doors per instance (Second Me's URL), and the Dify API beside them.
    Endpoint("/api/chat/{instance_id}", openai.instance_chat, post=openai_doc.CHAT),
    Endpoint("/api/chat/{instance_id}/chat/completions", openai.instance_chat, post=openai_doc.CHAT_COMPLETIONS),
    Endpoint("/api/chat/{instance_id}/models", openai.instance_models, get=openai_doc.MODELS),
    Endpoint("/api/chat/{instance_id}/images/generations", openai.instance_images, post=openai_doc.IMAGES),
    Endpoint("/api/chat/{instance_id}/audio/transcriptions", transcription.instance_transcriptions,
             post=transcription_doc.INSTANCE_TRANSCRIPTIONS),
    *dify_endpoints("/api/chat/{instance_id}"),
    # ... and at one base URL for all (the instance named by `model`, or the caller key).
    Endpoint("/v1/chat/completions", openai.global_chat, post=openai_doc.GLOBAL_CHAT),
    Endpoint("/v1/models", openai.global_models, get=openai_doc.GLOBAL_MODELS),
    Endpoint("/v1/images/generations", openai.global_images, post=openai_doc.GLOBAL_IMAGES),
    Endpoint("/v1/audio/transcriptions", transcription.global_transcriptions,
             post=transcription_doc.GLOBAL_TRANSCRIPTIONS),
    *dify_endpoints("/v1"),
    # SwiftChat's backend API at the root.
    Endpoint("/api/converse", swiftchat.converse, post=swiftchat_doc.CONVERSE),
    Endpoint("/api/models", swiftchat.models, get=swiftchat_doc.MODELS, post=swiftchat_doc.MODELS_POST),
    Endpoint("/api/image", swiftchat.image, post=swiftchat_doc.IMAGE),
    Endpoint("/api/upgrade", swiftchat.upgrade, get=swiftchat_doc.UPGRADE, post=swiftchat_doc.UPGRADE_POST),
    # The node itself.
    Endpoint("/api/relay", relay_api.relay_info, get=relay_api_doc.RELAY_INFO),
    Endpoint("/healthz", relay_api.healthz, get=relay_api_doc.HEALTHZ),
    Endpoint("/readyz", relay_api.readyz, get=relay_api_doc.READYZ),
    Endpoint("/metrics", relay_api.metrics_endpoint, get=relay_api_doc.METRICS),
    Endpoint("/openapi.json", relay_api.openapi, get=relay_api_doc.OPENAPI),
)

#: The agent websocket (``services.gateway``).
AGENT_SOCKET = "/api/agent/connect"
#: The websockets, as the document's ``x-websockets`` describes them.
WEBSOCKETS: dict[str, dict[str, Any]] = {AGENT_SOCKET: relay_api_doc.AGENT_CONNECT}


def route(endpoint: Endpoint, services: Services) -> Route:
    """Starlette's route for an endpoint: the one place a handler is bound (to this node's ``services``)."""
    return Route(endpoint.path, functools.partial(endpoint.handler, services=services),
                 methods=[method.upper() for method in endpoint.operations()])


def starlette_routes(services: Services, *, with_dashboard: bool) -> list[BaseRoute]:
    """Every route of the app: the table's, the agent websocket, and the dashboard's pages when it is on."""
    return [
        *(route(endpoint, services) for endpoint in ENDPOINTS),
        WebSocketRoute(AGENT_SOCKET, services.gateway),
        *(pages.routes() if with_dashboard else []),
    ]


def operations() -> dict[str, dict[str, Operation]]:
    """The document's ``paths``: ``{path: {method: operation}}``, in the table's order."""
    paths: dict[str, dict[str, Operation]] = {}
    for endpoint in ENDPOINTS:
        paths.setdefault(endpoint.path, {}).update(endpoint.operations())
    return paths


def build_openapi(base_url: str) -> dict[str, Any]:
    """The OpenAPI document of this table, served at ``GET /openapi.json``."""
    return document(base_url, operations(), WEBSOCKETS)
