"""The OpenAI doors: per instance (``/api/chat/{id}/...``) and global (``/v1/...``).

Both run the same operations through the same admission (``serving/admission.py``); they
differ in where the instance comes from and in two defaults:

=====================  ===================================  ==========================
                       ``/api/chat/{id}`` (Second Me)        ``/v1`` (OpenAI)
=====================  ===================================  ==========================
instance               the path                             ``model`` or the caller key
``stream`` left out    SSE, unless ``Accept`` asks for      one ``chat.completion``
                       JSON only (OpenAI's SDKs do)
unknown ``model``      the agent's default model            404 ``model_not_found``
=====================  ===================================  ==========================

Images (``.../images/generations``) are the ``images`` operation, run only
by agents that declared it (501 otherwise).
"""

from __future__ import annotations

import base64
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

import wire
from relay.bodies.openai import ChatRequest, ImageRequest
from relay.errors import ORJSONResponse
from relay.inputs import bearer_token, client_ip, int_param, read_json, validate
from relay.services import Services
from relay.serving.admission import Admitted
from relay.serving.claims import Claim
from relay.serving.operations import answer_json, prefers_event_stream, run_op
from relay.serving.request_limits import check_chat_request
from relay.serving.sessions import resolve_model
from relay.serving.targets import Target
from relay.store.registry import union

#: Instances per page of ``GET /v1/models`` without a caller key.
MODELS_PAGE_DEFAULT, MODELS_PAGE_MAX = 100, 500


# -- chat ------------------------------------------------------------------------


async def instance_chat(request: Request, services: Services) -> Response:
    """``POST /api/chat/{id}`` and ``/api/chat/{id}/chat/completions``."""
    settings = services.settings
    admitted = await services.admission.admit(request, request.path_params["instance_id"])
    chat = validate(ChatRequest, await read_json(request, settings.max_body_bytes, services.settings.max_json_depth))
    chat.stream_default(prefers_event_stream(request.headers.get("accept")))
    check_chat_request(chat, settings)
    return await services.admission.leased(
        admitted, lambda claim: _run_chat(request, services, admitted, claim, chat, ""))


async def global_chat(request: Request, services: Services) -> Response:
    """``POST /v1/chat/completions``: the instance is named by ``model`` (or the caller key)."""
    data, target, admitted = await services.admission.admit_named(request)
    chat = validate(ChatRequest, data)
    chat.stream_default(False)  # OpenAI's default
    check_chat_request(chat, services.settings)
    return await services.admission.leased(admitted,
                        lambda claim: _run_chat(request, services, admitted, claim, chat, target.model))


async def _run_chat(request: Request, services: Services, admitted: Admitted, claim: Claim, chat: ChatRequest,
                    model: str) -> Response:

    def body_for(models: tuple[str, ...]) -> dict[str, Any]:
        # A named model was matched by the pick; otherwise fall back to the agent's default.
        return chat.upstream_body(model or resolve_model(models, chat.model))

    return await run_op(services.router, admitted.instance_id, wire.OP_CHAT, body_for, services.settings,
                        request.receive, stream=bool(chat.stream), claim=claim, model=model)


# -- images ----------------------------------------------------------------------


async def instance_images(request: Request, services: Services) -> Response:
    """``POST /api/chat/{id}/images/generations``."""
    admitted = await services.admission.admit(request, request.path_params["instance_id"])
    settings = services.settings
    body = validate(ImageRequest, await read_json(request, settings.max_body_bytes, settings.max_json_depth))
    return await services.admission.leased(
        admitted, lambda claim: _run_images(request, services, admitted, claim, body, ""))


async def global_images(request: Request, services: Services) -> Response:
    """``POST /v1/images/generations``."""
    data, target, admitted = await services.admission.admit_named(request)
    body = validate(ImageRequest, data)
    return await services.admission.leased(admitted,
                        lambda claim: _run_images(request, services, admitted, claim, body, target.model))


