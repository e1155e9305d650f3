"""Streams that cross relay nodes, carried by Redis pub/sub.

A chat request may arrive at node A while the chosen agent is connected to
node B.  A publishes an ``open`` message to B's inbox channel; B opens a
normal stream on its agent session and publishes the agent's bytes back to
A's inbox as they arrive; A writes them to its HTTP client.  Credit flows
A -> B as A's client consumes, so B's agent is held to the same per-stream
window as a local one; ``cancel`` flows A -> B; ``end``/``error`` B -> A.

Why pub/sub rather than Redis streams: this traffic is live and only useful
to the one node waiting for it.  Pub/sub delivers with one hop and stores
nothing; a stream would need XADD + XREAD + trimming per chunk and would keep
bytes nobody will read after a node dies.  What pub/sub does not give, we
get cheaply: PUBLISH returns the number of receivers, so a publisher learns at
once when the other node is gone, and each node's liveness key covers the
rest.  Order is preserved because each stream has a single publishing task
on each side, which awaits every PUBLISH before the next.

Message layout (binary): ``kind (1 byte) | request id (16 ASCII) | payload``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any, Awaitable, Callable

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import keys, logs
from . import protocol as p
from .errors import ServiceNotReady
from .registry import AgentEntry, InstanceRegistry
from .sessions import Backlog, RelayStream, SessionManager, split_items

log = logging.getLogger("relay.crossnode")

OPEN, DATA, END, ERROR, CREDIT, CANCEL, KICK = b"O", b"D", b"E", b"X", b"C", b"K", b"R"
RID_LEN = 16


class NodeGone(Exception):
    """The other node has no subscriber on its inbox: it is down."""


def new_rid() -> str:
    return secrets.token_hex(RID_LEN // 2)


def encode(kind: bytes, rid: str, payload: bytes = b"") -> bytes:
    return kind + rid.encode() + payload


def decode(message: bytes) -> tuple[bytes, str, bytes]:
    if len(message) < 1 + RID_LEN:
        raise ValueError("cross-node message too short")
    return message[:1], message[1 : 1 + RID_LEN].decode(), message[1 + RID_LEN :]


class RemoteStream:
    """Node A's side of a stream whose agent is on node B.

    Same interface as :class:`sessions.RelayStream` (``next``, ``consumed``,
    ``close``, ``finished``), so the chat endpoint does not care where the
    agent is.
    """

    def __init__(self, bus: "CrossNode", rid: str, node: str, window: int):
        self.id = rid
        self.bus = bus
        self.node = node
        self.window = window
        self.state = p.StreamState.OPEN
        self.on_close: Callable[[], Awaitable[None]] | None = None
        self._items = Backlog()
        self._unreported = 0
        self._closed = False

    @property
    def finished(self) -> bool:
        return self.state.finished

    def feed(self, item: bytes | p.End | p.StreamError) -> None:
        if self.finished:
            return
        if type(item) is p.End:
            self.state = p.StreamState.ENDED
        elif type(item) is p.StreamError:
            self.state = p.StreamState.FAILED
        else:
            self.state = p.StreamState.STREAMING
        self._items.push(item)

    async def next(self, timeout: float | None) -> list:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._items:
            # Wait in slices of one heartbeat timeout, checking between them
            # that node B is still alive: a dead node sends no error.
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            slice_ = self.bus.heartbeat_timeout if remaining is None else min(remaining, self.bus.heartbeat_timeout)
            try:
                await self._items.wait(slice_)
            except TimeoutError:
                if not self._items and not await self.bus.node_alive(self.node):
                    self.feed(p.StreamError(0, 502, f"relay node {self.node} holding the agent is gone",
                                            "agent_disconnected"))
        return self._items.take()

    async def consumed(self, nbytes: int) -> None:
        # Report in batches of half a window, as a local stream grants credit.
        self._unreported += nbytes
        if self._unreported >= self.window // 2 and not self.finished:
            amount, self._unreported = self._unreported, 0
            await self.bus.publish(self.node, encode(CREDIT, self.id, str(amount).encode()))

    async def close(self, reason: str = "client disconnected") -> None:
        if self._closed:
            return
        self._closed = True
        self.bus.ingress.pop(self.id, None)
        if not self.finished:
            self.state = p.StreamState.CANCELLED
            try:
                await self.bus.publish(self.node, encode(CANCEL, self.id, reason.encode()))
            except (NodeGone, RedisError, OSError):
                pass
        if self.on_close is not None:
            await self.on_close()


class CrossNode:
    """This node's end of the cross-node bus: opens remote streams, serves them."""

    def __init__(self, redis: Redis, node_id: str, sessions: SessionManager, registry: InstanceRegistry,
                 *, heartbeat_timeout: float, window: int):
        self.redis = redis
        self.node_id = node_id
        self.sessions = sessions
        self.registry = registry
        self.heartbeat_timeout = heartbeat_timeout
        self.window = window
        self.ingress: dict[str, RemoteStream] = {}  # streams we serve to our HTTP clients
        self.egress: dict[str, tuple[RelayStream, asyncio.Task]] = {}  # streams our agents serve for others
        self._opening: dict[str, asyncio.Task] = {}
        #: Whether our inbox subscription is up (set by ``Node.listen``).  While
        #: it is down, replies to us are dropped by Redis (PUBLISH reaches no
        #: one), so we must not open remote streams.
        self.subscribed = False
        self.forwarded_out = 0  # streams opened on another node's agent (for /metrics)
        self.forwarded_in = 0  # streams our agents served for another node

    @property
    def channel(self) -> str:
        return keys.inbox(self.node_id)

    async def publish(self, node: str, message: bytes) -> None:
        if not await self.redis.publish(keys.inbox(node), message):
            raise NodeGone(node)

    async def node_alive(self, node: str) -> bool:
        try:
            return await self.registry.node_alive(node)
        except (RedisError, OSError):
            return True  # cannot tell; the idle timeout still bounds the wait

    # -- node A: the node the caller talks to ---------------------------------

    async def open(self, entry: AgentEntry, instance_id: str, body: dict[str, Any], stream: bool) -> RemoteStream:
        if not self.subscribed:
            # Node B would answer into the void and the caller would wait for
            # the first-chunk timeout: refuse now instead (just after a Redis
            # restart, until the listener has resubscribed).
            raise ServiceNotReady("this relay node is reconnecting to its message bus; retry",
                                  headers={"Retry-After": "1"})
        rid = new_rid()
        remote = RemoteStream(self, rid, entry.node, self.window)
        self.ingress[rid] = remote
        message = {
            "iid": instance_id, "agent": entry.agent_id, "session": entry.session,
            "body": body, "stream": stream, "reply": self.node_id,
            "req": logs.request_id.get(),  # so both nodes log the same request id
        }
        try:
            await self.publish(entry.node, encode(OPEN, rid, orjson.dumps(message)))
        except BaseException:
            self.ingress.pop(rid, None)
            raise
        self.forwarded_out += 1
        return remote

    def inbox_lost(self) -> None:
        """Our inbox subscription broke: fail every stream that crosses nodes, now.

        Messages published to us meanwhile are gone (pub/sub stores nothing),
        so a stream we serve to a caller may miss chunks or its end: give its
        caller an error instead of an idle-timeout wait.  Streams our agents
        serve for others may miss credit and cancels: stop them (the agent
        aborts); their callers' nodes see the error or our node's liveness.
        """
        self.subscribed = False
        if self.ingress or self.egress:
            log.warning("message bus connection lost: failing %d cross-node streams",
                        len(self.ingress) + len(self.egress))
        for remote in list(self.ingress.values()):
            remote.feed(p.StreamError(0, 502, "relay lost its message bus mid-stream; retry", "relay_unavailable"))
        for _, task in list(self.egress.values()):
            task.cancel()

    async def kick(self, node: str, instance_id: str, agent_id: str, session: str) -> None:
        """Tell another node to drop a stale session of an agent that reconnected here."""
        payload = orjson.dumps({"iid": instance_id, "agent": agent_id, "session": session})
        try:
            await self.publish(node, encode(KICK, "0" * RID_LEN, payload))
        except (NodeGone, RedisError, OSError):
            pass  # that node is gone, and its session with it

    # -- dispatch of our inbox -------------------------------------------------

    def handle(self, message: bytes) -> None:
        try:
            kind, rid, payload = decode(message)
        except (ValueError, UnicodeDecodeError):
            log.warning("dropping malformed cross-node message")
            return
        if kind == DATA or kind == END or kind == ERROR:
            remote = self.ingress.get(rid)
            if remote is None:
                return  # stream already closed here: late bytes are dropped
            if kind == DATA:
                remote.feed(payload)
            elif kind == END:
                remote.feed(p.End(0, orjson.loads(payload) if payload else None))
            else:
                err = orjson.loads(payload)
                remote.feed(p.StreamError(0, err["status"], err["message"], err.get("code")))
        elif kind == CREDIT:
            held = self.egress.get(rid)
            if held is not None:
                self._spawn(held[0].consumed(int(payload)))
        elif kind == CANCEL:
            held = self.egress.pop(rid, None)
            if held is not None:
                held[1].cancel()
        elif kind == OPEN:
            task = asyncio.create_task(self._serve(rid, orjson.loads(payload)))
            self._opening[rid] = task
            task.add_done_callback(lambda _t, rid=rid: self._opening.pop(rid, None))
        elif kind == KICK:
            info = orjson.loads(payload)
            for session in self.sessions.of(info["iid"]):
                if session.agent_id == info["agent"] and session.session_id == info["session"]:
                    self._spawn(session.close(p.CloseCode.REPLACED, "replaced by a newer connection"))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        task.add_done_callback(_log_failure)

    # -- node B: the node the agent is connected to ----------------------------

    async def _serve(self, rid: str, msg: dict[str, Any]) -> None:
        logs.bind(request_id=msg.get("req"), instance_id=msg["iid"])
        reply = msg["reply"]
        session = self.sessions.get(msg["iid"], msg["agent"])
        if session is None or session.session_id != msg["session"] or not session.has_capacity:
            await self._reply_error(reply, rid, 503, "agent no longer available on its relay node",
                                    "instance_offline")
            return
        try:
            relay_stream = await session.open_stream(msg["body"], stream=msg["stream"])
        except Exception:
            await self._reply_error(reply, rid, 503, "agent connection lost", "instance_offline")
            return
        task = asyncio.current_task()
        assert task is not None
        self.egress[rid] = (relay_stream, task)
        self.forwarded_in += 1
        try:
            await self._forward(rid, relay_stream, reply)
        except (NodeGone, asyncio.CancelledError):
            pass  # the caller's node went away, or the caller cancelled
        except (RedisError, OSError) as exc:
            log.warning("cross-node stream %s lost redis (%s)", rid, exc)
        finally:
            self.egress.pop(rid, None)
            await asyncio.shield(relay_stream.close("caller's relay node cancelled"))

    async def _forward(self, rid: str, relay_stream: RelayStream, reply: str) -> None:
        while True:
            try:
                items = await relay_stream.next(self.heartbeat_timeout)
            except TimeoutError:
                if not await self.node_alive(reply):
                    return
                continue
            payload, last = split_items(items)
            if last is None:
                tail = None
            elif type(last) is p.End:
                tail = encode(END, rid, orjson.dumps(last.usage) if last.usage else b"")
            else:
                tail = encode(ERROR, rid, orjson.dumps(
                    {"status": last.status, "message": last.message, "code": last.code}))
            if payload:
                await self.publish(reply, encode(DATA, rid, payload))
            if tail is not None:
                await self.publish(reply, tail)
                return

    async def _reply_error(self, reply: str, rid: str, status: int, message: str, code: str) -> None:
        try:
            await self.publish(reply, encode(ERROR, rid, orjson.dumps(
                {"status": status, "message": message, "code": code})))
        except (NodeGone, RedisError, OSError):
            pass

    @property
    def active(self) -> int:
        return len(self.ingress) + len(self.egress)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("cross-node task failed: %r", task.exception())
