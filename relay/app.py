"""The composition root: every relay component is built and wired here, once.

``create_app(settings)`` builds the parts (each gets what it needs through
its constructor; nothing is wired after construction) and returns the
Starlette app.  Its lifespan starts the node's background tasks
(housekeeping, the pub/sub subscriber, lease renewal), serves, and on exit
sends any agents still connected away, drops the node's presence and closes
Redis: the node's one shutdown.  ``server.edge.RelayServer`` drains in-flight
streams before that, while connections are still open.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from relay.doors import relay_api, transcription
from relay.doors.cors import ChatCORS
from relay.errors import RelayError
from relay.node import NodeState
from relay.routes import build_openapi, starlette_routes
from relay.services import Services
from relay.serving.admission import Admission
from relay.serving.crossnode import CrossNode
from relay.serving.gateway import AgentGateway
from relay.serving.overload import LoadMonitor
from relay.serving.presence import Presence
from relay.serving.router import StreamRouter
from relay.serving.sessions import SessionManager
from relay.serving.subscriber import Subscriber
from relay.serving.uploads import UploadBudget
from relay.settings import RelaySettings
from relay.store import connection, keys, migrate
from relay.store.access import AccessControl
from relay.store.conversations import ConversationStore
from relay.store.embedded import safe_url
from relay.store.leases import StreamLeases
from relay.store.liveness import NodeLiveness
from relay.store.rates import RateLimiter
from relay.store.registry import InstanceRegistry
from relay.store.tokens import text
from relay.telemetry.metrics import RelayMetrics
from relay.telemetry.requests import RequestObserver
from relay.web.live import StatusWatch
from wire import redaction

log = logging.getLogger("relay.app")


def create_app(settings: RelaySettings, redis_url: str | None = None) -> Starlette:
    """Build the relay.  ``redis_url`` overrides ``settings.redis_url``."""
    url = redis_url or settings.redis_url
    if not url:
        raise ValueError("create_app needs a Redis URL (relay serve starts an embedded one)")
    redis = connection.connect(url, settings)
    # The frames of streams in flight wait as long as a stream may be idle (serving/crossnode.py).
    in_flight = connection.connect(url, settings, patience=settings.idle_timeout)
    node = NodeState()
    sessions = SessionManager()
    liveness = NodeLiveness(redis, heartbeat_timeout=settings.heartbeat_timeout, node_id=node.node_id)
    registry = InstanceRegistry(redis, heartbeat_timeout=settings.heartbeat_timeout, base_url=settings.base_url(),
                                liveness=liveness, max_models=settings.agent_max_models)
    presence = Presence(node, registry, sessions, heartbeat_interval=settings.heartbeat_interval,
                        heartbeat_timeout=settings.heartbeat_timeout)
    bus = CrossNode(redis, node.node_id, sessions, registry, heartbeat_timeout=settings.heartbeat_timeout,
                    window=settings.stream_window, idle_timeout=settings.idle_timeout, in_flight=in_flight)
    gateway = AgentGateway(settings, node, registry, sessions, presence, bus)

    async def subscribed(channels: frozenset[str], again: bool) -> None:
        if bus.channel in channels:
            bus.subscribed = True
        if keys.EVENTS_CHANNEL in channels:
            await gateway.on_subscribed(again)

    def lost(channels: frozenset[str]) -> None:
        if bus.channel in channels:  # the streams crossing nodes may have lost frames
            bus.inbox_lost()

    subscriber = Subscriber(
        redis,
        {keys.EVENTS_CHANNEL: gateway.on_registry_event, bus.channel: bus.handle},
        on_subscribed=subscribed,
        on_lost=lost,
        probe_after=settings.heartbeat_interval,
        probe_timeout=settings.redis_timeout,
    )
    access = AccessControl(redis, registry, registration_key=settings.registration_key)
    stream_leases = StreamLeases(
        redis, ttl_ms=keys.stream_lease_ttl_ms(settings.heartbeat_interval, settings.heartbeat_timeout))
    router = StreamRouter(node, sessions, registry, bus, stream_leases)
    redaction.install()  # no credential in any log record, even at DEBUG
    metrics = RelayMetrics(node.node_id, sessions, bus)  # a registry per app: no globals
    # Connections are made lazily, so the pool can still be told which class to make.
    connection.wrap_connections(redis, metrics.count_round_trips)
    connection.wrap_connections(in_flight, metrics.count_round_trips)
    overload = LoadMonitor(shed_lag=settings.shed_lag, max_inflight=settings.max_inflight,
                           inflight=bus.streams_held, on_shed=metrics.count_shed)
    metrics.watch_load(overload.current_lag)
    bus.admit_new = overload.check  # requests routed here from other nodes are shed as our own are
    watch = StatusWatch(registry, interval=settings.watch_interval, max_watchers=settings.max_watchers,
                        per_address=settings.watchers_per_address)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        node.layout_ready = False
        try:
            await migrate.ensure_layout(redis)
            node.layout_ready = True
            await warn_if_not_persistent(redis)
        except (RedisError, OSError) as exc:
            log.error("redis at %s unreachable at startup (%s); will keep trying", safe_url(url), exc)
        log.info("relay node %s using redis %s; public URL %s", node.node_id, safe_url(url), settings.base_url())
        async with anyio.create_task_group() as tg:
            if not node.layout_ready:  # no chat, no agent until the data is known to be readable
                tg.start_soon(migrate.keep_trying, redis, lambda: setattr(node, "layout_ready", True))
            tg.start_soon(liveness.run)
            tg.start_soon(presence.run)
            tg.start_soon(subscriber.run)
            tg.start_soon(stream_leases.run, settings.heartbeat_interval)
            tg.start_soon(watch.run)
            tg.start_soon(overload.run)
            # Serve only once this node can receive cross-node traffic (bounded:
            # with Redis down we still start, and /readyz says not ready).
            with anyio.move_on_after(5):
                await subscriber.listening.wait()
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):
                    node.draining = True
                    watch.close()
                    await gateway.send_all_away()  # none left when RelayServer drained first
                    await presence.leave()
                tg.cancel_scope.cancel()
        await connection.close(redis)
        await connection.close(in_flight)

    services = Services(
        settings=settings, node=node, redis=redis, registry=registry, access=access,
        rate_limiter=RateLimiter(redis), stream_leases=stream_leases, router=router,
        admission=Admission(settings, node, overload, access, stream_leases), sessions=sessions, bus=bus,
        gateway=gateway, presence=presence, overload=overload, watch=watch, metrics=metrics,
        conversations=ConversationStore(
            redis, retention_seconds=settings.conversation_retention, max_messages=settings.conversation_max_messages,
            max_conversations=settings.conversations_per_user, max_message_bytes=settings.conversation_message_bytes,
            # Past three missed checkpoints, a turn still "answering" lost its node.
            stale_after=3 * settings.conversation_checkpoint_interval + settings.redis_timeout),
        upload_budget=UploadBudget(settings.upload_memory_bytes,
                                   largest=settings.max_upload_bytes + transcription.FORM_ROOM),
        openapi=build_openapi(settings.base_url()),
    )
    app = Starlette(
        routes=starlette_routes(services, with_dashboard=settings.dashboard),
        exception_handlers={
            RelayError: metrics.counting(relay_api.error_handler),
            RedisError: metrics.counting(relay_api.error_handler, reason="storage_unavailable"),
            HTTPException: relay_api.error_handler,
            Exception: relay_api.error_handler,  # a bug: still a 500 in OpenAI's shape
        },
        middleware=[
            Middleware(RequestObserver, metrics=metrics, node_id=node.node_id, log_requests=settings.access_log,
                       body_timeout=settings.body_timeout, body_min_rate=settings.body_min_rate),
            Middleware(ChatCORS, origins=settings.cors_origin_list()),
        ],
        lifespan=lifespan,
    )
    #: For the process around the app (the CLI, the demo, the server's drain), never for handlers.
    app.state.services = services
    return app


async def warn_if_not_persistent(redis: Redis) -> None:
    """Registrations live in Redis: say loudly when it would lose them."""
    found = await redis.config_get("*")
    config = {text(k): text(v) for k, v in found.items() if text(k) in ("appendonly", "save")}
    if config.get("appendonly") != "yes" and not config.get("save"):
        log.warning("redis persists nothing (no AOF, no RDB): registrations are lost when it restarts")
