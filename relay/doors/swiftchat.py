"""SwiftChat's backend API at the relay's root, run on the owner's model.

SwiftChat (github.com/aws-samples/swift-chat) is a chat app for phones and
desktops that talks to a small backend of its own.  Pointed at a relay, with
a caller key as its API key, it works unchanged:

* ``POST /api/converse``: Bedrock Converse messages in, the answer text
  streamed out, then one line of token usage (``relay.doors.converse`` translates
  both ways; the agent runs a plain OpenAI chat stream).
* ``POST /api/models``: the instance's text and image models.
* ``POST /api/image``: one generated image, base64 (the ``images`` operation).
* ``GET|POST /api/upgrade``: the relay's agent version and protocol versions
  (SwiftChat asks it about its own app: never "upgrade" for those).

The instance comes from the caller key, or from ``modelId``
``"<instance_id>/<model>"``.  Unlike ``/v1``, a model an instance does not
serve falls back to its default: the app starts with a Bedrock model id
selected until the user picks one of ours.  Errors keep their status codes
and read the way the app shows them (``errors.render_error``).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

import wire
from relay.bodies.openai import ChatRequest, ImageRequest
from relay.bodies.swiftchat import SwiftChatImage
from relay.doors.converse import ConverseStream, InvalidConverse, StreamFailed, UnsupportedContent, converse_request
from relay.doors.openai import generate_images
from relay.errors import ORJSONResponse, RelayError, UpstreamError, ValidationFailed
from relay.inputs import bearer_token, client_ip, read_json, validate
from relay.services import Services
from relay.serving.claims import Claim
from relay.serving.operations import run_op
from relay.serving.request_limits import check_chat_request
from relay.serving.sessions import resolve_model
from relay.serving.targets import Target

#: The command that upgrades an agent (``/api/upgrade`` and the agent's notice say it).
UPGRADE_COMMAND = "pip install -U instance-relay"


# -- converse ----------------------------------------------------------------------


class SwiftChatBody:
    """The agent's OpenAI stream as SwiftChat's body (an ``operations.BodyEncoder``)."""

    __slots__ = ("_stream", "_unsent")

    def __init__(self) -> None:
        self._stream = ConverseStream()
        self._unsent = b""  # text decoded from a payload that then failed

    def data(self, payload: bytes) -> bytes:
        try:
            return self._stream.feed(payload)
        except StreamFailed as exc:
            self._unsent = exc.text
            raise UpstreamError(exc.message) from None

    def done(self) -> bytes:
        return self._stream.finish()

    def error(self, error: RelayError) -> bytes:
        unsent, self._unsent = self._unsent, b""
        return unsent + ConverseStream.error(error.message)


async def converse(request: Request, services: Services) -> Response:
    """``POST /api/converse``."""
    settings = services.settings
    data, target, admitted = await services.admission.admit_named(request, "modelId")
    try:
        _, messages = converse_request(data)
    except UnsupportedContent as exc:
        raise ValidationFailed(f"{exc.path}: {exc.message}", param=exc.path, code="unsupported_content") from None
    except InvalidConverse as exc:
        raise ValidationFailed(str(exc), param=exc.path or None) from None
    # Usage is what the app shows after the answer: ask the model for it.
    chat = validate(ChatRequest, {"messages": messages, "stream": True, "stream_options": {"include_usage": True}})
    check_chat_request(chat, settings)

    def body_for(models: tuple[str, ...]) -> dict[str, Any]:
        return chat.upstream_body(resolve_model(models, target.model))

    async def run(claim: Claim) -> Response:
        return await run_op(services.router, admitted.instance_id, wire.OP_CHAT, body_for, settings, request.receive,
                            stream=True, claim=claim, encoder=SwiftChatBody())

    return await services.admission.leased(admitted, run)


# -- models ------------------------------------------------------------------------


async def models(request: Request, services: Services) -> Response:
    """``POST /api/models``: ``{"textModel": [...], "imageModel": [...]}``, each ``{modelId, modelName}``.

    With a caller key, its instance's models by their plain names (the key
    routes them); without, the online public instances', as ``<id>/<model>``: the directory's first
    page (SwiftChat does not page), so at most 100 instances and ``registry.PAGE_MAX_NAMES`` names.
    """
    presented = bearer_token(request)
    keyed = await services.access.key_instance(presented)
    if keyed is not None:
        await services.access.authorize_caller(keyed, presented, client_ip(request))
        views, named = [await services.registry.view(keyed)], False
    else:
        views, _ = await services.registry.list(status="online", limit=100)
        named = True

    def entries(view: dict[str, Any], field: str) -> list[dict[str, str]]:
        return [{"modelId": Target(view["instance_id"], m).name() if named else m,
                 "modelName": f"{m} ({view['name']})" if named else m} for m in view[field]]

    return ORJSONResponse({"textModel": [e for v in views for e in entries(v, "models")],
                           "imageModel": [e for v in views for e in entries(v, "image_models")]})


# -- image -------------------------------------------------------------------------


async def image(request: Request, services: Services) -> Response:
    """``POST /api/image``: ``{"image": "<base64>"}``."""
    data, target, admitted = await services.admission.admit_named(request, "modelId")
    body = validate(SwiftChatImage, data)
    if body.refImages:
        raise ValidationFailed("refImages: editing an image is not supported; send a prompt only",
                               param="refImages", code="unsupported_content")
    generation = ImageRequest(prompt=body.prompt, n=1, size=f"{body.width}x{body.height}",
                              model=target.model or None)

    async def run(claim: Claim) -> Response:
        generated = await generate_images(request, services, admitted, claim, generation, "")
        if generated is None:
            return Response(status_code=499)
        items = generated[1].get("data") or []
        b64 = items[0].get("b64_json") if isinstance(items, list) and items and isinstance(items[0], dict) else None
        if not isinstance(b64, str) or not b64:
            raise UpstreamError("the model returned no image", code="empty_image")
        return ORJSONResponse({"image": b64})

    return await services.admission.leased(admitted, run)


# -- upgrade -----------------------------------------------------------------------


async def upgrade(request: Request, services: Services) -> Response:
    """``GET|POST /api/upgrade``: what agent version and protocols this relay ships.

    ``needUpgrade`` compares ``version`` (query or body) with the latest agent
    version, for agents (no ``os``, or ``"os": "agent"``).  SwiftChat sends
    its app's own version with ``os`` ``android``/``mac``/``ios``: the relay
    knows nothing of those releases and never says upgrade.
    """
    asked: dict[str, Any] = dict(request.query_params)
    if request.method == "POST":
        body = await read_json(request, 16 * 1024, services.settings.max_json_depth, empty={})
        if isinstance(body, dict):
            asked.update(body)
    version, os_name = asked.get("version"), asked.get("os") or "agent"
    latest = wire.__version__
    need = False
    if version is not None and os_name == "agent":
        if not isinstance(version, str) or not wire.parse_version(version):
            raise ValidationFailed("version: not a version like 0.2.0", param="version")
        need = wire.parse_version(version) < wire.parse_version(latest)
    return ORJSONResponse({
        "needUpgrade": need,
        "version": latest,
        "url": "",
        "agent": {"latest_version": latest, "upgrade_command": UPGRADE_COMMAND},
        "protocol": {"latest": wire.PROTOCOL_VERSION, "oldest": min(wire.SUPPORTED_VERSIONS),
                     "supported": sorted(wire.SUPPORTED_VERSIONS)},
    })
