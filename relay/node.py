"""This relay node: its identity, its agents' presence, and their websockets.

``Node`` runs the housekeeping loop (one liveness write per heartbeat
interval, however many agents are connected; stale agents dropped) and
serves ``GET /api/agent/connect``: authenticate, handshake, then read frames
until the agent goes away.
"""

from __future__ import annotations

import asyncio
import logging

import anyio
import orjson
from redis.exceptions import RedisError
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket

from . import keys, logs
from . import protocol as p
from .crossnode import CrossNode
from .errors import error_body
from .limits import FrameBudget
from .registry import AgentEntry, InstanceRegistry, hash_token
from .sessions import AgentSession, SessionManager
from .settings import RelaySettings

log = logging.getLogger("relay.node")

HANDSHAKE_TIMEOUT = 10.0


class Node:
    def __init__(self, settings: RelaySettings, registry: InstanceRegistry, sessions: SessionManager, node_id: str):
        self.settings = settings
        self.registry = registry
        self.sessions = sessions
        self.node_id = node_id
        self.redis_ok = True
        self.draining = False
        #: Agent removals that failed (Redis trouble), retried every heartbeat.
        self.pending_removals: list[tuple[str, str, str]] = []
        self.listening = asyncio.Event()  # set while subscribed to the inbox
        self.bus: CrossNode | None = None  # set by the composition root
        self._inbox = keys.inbox(node_id).encode()

    # -- housekeeping --------------------------------------------------------

    async def run(self) -> None:
        """Refresh this node's liveness and drop silent agents, forever."""
        while True:
            await self.tick()
            await anyio.sleep(self.settings.heartbeat_interval)

    async def tick(self) -> None:
        for session in self.sessions.stale(self.settings.heartbeat_timeout):
            log.warning(
                "agent %s of instance %s missed heartbeats for %.0fs; dropping it",
                session.agent_id, session.instance_id, self.settings.heartbeat_timeout,
            )
            await session.close(p.CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
        try:
            while self.pending_removals:
                await self.registry.remove_agent(*self.pending_removals[-1])
                self.pending_removals.pop()
            existed = await self.registry.refresh_node(self.node_id)
            idle = [s for s in self.sessions.all() if s.load_dirty and not s.streams]
            if idle:
                await self.registry.reset_load([(s.instance_id, s.session_id) for s in idle])
                for s in idle:
                    s.load_dirty = False
            if not existed or not self.redis_ok:
                # Redis restarted, failed over or was unreachable: it may have
                # lost this node's agents.  Re-assert all of them in one pipeline.
                entries = [(s.instance_id, self.entry(s)) for s in self.sessions.all()]
                await self.registry.refresh_node(self.node_id, entries)
                if not self.redis_ok or entries:
                    log.info("presence re-asserted for %d agents", len(entries))
        except (RedisError, OSError) as exc:
            if self.redis_ok:
                log.error("redis unreachable (%s); presence will be re-asserted when it is back", exc)
            self.redis_ok = False
        else:
            self.redis_ok = True

    async def listen(self) -> None:
        """Follow this node's inbox (cross-node streams) and registry events, forever.

        Resubscribes after Redis comes back; streams that crossed nodes when the
        subscription broke are failed at once (see ``CrossNode.inbox_lost``).
        """
        resubscribing = False
        while True:
            try:
                async with self.registry.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(keys.EVENTS_CHANNEL, self.bus.channel)
                    self.listening.set()
                    self.bus.subscribed = True
                    if resubscribing:
                        # Registry events published while we were away are lost.
                        await self.recheck_credentials()
                    while True:
                        message = await pubsub.get_message(timeout=None)
                        if message is None:
                            continue
                        if message["channel"] == self._inbox:
                            self.bus.handle(message["data"])
                        else:
                            await self._registry_event(message["data"])
            except (RedisError, OSError) as exc:
                self.listening.clear()
                self.bus.inbox_lost()
                resubscribing = True
                log.debug("pub/sub connection lost (%s); resubscribing", exc)
                await anyio.sleep(0.5)

    async def _registry_event(self, data: bytes) -> None:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if isinstance(event, dict) and "deleted" in event:
            await self.close_instance(str(event["deleted"]), "instance deleted")
        elif isinstance(event, dict) and "rotated" in event:
            # Only the sessions that authenticated with the old token: an agent
            # already using the new one stays.
            for session in self.sessions.of(str(event["rotated"])):
                if session.credential == event.get("credential"):
                    await session.close(p.CloseCode.UNAUTHORIZED, "agent token rotated")

    async def recheck_credentials(self) -> None:
        """Close every agent whose token was rotated (or instance deleted) unseen; one pipeline."""
        sessions = self.sessions.all()
        current = await self.registry.token_hashes(sorted({s.instance_id for s in sessions}))
        for session in sessions:
            if current.get(session.instance_id) != session.credential:
                await session.close(p.CloseCode.UNAUTHORIZED, "agent token rotated or instance deleted")

    async def close_instance(self, instance_id: str, reason: str) -> None:
        for session in self.sessions.of(instance_id):
            await session.close(p.CloseCode.UNAUTHORIZED, reason)

    async def shutdown(self) -> None:
        """Tell every agent to reconnect elsewhere, then leave the cluster."""
        for session in self.sessions.all():
            try:
                await session.send_event(p.GoAway("relay node shutting down"))
            except Exception:
                pass
            await session.close(p.CloseCode.GOING_AWAY, "relay node shutting down")
        try:
            await self.registry.drop_node(self.node_id)
        except (RedisError, OSError):
            pass

    def entry(self, session: AgentSession) -> AgentEntry:
        return AgentEntry(
            agent_id=session.agent_id,
            node=self.node_id,
            session=session.session_id,
            max_concurrency=session.max_concurrency,
            models=session.models,
            connected_at=session.connected_at,
        )

    # -- the agent websocket ---------------------------------------------------

    async def agent_endpoint(self, websocket: WebSocket) -> None:
        instance_id = await self._authenticate(websocket)
        if instance_id is None:
            return
        logs.bind(instance_id=instance_id)  # on every log line of this connection
        await websocket.accept()
        try:
            hello = await self._handshake(websocket)
        except p.ProtocolError as exc:
            log.warning("refused agent of instance %s: %s", instance_id, exc)
            await websocket.close(exc.close_code, str(exc)[:120])
            return
        except (TimeoutError, ConnectionError, RuntimeError):
            return
        session = AgentSession(
            instance_id=instance_id,
            hello=hello,
            send_text=websocket.send_text,
            send_bytes=websocket.send_bytes,
            close=lambda code, reason: websocket.close(code, reason),
            window=self.settings.stream_window,
            credential=websocket.state.credential,
            budget=FrameBudget.from_settings(self.settings),
            send_timeout=self.settings.heartbeat_timeout,
        )
        # Welcome first, then make the session routable (listed here, then in
        # Redis): a request routed to an agent that is just reconnecting must
        # not reach it before its welcome, which the agent rejects as a
        # protocol error (it then dropped the connection and the request).
        await session.send_event(
            p.Welcome(
                protocol=p.PROTOCOL_VERSION,
                instance_id=instance_id,
                node_id=self.node_id,
                heartbeat_interval=self.settings.heartbeat_interval,
                chat_url=self.registry.chat_url(instance_id),
            )
        )
        stale = self.sessions.add(session)
        if stale is not None:
            await stale.close(p.CloseCode.REPLACED, "replaced by a new connection of the same agent")
        try:
            # Before the agent is routable: no request may precede the welcome.
            if not await self._credential_still_valid(session):
                return
            try:
                previous = await self.registry.add_agent(instance_id, self.entry(session))
            except (RedisError, OSError) as exc:
                # Serve anyway: local requests still reach this agent, and the
                # next heartbeat re-asserts it once Redis answers again.
                log.warning("could not record agent %s in redis (%s)", hello.agent_id, exc)
                self.redis_ok, previous = False, None
            if previous is not None and previous.node != self.node_id:
                # The same agent reconnected here while its old session still
                # looks alive on another node: have that node drop it now.
                await self.bus.kick(previous.node, instance_id, previous.agent_id, previous.session)
            log.info(
                "agent %s connected: instance %s, models %s, concurrency %d, agent version %s",
                hello.agent_id, instance_id, ",".join(hello.models), hello.max_concurrency, hello.agent_version,
            )
            await self._read(websocket, session)
        finally:
            self.sessions.remove(session)
            session.fail_all("agent disconnected")
            session.closed = True
            with anyio.CancelScope(shield=True):
                try:
                    await self.registry.remove_agent(instance_id, session.agent_id, session.session_id)
                except (RedisError, OSError) as exc:
                    # This node is alive, so nothing would expire the entry:
                    # keep it and retry on the next heartbeat, or the
                    # instance would stay "online" with no agent.
                    log.warning("could not remove agent %s from redis (%s); retrying", session.agent_id, exc)
                    self.pending_removals.append((instance_id, session.agent_id, session.session_id))
            log.info("agent %s of instance %s disconnected", hello.agent_id, instance_id)

    async def _authenticate(self, websocket: WebSocket) -> str | None:
        header = websocket.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        status, message = 401, "agent token required: Authorization: Bearer <agent_token>"
        if scheme.lower() == "bearer" and token.strip():
            try:
                instance_id = await self.registry.authenticate(token.strip())
            except (RedisError, OSError):
                status, message = 503, "relay storage unavailable, retry shortly"
            else:
                if instance_id is not None:
                    websocket.state.credential = hash_token(token.strip())
                    return instance_id
                status, message = 401, "unknown or revoked agent token"
        # A real HTTP response (ASGI websocket denial extension), so the agent
        # can tell "bad token: stop" from "relay in trouble: retry".
        code = "invalid_token" if status == 401 else "not_ready"
        kind = "authentication_error" if status == 401 else "service_unavailable"
        await websocket.send_denial_response(
            JSONResponse(error_body(message, kind, None, code), status_code=status)
        )
        return None

    async def _credential_still_valid(self, session: AgentSession) -> bool:
        """Close a session whose token was rotated (or instance deleted) during its handshake.

        Rotation events reach only sessions already listed; this check covers
        the window between authentication and listing.
        """
        try:
            valid = await self.registry.credential_current(session.instance_id, session.credential)
        except (RedisError, OSError):
            return True  # cannot tell now; the event path still applies
        if not valid:
            await session.close(p.CloseCode.UNAUTHORIZED, "agent token rotated or instance deleted")
        return valid

    async def _handshake(self, websocket: WebSocket) -> p.Hello:
        with anyio.fail_after(HANDSHAKE_TIMEOUT):
            message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            raise ConnectionError("agent left during handshake")
        event = p.decode(message.get("text") if message.get("text") is not None else message.get("bytes") or b"")
        if type(event) is not p.Hello:
            raise p.ProtocolError(f"expected hello, got {type(event).__name__}")
        p.check_version(event)
        return event

    async def _read(self, websocket: WebSocket, session: AgentSession) -> None:
        receive = websocket._receive  # the raw ASGI channel: no per-message state checks
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            try:
                await session.receive(text if text is not None else message["bytes"])
            except p.ProtocolError as exc:
                log.warning("agent %s of instance %s broke the protocol: %s", session.agent_id, session.instance_id, exc)
                await session.close(exc.close_code, str(exc)[:120])
                return

