"""HTTP endpoints of the relay: instances, owner actions, health.

The doors that run operations on an instance's agents are the other modules
of :mod:`relay.doors`; the agent websocket is :mod:`relay.serving.gateway`.

Handlers get their collaborators as ``services`` (built by the composition
root, ``app.py``) and raise :mod:`relay.errors`; the single exception
handler at the bottom turns those into OpenAI-shaped responses.
"""

from __future__ import annotations

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

import wire
from relay.bodies.instances import CreateKeyRequest, RegisterRequest, UpdateInstanceRequest
from relay.errors import ORJSONResponse, ServiceNotReady, ValidationFailed, render_error
from relay.inputs import SMALL_BODY_BYTES, bearer_token, client_ip, int_param, read_json, validate
from relay.services import Services
from relay.serving.operations import SSE_HEADERS
from relay.serving.targets import INSTANCE_ID
from relay.store import keys
from relay.store.rates import Bucket
from relay.telemetry.metrics import CONTENT_TYPE
from relay.web.live import MAX_IDS, WatchResponse

#: A directory search's longest query.
MAX_QUERY_CHARS = 100
#: Seconds between SSE comments on an idle status stream (proxies cut silent connections).
KEEPALIVE_SECONDS = 15.0

# -- instances ---------------------------------------------------------------


async def register_instance(request: Request, services: Services) -> Response:
    services.access.check_registration(bearer_token(request))
    ip = client_ip(request)
    await services.rate_limiter.hit(
        [Bucket(keys.rate("register", ip), services.settings.rate_register_per_ip, "this address")])
    settings = services.settings
    body = validate(RegisterRequest,
                    await read_json(request, min(settings.max_body_bytes, SMALL_BODY_BYTES), settings.max_json_depth))
    instance_id, token = await services.registry.register(body.name, body.description)
    return ORJSONResponse(
        {
            "instance_id": instance_id,
            "agent_token": token,
            "name": body.name,
            "status": "offline",
            "chat_url": services.registry.chat_url(instance_id),
        },
        status_code=201,
    )


async def get_instance(request: Request, services: Services) -> Response:
    return ORJSONResponse(await services.registry.view(request.path_params["instance_id"]))


async def list_instances(request: Request, services: Services) -> Response:
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
    data, next_cursor = await services.registry.list(
        status=status, limit=limit, cursor=cursor, query=query)
    return ORJSONResponse({"data": data, "next_cursor": next_cursor})


async def instance_events(request: Request, services: Services) -> Response:
    """Server-Sent Events: the views of the given instances, again whenever one changes."""
    raw = request.query_params.get("ids") or ""
    ids = list(dict.fromkeys(part for part in raw.split(",") if part))
    if not ids:
        raise ValidationFailed("ids: give one or more instance ids, comma-separated", param="ids")
    if len(ids) > MAX_IDS:
        raise ValidationFailed(f"ids: at most {MAX_IDS} instances per stream", param="ids")
    if not all(INSTANCE_ID.fullmatch(iid) for iid in ids):
        raise ValidationFailed("ids: an instance id is 16 hexadecimal digits", param="ids")
    if services.node.draining:
        raise ServiceNotReady("relay node is draining", headers={"Retry-After": "1"})
    watcher = services.watch.open(ids, client_ip(request))  # 429/503 here, before the response starts
    return WatchResponse(services.watch, watcher, KEEPALIVE_SECONDS, SSE_HEADERS)


async def relay_info(request: Request, services: Services) -> Response:
    """What a client (the dashboard) needs to know about this relay before it asks anything."""
    return ORJSONResponse({
        "base_url": services.settings.base_url(),
        "version": wire.__version__,
        "registration": "key_required" if services.settings.registration_key else "open",
    })


async def delete_instance(request: Request, services: Services) -> Response:
    instance_id = request.path_params["instance_id"]
    await services.registry.check_owner(instance_id, bearer_token(request))
    # What hangs off the instance first, its record last (in registry.delete):
    # a deletion cut short by Redis can be asked again by the same owner.
    await services.access.purge(instance_id)
    await services.conversations.purge_instance(instance_id)
    await services.registry.delete(instance_id)
    await services.gateway.close_instance(instance_id, "instance deleted")
    return Response(status_code=204)


# -- owner actions (Bearer agent token) ------------------------------------------


async def _owner(request: Request, services: Services) -> tuple[str, str]:
    """(instance id, owner token) once the token is checked; 401/403/404 otherwise."""
    instance_id = request.path_params["instance_id"]
    return instance_id, await services.registry.check_owner(instance_id, bearer_token(request))


async def update_instance(request: Request, services: Services) -> Response:
    instance_id, _ = await _owner(request, services)
    body = await read_json(request, SMALL_BODY_BYTES, services.settings.max_json_depth)
    changes = validate(UpdateInstanceRequest, body)
    await services.access.update(instance_id, changes.stored())
    return ORJSONResponse(await services.registry.view(instance_id))


async def instance_settings(request: Request, services: Services) -> Response:
    """What the owner may change, as it stands (the conversation parameters are not in the public view)."""
    instance_id, _ = await _owner(request, services)
    view = await services.registry.view(instance_id)
    found = await services.registry.parameters(instance_id)
    return ORJSONResponse({
        "name": view["name"], "description": view["description"], "visibility": view["visibility"],
        "introduction": found["introduction"], "variables": found["variables"],
        "conversations": found["conversations"],
    })


async def rotate_token(request: Request, services: Services) -> Response:
    instance_id, token = await _owner(request, services)
    new_token = await services.access.rotate_token(instance_id, token)
    return ORJSONResponse({"instance_id": instance_id, "agent_token": new_token})


async def create_key(request: Request, services: Services) -> Response:
    instance_id, _ = await _owner(request, services)
    body = validate(CreateKeyRequest, await read_json(request, SMALL_BODY_BYTES, services.settings.max_json_depth))
    return ORJSONResponse(await services.access.create_key(instance_id, body.name), status_code=201)


async def list_keys(request: Request, services: Services) -> Response:
    instance_id, _ = await _owner(request, services)
    return ORJSONResponse({"data": await services.access.list_keys(instance_id)})


async def revoke_key(request: Request, services: Services) -> Response:
    instance_id, _ = await _owner(request, services)
    await services.access.revoke_key(instance_id, request.path_params["key_id"])
    return Response(status_code=204)


# -- health and documentation --------------------------------------------------


async def metrics_endpoint(request: Request, services: Services) -> Response:
    """``GET /metrics``: the node's Prometheus metrics."""
    return Response(services.metrics.exposition(), media_type=CONTENT_TYPE)


async def openapi(request: Request, services: Services) -> Response:
    return ORJSONResponse(services.openapi)


async def healthz(request: Request, services: Services) -> Response:
    return ORJSONResponse({"status": "ok", "node_id": services.node.node_id})


async def readyz(request: Request, services: Services) -> Response:
    if services.node.draining:
        raise ServiceNotReady("relay node is draining")
    if not services.node.layout_ready:
        raise ServiceNotReady("relay node is checking the key layout in Redis (relay.store.migrate)")
    try:
        await services.redis.ping()
    except (RedisError, OSError, TimeoutError) as exc:
        raise ServiceNotReady(f"redis unreachable: {type(exc).__name__}") from None
    return ORJSONResponse({"status": "ready", "node_id": services.node.node_id, "agents": len(services.sessions)})


# -- errors ------------------------------------------------------------------------


async def error_handler(request: Request, exc: Exception) -> Response:
    """The exception handler for everything a route may raise (see ``errors.as_relay_error``)."""
    return render_error(request.url.path, exc)