async def generate_images(request: Request, services: Services, admitted: Admitted, claim: Claim, body: ImageRequest,
                          model: str) -> tuple[bytes, dict[str, Any]] | None:
    """Run the ``images`` operation: the agent's ImagesResponse (items carry ``b64_json``), as
    bytes and parsed; None when the caller left meanwhile."""

    def body_for(models: tuple[str, ...]) -> dict[str, Any]:
        return body.upstream_body(model or resolve_model(models, body.model))

    answer = await run_op(services.router, admitted.instance_id, wire.OP_IMAGES, body_for, services.settings,
                          request.receive, stream=False, claim=claim, model=model)
    if answer.status_code != 200:
        return None
    return bytes(answer.body), answer_json(answer)


async def _run_images(request: Request, services: Services, admitted: Admitted, claim: Claim, body: ImageRequest,
                      model: str) -> Response:
    generated = await generate_images(request, services, admitted, claim, body, model)
    if generated is None:
        return Response(status_code=499)  # the caller left while the image was made
    raw, document = generated
    if body.response_format != "url":
        return Response(raw, media_type="application/json")
    # The agent's upstream URLs would point into the owner's network, so the
    # agent sends the image itself; a caller that asked for a URL gets a data: URL.
    items = document.get("data")
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and isinstance(item.get("b64_json"), str):
            data = item.pop("b64_json")
            item["url"] = f"data:{image_type(data)};base64,{data}"
    return ORJSONResponse(document)


def image_type(b64: str) -> str:
    """The media type of a base64 image, from its first bytes."""
    try:
        head = base64.b64decode(b64[:16] + "=" * (-len(b64[:16]) % 4))
    except ValueError:  # not base64 at all: the agent's business, label it as the common case
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"RIFF") and b64.startswith("UklGR"):
        return "image/webp"
    if head.startswith(b"GIF8"):
        return "image/gif"
    return "image/png"


# -- models ------------------------------------------------------------------------


def served_models(view: dict[str, Any]) -> list[str]:
    """Every model an instance's agents serve, for a model list: chat, then image, then transcription models."""
    return union(view.get(field, ()) for field in ("models", "image_models", "transcribe_models"))


def model_card(name: str, created: Any, owner: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(created), "owned_by": owner}


async def instance_models(request: Request, services: Services) -> Response:
    """``GET /api/chat/{id}/models``: that instance's models (chat, then image models)."""
    instance_id = request.path_params["instance_id"]
    await services.access.authorize_caller(instance_id, bearer_token(request), client_ip(request))
    view = await services.registry.view(instance_id)
    names = served_models(view)
    return ORJSONResponse({"object": "list",
                           "data": [model_card(n, view["created_at"], view["instance_id"]) for n in names]})


async def global_models(request: Request, services: Services) -> Response:
    """``GET /v1/models``: with a caller key, its instance's models as plain names;
    without, the online public instances' ``<id>/<model>`` names, a page of instances at a time (a page
    ends early rather than carry more than ``registry.PAGE_MAX_NAMES`` names: follow ``next_cursor``)."""
    presented = bearer_token(request)
    keyed = await services.access.key_instance(presented)
    if keyed is not None:
        await services.access.authorize_caller(keyed, presented, client_ip(request))
        view = await services.registry.view(keyed)
        names = served_models(view)
        return ORJSONResponse({"object": "list", "has_more": False, "next_cursor": None,
                               "data": [model_card(n, view["created_at"], view["name"]) for n in names]})
    params = request.query_params
    limit = int_param(params, "limit", MODELS_PAGE_DEFAULT, 1, MODELS_PAGE_MAX)
    cursor = int_param(params, "after", 0, 0, 2**63 - 1)
    views, next_cursor = await services.registry.list(status="online", limit=limit, cursor=cursor)
    data = [
        model_card(Target(view["instance_id"], name).name(), view["created_at"], view["name"])
        for view in views
        for name in served_models(view)
    ]
    return ORJSONResponse({"object": "list", "data": data, "has_more": next_cursor is not None,
                           "next_cursor": next_cursor})
