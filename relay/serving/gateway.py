"""``GET /api/agent/connect``: where agents come in, and how they are sent away.

:class:`AgentGateway` is a plain ASGI app (Starlette routes a class
instance to it as is), so the read loop takes the ASGI ``receive`` channel
directly: one awaited dict per agent frame, nothing in between.  Per
connection: authenticate the bearer token (a refusal is a real HTTP
response, so the agent can tell "bad token: stop" from "relay in trouble:
retry"), agree on a protocol version (``hello``/``welcome``) and hold the
hello to this relay's caps (:class:`agent_limits.HelloLimits`: refused with 1008
naming the cap; an instance with all the agents this node takes: 1013), list
the session here and in Redis, then read frames until the agent goes away.
The read loop gives the event loop a turn every few frames: frames already
buffered are read without waiting, so one agent's flood would otherwise run
ahead of every other connection of the node.

The gateway also closes agents whose credentials stop being valid: on the
registry events every node hears (instance deleted, token rotated), after a
resubscription (events sent meanwhile are lost), and when the node drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import anyio
import orjson
from redis.exceptions import RedisError
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

import wire
from relay.errors import ServiceNotReady, Unauthorized, error_response
from relay.node import NodeState
from relay.serving.agent_limits import FrameBudget, HelloLimits
from relay.serving.crossnode import CrossNode
from relay.serving.inflight import LinkLost
from relay.serving.presence import Presence
from relay.serving.sessions import KNOWN_OPS, AgentSession, SessionManager
from relay.settings import RelaySettings
from relay.store.registry import InstanceRegistry
from relay.store.tokens import hash_token
from relay.telemetry import logs

log = logging.getLogger("relay.gateway")

HANDSHAKE_TIMEOUT = 10.0
#: Frames one agent's read loop handles before it lets the event loop run others.
FRAMES_PER_TURN = 8
#: Model names a log line shows of an agent's list (then how many more).
NAMES_LOGGED = 3


def describe_names(names: tuple[str, ...]) -> str:
    """A bounded summary of a declared list for a log line: its count and its first few names."""
    shown = ",".join(names[:NAMES_LOGGED])
    more = f" (+{len(names) - NAMES_LOGGED} more)" if len(names) > NAMES_LOGGED else ""
    return f"{len(names)} [{shown}{more}]"


class AgentGateway:
    def __init__(self, settings: RelaySettings, node: NodeState, registry: InstanceRegistry,
                 sessions: SessionManager, presence: Presence, bus: CrossNode):
        self.settings = settings
        self.node = node
        self.registry = registry
        self.sessions = sessions
        self.presence = presence
        self.bus = bus
        self.hello_limits = HelloLimits.from_settings(settings)

    # -- one agent's connection --------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive, send)
        admitted = await self._authenticate(websocket)
        if admitted is None:
            return
        instance_id, credential = admitted
        logs.bind(instance_id=instance_id)  # on every log line of this connection
        await websocket.accept()
        try:
            hello, version = await self._handshake(receive)
        except wire.ProtocolError as exc:
            log.warning("refused agent of instance %s: %s", instance_id, exc)
            await websocket.close(exc.close_code, str(exc)[:120])
            return
        except (TimeoutError, ConnectionError):
            return
        room = self.settings.agents_per_instance
        if room and sum(s.agent_id != hello.agent_id for s in self.sessions.of(instance_id)) >= room:
            # Per node (no Redis on the handshake): across nodes an instance has at most this many per node.
            log.warning("refused agent %s of instance %s: it has %d agents on this node already",
                        hello.agent_id, instance_id, room)
            await websocket.close(wire.CloseCode.TRY_AGAIN_LATER,
                                  f"instance has {room} agents on this relay node; it takes at most {room}")
            return
        session = AgentSession(
            instance_id=instance_id,
            hello=hello,
            protocol=version,
            send_text=websocket.send_text,
            send_bytes=websocket.send_bytes,
            close=websocket.close,
            window=self.settings.stream_window,
            credential=credential,
            budget=FrameBudget.from_settings(self.settings),
            send_timeout=self.settings.heartbeat_timeout,
        )
        # Welcome first, then make the session routable (listed here, then in
        # Redis): a request must never reach an agent before its welcome.
        try:
            await session.send_event(wire.Welcome(
                protocol=version,
                instance_id=instance_id,
                node_id=self.node.node_id,
                heartbeat_interval=self.settings.heartbeat_interval,
                chat_url=self.registry.chat_url(instance_id),
                latest_agent_version=wire.__version__,
            ))
        except LinkLost:
            return
        stale = self.sessions.add(session)
        if stale is not None:
            await stale.close(wire.CloseCode.REPLACED, "replaced by a new connection of the same agent")
        try:
            if not await self._credential_still_valid(session):
                return
            if version >= 2:
                with contextlib.suppress(RedisError, OSError):  # a suggestion: never worth refusing the agent
                    await self.registry.declare_parameters(instance_id, hello.parameters)
            previous = await self.presence.connected(session)
            if previous is not None and previous.node != self.node.node_id:
                # The same agent reconnected here while its old session still
                # looks alive on another node: have that node drop it now.
                await self.bus.kick(previous.node, previous.session)
            log.info(
                "agent %s connected: instance %s, models %s, capabilities %s, concurrency %d, "
                "agent version %s, protocol %d",
                hello.agent_id, instance_id, describe_names(hello.models), ",".join(session.capabilities),
                hello.max_concurrency, hello.agent_version, version,
            )
            await self._read(receive, session)
        finally:
            self.sessions.remove(session)
            session.fail_all("agent disconnected")
            session.closed = True
            with anyio.CancelScope(shield=True):
                await self.presence.disconnected(session)
            log.info("agent %s of instance %s disconnected", hello.agent_id, instance_id)

    async def _authenticate(self, websocket: WebSocket) -> tuple[str, str] | None:
        """(instance id, token hash), or None once the refusal has been sent."""
        scheme, _, token = websocket.headers.get("authorization", "").partition(" ")
        token = token.strip()
        refusal: Exception = Unauthorized("agent token required: Authorization: Bearer <agent_token>")
        if not self.node.layout_ready:
            # The data may still be in the previous layout: a token would look unknown (401), and
            # the agent would give up.  503: it retries.
            refusal = ServiceNotReady("relay storage not ready, retry shortly")
        elif scheme.lower() == "bearer" and token:
            try:
                instance_id = await self.registry.authenticate(token)
            except (RedisError, OSError):
                refusal = ServiceNotReady("relay storage unavailable, retry shortly")
            else:
                if instance_id is not None:
                    return instance_id, hash_token(token)
                refusal = Unauthorized("unknown or revoked agent token")
        # The ASGI websocket denial extension: a real HTTP status and body.
        logs.ended_on_purpose()
        await websocket.send_denial_response(error_response(refusal))
        return None

    async def _handshake(self, receive: Receive) -> tuple[wire.Hello, int]:
        with anyio.fail_after(HANDSHAKE_TIMEOUT):
            message = await receive()
        if message["type"] == "websocket.disconnect":
            raise ConnectionError("agent left during handshake")
        event = wire.decode(message["text"] if message.get("text") is not None else message.get("bytes") or b"")
        if type(event) is not wire.Hello:
            raise wire.ProtocolError(f"expected hello, got {type(event).__name__}")
        version = wire.negotiate(event)
        self.hello_limits.check(event)
        if version >= 2 and not any(op in event.capabilities for op in KNOWN_OPS):
            raise wire.ProtocolError(f"hello declares no operation this relay runs ({', '.join(KNOWN_OPS)})",
                                     wire.CloseCode.POLICY_VIOLATION)
        return event, version

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
            await session.close(wire.CloseCode.UNAUTHORIZED, "agent token rotated or instance deleted")
        return valid

    async def _read(self, receive: Receive, session: AgentSession) -> None:
        handled = 0
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            handled += 1
            if handled % FRAMES_PER_TURN == 0:
                # receive() returns buffered frames without suspending, and handling one
                # (a pong, a chunk queued) seldom waits either: yield, or a flood starves the node.
                await asyncio.sleep(0)
            text = message.get("text")
            try:
                await session.receive(text if text is not None else message["bytes"])
            except wire.ProtocolError as exc:
                log.warning("agent %s of instance %s broke the protocol: %s",
                            session.agent_id, session.instance_id, exc)
                await session.close(exc.close_code, str(exc)[:120])
                return
            except LinkLost:
                return  # could not answer its ping: the connection is gone

    # -- sending agents away ---------------------------------------------------------

    async def on_registry_event(self, data: bytes) -> None:
        """A registry event from ``ir:events``: close the agents it invalidates."""
        event = orjson.loads(data)
        if not isinstance(event, dict):
            return
        if "deleted" in event:
            await self.close_instance(str(event["deleted"]), "instance deleted")
        elif "rotated" in event:
            # Only the sessions that authenticated with the old token: an agent
            # already using the new one stays.
            for session in self.sessions.of(str(event["rotated"])):
                if session.credential == event.get("credential"):
                    await session.close(wire.CloseCode.UNAUTHORIZED, "agent token rotated")

    async def on_subscribed(self, again: bool) -> None:
        if again:  # registry events published while we were away are lost
            await self.recheck_credentials()

    async def recheck_credentials(self) -> None:
        """Close every agent whose token was rotated (or instance deleted) unseen; one pipeline."""
        sessions = self.sessions.all()
        current = await self.registry.token_hashes(sorted({s.instance_id for s in sessions}))
        for session in sessions:
            if current.get(session.instance_id) != session.credential:
                await session.close(wire.CloseCode.UNAUTHORIZED, "agent token rotated or instance deleted")

    async def close_instance(self, instance_id: str, reason: str) -> None:
        for session in self.sessions.of(instance_id):
            await session.close(wire.CloseCode.UNAUTHORIZED, reason)

    async def send_all_away(self, reason: str = "relay node shutting down") -> None:
        """Tell every agent to reconnect elsewhere (goaway, then close 1001)."""
        for session in self.sessions.all():
            if session.closed:
                continue  # sent away already (RelayServer drains before the lifespan ends)
            try:
                await session.send_event(wire.GoAway(reason))
            except LinkLost:
                pass
            await session.close(wire.CloseCode.GOING_AWAY, reason)
