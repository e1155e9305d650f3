"""Agents connected to this node, and the streams running over them.

An :class:`AgentSession` wraps one agent websocket: it assigns stream ids,
sends requests, cancels and credit, and routes the agent's frames to the
:class:`RelayStream` they belong to.  A :class:`RelayStream` is one chat
request seen from the relay: a queue of byte payloads for the HTTP response,
fed by the session's reader, drained by the response, bounded by the stream's
flow-control window.  :class:`SessionManager` knows every session on this
node and picks the least busy agent of an instance.

Nothing here touches Redis; presence bookkeeping lives in the websocket
endpoint and the node heartbeat (see ``app.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import anyio

from . import protocol as p

log = logging.getLogger("relay.sessions")

if TYPE_CHECKING:
    from .limits import FrameBudget

#: Cancelled stream ids remembered per agent, so their late frames are ignored
#: rather than treated as frames "after the stream ended".
MAX_DROPPED_STREAMS = 4096

SendText = Callable[[str], Awaitable[None]]
SendBytes = Callable[[bytes], Awaitable[None]]
Close = Callable[[int, str], Awaitable[None]]


#: Longest a shielded cleanup (cancel the agent's stream, give slots back) may
#: take: cleanups must finish even when the caller is gone, but never hang.
CLEANUP_TIMEOUT = 10.0


def cleanup_scope() -> anyio.CancelScope:
    """A cancel scope for cleanup that cancellation cannot interrupt, bounded in time."""
    return anyio.CancelScope(shield=True, deadline=anyio.current_time() + CLEANUP_TIMEOUT)


def resolve_model(models: tuple[str, ...], requested: str | None) -> str:
    # SDKs insist on sending some model name; one the agent does not serve
    # falls back to its default (its first model) instead of failing the call.
    if requested and requested in models:
        return requested
    return models[0]


def split_items(items: list) -> tuple[bytes, p.End | p.StreamError | None]:
    """Join the byte payloads of a backlog; return them with the final event, if any.

    Whoever drains a stream writes everything that is queued in one go (one
    socket write or one publish), then handles the end or error.
    """
    if len(items) == 1 and type(items[0]) is bytes:
        return items[0], None  # the common case: one chunk, no copy
    payload = bytearray()
    last: p.End | p.StreamError | None = None
    for item in items:
        if type(item) is bytes:
            payload += item
        else:
            last = item
    return bytes(payload), last


class Backlog:
    """Items queued for one reader, and the one waiter the reader may be.

    Shared by local and cross-node streams: the feeder pushes without ever
    blocking, the reader takes everything queued at once (so it can coalesce
    it into one write) or waits for the next item.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[bytes | p.End | p.StreamError] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def __bool__(self) -> bool:
        return bool(self._items)

    def push(self, item: bytes | p.End | p.StreamError) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        """Return once something is queued; TimeoutError after ``timeout`` seconds."""
        if self._items:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._waiter
        finally:
            self._waiter = None

    def take(self) -> list[bytes | p.End | p.StreamError]:
        items = list(self._items)
        self._items.clear()
        return items


