"""HTTP endpoints of the relay: instances, owner actions, health.

The doors that run operations on an instance's agents are ``openai_doors.py``
and ``swiftchat.py``; the agent websocket is ``gateway.py``.

Handlers read their collaborators from ``request.app.state`` (set up by the
composition root in ``app.py``) and raise :mod:`relay.errors`; the single
exception handler at the bottom turns those into OpenAI-shaped responses.
"""

from __future__ import annotations

from typing import Any

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

import wire
from relay.bodies.instances import CreateKeyRequest, RegisterRequest, UpdateInstanceRequest
from relay.errors import ORJSONResponse, ServiceNotReady, ValidationFailed, render_error
from relay.inputs import SMALL_BODY_BYTES, bearer_token, client_ip, int_param, read_json, validate
from relay.serving.operations import SSE_HEADERS
from relay.serving.targets import INSTANCE_ID
from relay.store import keys
from relay.store.rates import Bucket
from relay.web.live import MAX_IDS, WatchResponse

#: A directory search's longest query.
MAX_QUERY_CHARS = 100
#: Seconds between SSE comments on an idle status stream (proxies cut silent connections).
KEEPALIVE_SECONDS = 15.0

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


async def list_instances(request: Request) -> Response:
    params = request.query_params
    # An empty parameter (``?status=&limit=&cursor=``, as forms and scripts
    # send them) means its default; a bad one is named in the error.
    status = params.get("status") or None
    if status not in (None, "online", "offline"):
        raise ValidationFailed("status must be 'online' or 'offline'", param="status")
    limit = int_param(params, "limit", 50, 1, 500)
    cursor = int_param(params, "cursor", 0, 0, 2**63 - 1)
    query = (params.get("q") or "").strip()
    if len(query) > MAX_QUERY_CHARS:
        raise ValidationFailed(f"q: at most {MAX_QUERY_CHARS} characters", param="q")
    data, next_cursor = await request.app.state.registry.list(
        status=status, limit=limit, cursor=cursor, query=query)
    return ORJSONResponse({"data": data, "next_cursor": next_cursor})


async def instance_events(request: Request) -> Response:
    """Server-Sent Events: the views of the given instances, again whenever one changes."""
    state = request.app.state
    raw = request.query_params.get("ids") or ""
    ids = list(dict.fromkeys(part for part in raw.split(",") if part))
    if not ids:
        raise ValidationFailed("ids: give one or more instance ids, comma-separated", param="ids")
    if len(ids) > MAX_IDS:
        raise ValidationFailed(f"ids: at most {MAX_IDS} instances per stream", param="ids")
    if not all(INSTANCE_ID.fullmatch(iid) for iid in ids):
        raise ValidationFailed("ids: an instance id is 16 hexadecimal digits", param="ids")
    if state.node.draining:
        raise ServiceNotReady("relay node is draining", headers={"Retry-After": "1"})
    watcher = state.watch.open(ids, client_ip(request))  # 429/503 here, before the response starts
    return WatchResponse(state.watch, watcher, KEEPALIVE_SECONDS, SSE_HEADERS)


async def relay_info(request: Request) -> Response:
    """What a client (the dashboard) needs to know about this relay before it asks anything."""
    state = request.app.state
    return ORJSONResponse({
        "base_url": state.settings.base_url(),
        "version": wire.__version__,
        "registration": "key_required" if state.settings.registration_key else "open",
    })


async def delete_instance(request: Request) -> Response:
    state = request.app.state
    instance_id = request.path_params["instance_id"]
    await state.registry.check_owner(instance_id, bearer_token(request))
    # What hangs off the instance first, its record last (in registry.delete):
    # a deletion cut short by Redis can be asked again by the same owner.
    await state.access.purge(instance_id)
    await state.conversations.purge_instance(instance_id)
    await state.registry.delete(instance_id)
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
    await state.access.update(instance_id, changes.stored())
    return ORJSONResponse(await state.registry.view(instance_id))


async def instance_settings(request: Request) -> Response:
    """What the owner may change, as it stands (the conversation parameters are not in the public view)."""
    state, instance_id, _ = await _owner(request)
    view = await state.registry.view(instance_id)
    found = await state.registry.parameters(instance_id)
    return ORJSONResponse({
        "name": view["name"], "description": view["description"], "visibility": view["visibility"],
        "introduction": found["introduction"], "variables": found["variables"],
        "conversations": found["conversations"],
    })


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


# -- health and documentation --------------------------------------------------


async def openapi(request: Request) -> Response:
    return ORJSONResponse(request.app.state.openapi)


async def healthz(request: Request) -> Response:
    return ORJSONResponse({"status": "ok", "node_id": request.app.state.node.node_id})


async def readyz(request: Request) -> Response:
    state = request.app.state
    if state.node.draining:
        raise ServiceNotReady("relay node is draining")
    if not state.node.layout_ready:
        raise ServiceNotReady("relay node is checking the key layout in Redis (relay.store.migrate)")
    try:
        await state.redis.ping()
    except (RedisError, OSError, TimeoutError) as exc:
        raise ServiceNotReady(f"redis unreachable: {type(exc).__name__}") from None
    return ORJSONResponse({"status": "ready", "node_id": state.node.node_id, "agents": len(state.sessions)})


# -- errors ------------------------------------------------------------------------


async def error_handler(request: Request, exc: Exception) -> Response:
    """The exception handler for everything a route may raise (see ``errors.as_relay_error``)."""
    return render_error(request.url.path, exc)
