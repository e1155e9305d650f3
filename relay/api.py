"""HTTP endpoints of the relay (everything but the agent websocket).

Handlers read their collaborators from ``request.app.state`` (set up by the
composition root in ``app.py``) and raise :mod:`relay.errors`; the single
exception handler at the bottom turns those into OpenAI-shaped responses.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from . import keys
from .access import bearer
from .chat import run_chat
from .errors import (
    InvalidRequest,
    ORJSONResponse,
    PayloadTooLarge,
    ServiceNotReady,
    ValidationFailed,
    error_response,
)
from .limits import Bucket, Lease, Slot, check_chat_request
from .models import (
    ChatRequest,
    CreateKeyRequest,
    RegisterRequest,
    UpdateInstanceRequest,
)
from .streams import cleanup_scope

#: Owner-action bodies are tiny: a name, a description.
SMALL_BODY_BYTES = 16 * 1024


def bearer_token(request: Request) -> str | None:
    """The request's bearer credential; 400 if one is offered in the URL instead."""
    return bearer(request.headers, request.query_params)


def client_ip(request: Request) -> str:
    # uvicorn sets this from X-Forwarded-For only for trusted proxies
    # (--forwarded-allow-ips / FORWARDED_ALLOW_IPS), so callers cannot spoof it.
    return request.client.host if request.client else "unknown"


async def read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None