class RelayStream:
    """One request in flight: the agent's frames queued for the HTTP client.

    Items are ``bytes`` (payload to write verbatim), :class:`protocol.End` or
    :class:`protocol.StreamError`.  The queue cannot grow past the stream's
    window plus one frame because the agent must wait for credit, and the
    tracker closes the agent if it does not.
    """

    __slots__ = ("id", "session", "tracker", "stream", "model", "_items", "usage", "on_close", "_closed")

    def __init__(self, session: "AgentSession", stream_id: int, *, window: int, stream: bool, model: str):
        self.id = stream_id
        self.session = session
        self.tracker = p.StreamTracker(stream_id, window)
        self.stream = stream
        self.model = model
        self.usage: dict[str, Any] | None = None
        self._items = Backlog()
        #: Awaited once when the stream is closed (the router releases its slot).
        self.on_close: Callable[[], Awaitable[None]] | None = None
        self._closed = False

    @property
    def finished(self) -> bool:
        return self.tracker.state.finished

    # -- fed by the session reader --------------------------------------------

    def feed(self, event: p.Data | p.End | p.StreamError) -> None:
        self.tracker.receive(event)  # raises ProtocolError on a bad transition
        if type(event) is p.Data:
            self._items.push(event.payload)
        else:
            if type(event) is p.End:
                self.usage = event.usage
            self._items.push(event)

    def fail(self, status: int, message: str, code: str | None = None) -> None:
        """End the stream from the relay's side (agent lost, timeout ...)."""
        if self.finished:
            return
        self.tracker.state = p.StreamState.FAILED
        self._items.push(p.StreamError(self.id, status, message, code))

    # -- drained by the HTTP response -----------------------------------------

    async def next(self, timeout: float | None) -> list[bytes | p.End | p.StreamError]:
        """Everything queued so far (at least one item), or TimeoutError.

        Returning the whole backlog lets the response coalesce chunks that are
        already waiting into one socket write without delaying a lone chunk.
        """
        await self._items.wait(timeout)
        return self._items.take()

    async def consumed(self, nbytes: int) -> None:
        """The client took ``nbytes``: return credit to the agent when due."""
        grant = self.tracker.consumed(nbytes)
        if grant:
            await self.session.send_credit(self.id, grant)

    async def close(self, reason: str = "client disconnected") -> None:
        """Done with this stream, for whatever reason; idempotent.

        A stream still running is cancelled at the agent (which aborts the
        model's request); late frames for it are then dropped.
        """
        if self._closed:
            return
        self._closed = True
        if not self.finished:
            self.tracker.state = p.StreamState.CANCELLED
            try:
                await self.session.send_cancel(self.id, reason)
            except Exception:  # agent already gone: nothing left to cancel
                pass
        self.session.forget(self.id)
        if self.on_close is not None:
            await self.on_close()


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
        hello: p.Hello,
        send_text: SendText,
        send_bytes: SendBytes,
        close: Close,
        window: int,
        credential: str = "",
        budget: FrameBudget | None = None,
        send_timeout: float = 15.0,
    ):
        self.instance_id = instance_id
        #: An agent that takes longer than this to accept a message is treated
        #: as gone: its socket is jammed, and waiting would stall every stream
        #: (and every cleanup) behind the send lock.
        self.send_timeout = send_timeout
        #: Hash of the agent token this session authenticated with: a rotation
        #: of that token closes the session (see ``Node._registry_event``).
        self.credential = credential
        #: Frames/bytes per second this agent may send (None = unlimited).
        self.budget = budget
        self.hello = hello
        self.agent_id = hello.agent_id
        self.session_id = uuid.uuid4().hex
        self.models = hello.models
        self.max_concurrency = hello.max_concurrency
        self.window = window
        self.last_seen = time.monotonic()
        self.connected_at = time.time()
        self.streams: dict[int, RelayStream] = {}
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

    def resolve_model(self, requested: str | None) -> str:
        return resolve_model(self.models, requested)

    # -- outgoing -----------------------------------------------------------

    async def _send(self, message: str | bytes) -> None:
        if self.closed:
            raise ConnectionError("agent session closed")
        try:
            async with asyncio.timeout(self.send_timeout), self._send_lock:
                if isinstance(message, bytes):
                    await self._send_bytes(message)
                else:
                    await self._send_text(message)
        except TimeoutError:
            log.warning("agent %s of instance %s accepted nothing for %gs; closing it",
                        self.agent_id, self.instance_id, self.send_timeout)
            asyncio.get_running_loop().create_task(self.close(p.CloseCode.HEARTBEAT_TIMEOUT, "agent not reading"))
            raise ConnectionError("agent not reading") from None

    async def open_stream(self, body: dict[str, Any], *, stream: bool) -> RelayStream:
        self._next_id += 1
        relay_stream = RelayStream(self, self._next_id, window=self.window, stream=stream, model=body["model"])
        self.streams[relay_stream.id] = relay_stream
        try:
            await self._send(p.encode(p.Request(relay_stream.id, body, stream, self.window)))
        except Exception:
            self.streams.pop(relay_stream.id, None)
            raise
        return relay_stream

    async def send_cancel(self, stream_id: int, reason: str) -> None:
        await self._send(p.encode(p.Cancel(stream_id, reason)))

    async def send_credit(self, stream_id: int, amount: int) -> None:
        await self._send(p.encode_credit(stream_id, amount))

    async def send_event(self, event: p.Event) -> None:
        await self._send(p.encode(event))

    def forget(self, stream_id: int) -> None:
        if self.streams.pop(stream_id, None) is not None:
            self.load_dirty = True
            # The agent had not finished this stream: frames may still be in flight.
            self._dropped[stream_id] = None
            if len(self._dropped) > MAX_DROPPED_STREAMS:
                del self._dropped[next(iter(self._dropped))]

    # -- incoming -----------------------------------------------------------

    async def receive(self, message: str | bytes) -> None:
        """Handle one message from the agent; raises ProtocolError on abuse."""
        self.last_seen = time.monotonic()
        if self.budget is not None and not self.budget.allow(len(message)):
            raise p.ProtocolError("agent sends more frames or bytes per second than this relay allows",
                                  p.CloseCode.POLICY_VIOLATION)
        event = p.decode(message)
        kind = type(event)
        if kind is p.Data or kind is p.End or kind is p.StreamError:
            relay_stream = self.streams.get(event.id)  # type: ignore[union-attr]
            if relay_stream is None:
                if event.id in self._dropped:  # type: ignore[union-attr]
                    return  # late frame of a stream we cancelled: drop it
                if event.id <= self._next_id:  # type: ignore[union-attr]
                    raise p.ProtocolError(f"frame for stream {event.id} after it ended")  # type: ignore[union-attr]
                raise p.ProtocolError(f"frame for stream {event.id} that was never opened")  # type: ignore[union-attr]
            relay_stream.feed(event)  # type: ignore[arg-type]
            if kind is p.Data:
                traffic = self.traffic
                traffic.frames += 1
                traffic.bytes += len(event.payload)  # type: ignore[union-attr]
            if relay_stream.finished:
                del self.streams[relay_stream.id]
                self.load_dirty = True
        elif kind is p.Ping:
            await self._send(p.encode(p.Pong(event.ts)))  # type: ignore[union-attr]
        elif kind is p.Pong:
            pass
        else:
            raise p.ProtocolError(f"agents may not send {kind.__name__} frames")

    async def close(self, code: int, reason: str) -> None:
        """Close the websocket and fail whatever was still running on it."""
        if self.closed:
            return
        self.closed = True
        self.fail_all(f"agent connection closed: {reason}")
        try:
            async with asyncio.timeout(self.send_timeout):
                await self._close(code, reason)
        except Exception:
            pass

    def fail_all(self, message: str) -> None:
        for relay_stream in list(self.streams.values()):
            relay_stream.fail(502, message, "agent_disconnected")
        self.streams.clear()


