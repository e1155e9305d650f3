"""Agents connected to this node, and the streams they serve.

An :class:`AgentSession` wraps one agent websocket: it assigns stream ids,
sends requests, uploads, cancels and credit (it is the
:class:`inflight.StreamLink` of its local streams), and routes the agent's
frames to the stream they belong to (its upload credit included).
:class:`SessionManager` indexes this node's sessions by instance and by
session id.  Nothing here touches Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import wire
from relay.serving.inflight import LinkLost, Stream

if TYPE_CHECKING:
    from relay.serving.agent_limits import FrameBudget

log = logging.getLogger("relay.sessions")

#: The operations this relay can route: an agent's hello may declare others (a newer agent),
#: which the session drops, so what it keeps (and records in Redis) is bounded by this set.
KNOWN_OPS = (wire.OP_CHAT, wire.OP_IMAGES, wire.OP_TRANSCRIBE)

#: Cancelled stream ids remembered per agent, so their late frames are ignored
#: rather than treated as frames "after the stream ended".
MAX_DROPPED_STREAMS = 4096

SendText = Callable[[str], Awaitable[None]]
SendBytes = Callable[[bytes], Awaitable[None]]
Close = Callable[[int, str], Awaitable[None]]


def resolve_model(models: tuple[str, ...], requested: str | None) -> str:
    # SDKs insist on sending some model name; one the agent does not serve
    # falls back to its default (its first model) instead of failing the call.
    if requested and requested in models:
        return requested
    return models[0]


class Traffic:
    """What this node's agents sent: plain integers, read by ``/metrics`` at scrape time.

    Counting here costs two integer additions per DATA frame; a Prometheus
    counter per frame would take a lock on the hot path.
    """

    __slots__ = ("frames", "bytes")

    def __init__(self) -> None:
        self.frames = 0
        self.bytes = 0


class AgentSession:
    """One connected agent, as seen by the node it is connected to."""

    def __init__(
        self,
        *,
        instance_id: str,
        hello: wire.Hello,
        protocol: int,
        send_text: SendText,
        send_bytes: SendBytes,
        close: Close,
        window: int,
        credential: str = "",
        budget: FrameBudget | None = None,
        send_timeout: float = 15.0,
    ):
        self.instance_id = instance_id
        #: The protocol version agreed in the handshake.
        self.protocol = protocol
        #: An agent that takes longer than this to accept a message is treated
        #: as gone: its socket is jammed, and waiting would stall every stream
        #: (and every cleanup) behind the send lock.
        self.send_timeout = send_timeout
        #: Hash of the agent token this session authenticated with: a rotation
        #: of that token closes the session (see ``gateway.AgentGateway``).
        self.credential = credential
        #: Frames/bytes per second this agent may send (None = unlimited).
        self.budget = budget
        self.agent_id = hello.agent_id
        self.agent_version = hello.agent_version
        self.session_id = uuid.uuid4().hex
        self.models = hello.models
        # A version-1 agent can chat and nothing else, whatever it claims.
        self.capabilities = tuple(op for op in KNOWN_OPS if op in hello.capabilities) if protocol >= 2 \
            else (wire.OP_CHAT,)
        self.image_models = hello.image_models if protocol >= 2 else ()
        self.transcribe_models = hello.transcribe_models if protocol >= 2 else ()
        self.max_concurrency = hello.max_concurrency
        self.window = window
        self.last_seen = time.monotonic()
        self.connected_at = time.time()
        self.streams: dict[int, Stream] = {}
        self.closed = False
        #: A stream ended since the node last reconciled this agent's load counter.
        self.load_dirty = False
        self.traffic = Traffic()  # the node's, once added to its SessionManager
        self._send_text = send_text
        self._send_bytes = send_bytes
        self._close = close
        self._next_id = 0
        #: Streams the relay dropped before the agent finished them (cancelled):
        #: their late frames are expected and ignored.  Bounded, oldest first out.
        self._dropped: dict[int, None] = {}
        self._send_lock = asyncio.Lock()

    @property
    def inflight(self) -> int:
        return len(self.streams)

    @property
    def has_capacity(self) -> bool:
        return not self.closed and len(self.streams) < self.max_concurrency

    # -- outgoing (the StreamLink of local streams) ----------------------------

    async def _send(self, message: str | bytes) -> None:
        if self.closed:
            raise LinkLost("agent connection closed")
        try:
            async with asyncio.timeout(self.send_timeout), self._send_lock:
                if isinstance(message, bytes):
                    await self._send_bytes(message)
                else:
                    await self._send_text(message)
        except TimeoutError:
            log.warning("agent %s of instance %s accepted nothing for %gs; closing it",
                        self.agent_id, self.instance_id, self.send_timeout)
            asyncio.get_running_loop().create_task(self.close(wire.CloseCode.HEARTBEAT_TIMEOUT, "agent not reading"))
            raise LinkLost("agent not reading") from None
        except Exception as exc:  # whatever the transport raises (OSError, WebSocketDisconnect ...): gone
            raise LinkLost(f"agent connection lost ({type(exc).__name__})") from None

    async def open_stream(self, op: str, body: dict[str, Any], *, stream: bool, request_id: str = "",
                          window: int | None = None, upload: int = 0) -> Stream:
        """Send a request to the agent; LinkLost if it cannot take it.

        ``window`` is the requesting node's, for a stream served across nodes:
        the agent may send what that node buffers, no more (it grants credit
        in halves of its own window) and no less (or that node would never
        grant any).  ``upload`` bytes of request body are to follow
        (``Stream.send_upload``, or node A's frames forwarded by node B).
        """
        if upload and self.protocol < 2:
            raise ValueError("a version-1 agent cannot take an upload")  # it declares no op that needs one
        self._next_id += 1
        window = window or self.window
        opened = Stream(self, self._next_id, window, upload=upload)
        self.streams[opened.id] = opened
        try:
            await self._send(wire.encode(wire.Request(opened.id, body, stream, window, op, request_id, upload)))
        except BaseException:
            self.forget(opened.id)  # it may have reached the agent: its frames are then late, not foreign
            raise
        return opened

    async def send_cancel(self, stream_id: int, reason: str) -> None:
        await self._send(wire.encode(wire.Cancel(stream_id, reason)))

    async def send_credit(self, stream_id: int, amount: int) -> None:
        await self._send(wire.encode_credit(stream_id, amount))

    async def send_upload(self, stream_id: int, payload: bytes) -> None:
        # One frame per send, under the send lock like every other: another
        # stream's frame can go between any two frames of an upload.
        await self._send(wire.encode_upload(stream_id, payload))

    async def send_event(self, event: wire.Event) -> None:
        await self._send(wire.encode(event))

    async def alive(self) -> bool:
        return not self.closed

    def forget(self, stream_id: int) -> None:
        if self.streams.pop(stream_id, None) is not None:
            self.load_dirty = True
            # The agent had not finished this stream: frames may still be in flight.
            self._dropped[stream_id] = None
            if len(self._dropped) > MAX_DROPPED_STREAMS:
                del self._dropped[next(iter(self._dropped))]

    # -- incoming ---------------------------------------------------------------

    async def receive(self, message: str | bytes) -> None:
        """Handle one message from the agent; ProtocolError when the agent breaks the protocol."""
        self.last_seen = time.monotonic()
        if self.budget is not None and not self.budget.allow(len(message)):
            raise wire.ProtocolError("agent sends more frames or bytes per second than this relay allows",
                                     wire.CloseCode.POLICY_VIOLATION)
        match wire.decode(message):
            case wire.Data() | wire.End() | wire.StreamError() as event:
                target = self.streams.get(event.id)
                if target is None:
                    if event.id in self._dropped:
                        return  # late frame of a stream we cancelled: drop it
                    if event.id <= self._next_id:
                        raise wire.ProtocolError(f"frame for stream {event.id} after it ended")
                    raise wire.ProtocolError(f"frame for stream {event.id} that was never opened")
                target.feed(event)
                if type(event) is wire.Data:
                    traffic = self.traffic
                    traffic.frames += 1
                    traffic.bytes += len(event.payload)
                elif target.finished:
                    del self.streams[event.id]
                    self.load_dirty = True
            case wire.Credit() as credit:
                # Agent -> relay, a credit can only be for an upload in progress.
                target = self.streams.get(credit.id)
                if target is None:
                    if credit.id in self._dropped:
                        return  # granted before it heard of our cancel
                    raise wire.ProtocolError(f"credit for stream {credit.id}, which has no upload in progress")
                target.feed_credit(credit)
            case wire.Ping(ts=ts):
                self._count_ping()
                await self._send(wire.encode(wire.Pong(ts)))
            case wire.Pong():
                self._count_ping()  # never asked for: the relay does not ping
            case other:
                raise wire.ProtocolError(f"agents may not send {type(other).__name__} frames")

    def _count_ping(self) -> None:
        # A heartbeat is one ping per interval; each costs the node a pong, so pings have their own
        # budget, far below the frames' (which a stream's DATA frames need).
        if self.budget is not None and not self.budget.allow_ping():
            raise wire.ProtocolError(f"agent pings faster than {self.budget.pings_per_second:g} per second",
                                     wire.CloseCode.POLICY_VIOLATION)

    async def close(self, code: int, reason: str) -> None:
        """Close the websocket and fail whatever was still running on it."""
        if self.closed:
            return
        self.closed = True
        self.fail_all(f"agent connection closed: {reason}")
        try:
            async with asyncio.timeout(self.send_timeout):
                await self._close(code, reason)
        except Exception:  # already closed, or jammed: either way it is gone
            pass

    def fail_all(self, message: str) -> None:
        for running in list(self.streams.values()):
            running.fail(502, message, "agent_disconnected")
        self.streams.clear()


class SessionManager:
    """Every agent session on this node, by instance and agent id, and by session id."""

    def __init__(self) -> None:
        self._by_instance: dict[str, dict[str, AgentSession]] = {}
        self._by_session: dict[str, AgentSession] = {}
        self.traffic = Traffic()

    def __len__(self) -> int:
        return len(self._by_session)

    def instance_count(self) -> int:
        """Instances with at least one agent on this node."""
        return len(self._by_instance)

    def all(self) -> list[AgentSession]:
        return list(self._by_session.values())

    def of(self, instance_id: str) -> list[AgentSession]:
        return list(self._by_instance.get(instance_id, {}).values())

    def get(self, instance_id: str, agent_id: str) -> AgentSession | None:
        return self._by_instance.get(instance_id, {}).get(agent_id)

    def by_session(self, session_id: str) -> AgentSession | None:
        return self._by_session.get(session_id)

    def add(self, session: AgentSession) -> AgentSession | None:
        """Register a session; return the stale one of the same agent it replaces, if any."""
        sessions = self._by_instance.setdefault(session.instance_id, {})
        stale = sessions.get(session.agent_id)
        sessions[session.agent_id] = session
        self._by_session[session.session_id] = session
        session.traffic = self.traffic
        return stale

    def remove(self, session: AgentSession) -> None:
        self._by_session.pop(session.session_id, None)
        sessions = self._by_instance.get(session.instance_id)
        if sessions and sessions.get(session.agent_id) is session:
            del sessions[session.agent_id]
            if not sessions:
                del self._by_instance[session.instance_id]

    def stale(self, timeout: float) -> list[AgentSession]:
        deadline = time.monotonic() - timeout
        return [s for s in self.all() if s.last_seen < deadline]

    def inflight(self) -> int:
        return sum(s.inflight for s in self._by_session.values())