def validate(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ValidationFailed(f"{where}: {first['msg']}", param=where) from None


# -- instances ---------------------------------------------------------------


async def register_instance(request: Request) -> Response:
    state = request.app.state
    state.access.check_registration(bearer_token(request))
    ip = client_ip(request)
    await state.rate_limiter.hit(
        [Bucket(keys.rate("register", ip), state.settings.rate_register_per_ip, "this address")])
    body = validate(RegisterRequest, await read_json(request, min(state.settings.max_body_bytes, SMALL_BODY_BYTES)))
    instance_id, token = await state.registry.register(body.name, body.description)
    return ORJSONResponse(
        {
            "instance_id": instance_id,
            "agent_token": token,
            "name": body.name,
            "status": "offline",
            "chat_url": state.registry.chat_url(instance_id),
        },
        status_code=201,
    )


async def get_instance(request: Request) -> Response:
    return ORJSONResponse(await request.app.state.registry.view(request.path_params["instance_id"]))


def _int_param(params: Any, name: str, default: int) -> int:
    raw = params.get(name) or ""
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValidationFailed(f"{name} must be an integer", param=name) from None


async def list_instances(request: Request) -> Response:
    params = request.query_params
    # An empty parameter (``?status=&limit=&cursor=``, as forms and scripts
    # send them) means its default; a bad one is named in the error.
    status = params.get("status") or None
    if status not in (None, "online", "offline"):
        raise ValidationFailed("status must be 'online' or 'offline'", param="status")
    limit = _int_param(params, "limit", 50)
    cursor = _int_param(params, "cursor", 0)
    if not 1 <= limit <= 500:
        raise ValidationFailed("limit must be between 1 and 500", param="limit")
    if cursor < 0:
        raise ValidationFailed("cursor must not be negative", param="cursor")
    data, next_cursor = await request.app.state.registry.list(status=status, limit=limit, cursor=cursor)
    return ORJSONResponse({"data": data, "next_cursor": next_cursor})


async def delete_instance(request: Request) -> Response:
    state = request.app.state
    instance_id = request.path_params["instance_id"]
    await state.registry.check_owner(instance_id, bearer_token(request))
    await state.registry.delete(instance_id)
    await state.access.purge(instance_id)
    await state.gateway.close_instance(instance_id, "instance deleted")
    return Response(status_code=204)


# -- owner actions (Bearer agent token) ------------------------------------------


async def _owner(request: Request) -> tuple[Any, str, str]:
    """(app state, instance id, owner token) once the token is checked; 401/403/404 otherwise."""
    state = request.app.state
    instance_id = request.path_params["instance_id"]
    token = bearer_token(request)
    await state.registry.check_owner(instance_id, token)
    return state, instance_id, token  # type: ignore[return-value]


async def update_instance(request: Request) -> Response:
    state, instance_id, _ = await _owner(request)
    changes = validate(UpdateInstanceRequest, await read_json(request, SMALL_BODY_BYTES))
    await state.access.update(instance_id, changes.model_dump(exclude_none=True))
    return ORJSONResponse(await state.registry.view(instance_id))


async def rotate_token(request: Request) -> Response:
    state, instance_id, token = await _owner(request)
    new_token = await state.access.rotate_token(instance_id, token)
    return ORJSONResponse({"instance_id": instance_id, "agent_token": new_token})


async def create_key(request: Request) -> Response:
    state, instance_id, _ = await _owner(request)
    body = validate(CreateKeyRequest, await read_json(request, SMALL_BODY_BYTES))
    return ORJSONResponse(await state.access.create_key(instance_id, body.name), status_code=201)


async def list_keys(request: Request) -> Response:
    state, instance_id, _ = await _owner(request)
    return ORJSONResponse({"data": await state.access.list_keys(instance_id)})


async def revoke_key(request: Request) -> Response:
    state, instance_id, _ = await _owner(request)
    await state.access.revoke_key(instance_id, request.path_params["key_id"])
    return Response(status_code=204)


# -- chat --------------------------------------------------------------------


async def chat_completions(request: Request) -> Response:
    state = request.app.state
    settings = state.settings
    instance_id = request.path_params["instance_id"]
    # Cheapest refusals first: who may call (404/401/403), how often (429),
    # then the body (413/400/422), then how many at once (429).
    caller = await state.access.authorize_caller(instance_id, bearer_token(request), client_ip(request))
    who = f"{instance_id}:{caller.identity}"
    await state.rate_limiter.hit([
        Bucket(keys.rate("caller", who), settings.rate_per_caller, "this caller"),
        Bucket(keys.rate("instance", instance_id), settings.rate_per_instance, "this instance"),
    ])
    chat = validate(ChatRequest, await read_json(request, settings.max_body_bytes))
    check_chat_request(chat, settings)
    lease = await state.stream_leases.acquire([
        Slot(keys.streams("instance", instance_id), settings.max_streams_per_instance, "this instance"),
        Slot(keys.streams("caller", who), settings.max_streams_per_caller, "this caller"),
    ])
    try:
        response = await run_chat(state.router, instance_id, chat, settings, request.receive)
    except BaseException:
        with cleanup_scope():
            await state.stream_leases.release(lease)
        raise
    return LeasedResponse(response, state.stream_leases, lease)


class LeasedResponse(Response):
    """A response that gives its stream lease back once fully sent (or abandoned)."""

    def __init__(self, inner: Response, leases: Any, lease: Lease):
        self.inner, self.leases, self.lease = inner, leases, lease
        self.status_code = inner.status_code
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.inner(scope, receive, send)
        finally:
            with cleanup_scope():
                await self.leases.release(self.lease)


async def list_models(request: Request) -> Response:
    state = request.app.state
    await state.access.authorize_caller(request.path_params["instance_id"], bearer_token(request), client_ip(request))
    view = await state.registry.view(request.path_params["instance_id"])
    created = int(view["created_at"])
    return ORJSONResponse(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": view["instance_id"]}
                for name in view["models"]
            ],
        }
    )


# -- health and documentation --------------------------------------------------


async def openapi(request: Request) -> Response:
    return ORJSONResponse(request.app.state.openapi)



async def healthz(request: Request) -> Response:
    return ORJSONResponse({"status": "ok", "node_id": request.app.state.node.node_id})


async def readyz(request: Request) -> Response:
    state = request.app.state
    if state.node.draining:
        raise ServiceNotReady("relay node is draining")
    try:
        await state.redis.ping()
    except (RedisError, OSError, TimeoutError) as exc:
        raise ServiceNotReady(f"redis unreachable: {type(exc).__name__}") from None
    return ORJSONResponse({"status": "ready", "node_id": state.node.node_id, "agents": len(state.sessions)})


# -- errors ------------------------------------------------------------------------


async def error_handler(request: Request, exc: Exception) -> Response:
    """The exception handler for everything a route may raise (see ``errors.as_relay_error``)."""
    return error_response(exc)