class SessionManager:
    """Every agent session on this node, indexed by instance."""

    def __init__(self) -> None:
        self._by_instance: dict[str, dict[str, AgentSession]] = {}
        self.traffic = Traffic()

    def __len__(self) -> int:
        return sum(len(s) for s in self._by_instance.values())

    def instance_count(self) -> int:
        """Instances with at least one agent on this node."""
        return len(self._by_instance)

    def all(self) -> list[AgentSession]:
        return [s for sessions in self._by_instance.values() for s in sessions.values()]

    def of(self, instance_id: str) -> list[AgentSession]:
        return list(self._by_instance.get(instance_id, {}).values())

    def get(self, instance_id: str, agent_id: str) -> AgentSession | None:
        return self._by_instance.get(instance_id, {}).get(agent_id)

    def add(self, session: AgentSession) -> AgentSession | None:
        """Register a session; return the stale one it replaces, if any."""
        sessions = self._by_instance.setdefault(session.instance_id, {})
        stale = sessions.get(session.agent_id)
        sessions[session.agent_id] = session
        session.traffic = self.traffic
        return stale

    def remove(self, session: AgentSession) -> None:
        sessions = self._by_instance.get(session.instance_id)
        if sessions and sessions.get(session.agent_id) is session:
            del sessions[session.agent_id]
            if not sessions:
                del self._by_instance[session.instance_id]

    def pick(self, instance_id: str) -> AgentSession | None:
        """The local agent with the lowest load relative to its concurrency."""
        best, best_load = None, 1.0
        for session in self._by_instance.get(instance_id, {}).values():
            if not session.has_capacity:
                continue
            load = session.inflight / session.max_concurrency
            if best is None or load < best_load:
                best, best_load = session, load
        return best

    def stale(self, timeout: float) -> list[AgentSession]:
        deadline = time.monotonic() - timeout
        return [s for s in self.all() if s.last_seen < deadline]
