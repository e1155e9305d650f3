"""Streams that cross relay nodes: the same wire frames, carried by Redis pub/sub.

A chat request may arrive at node A while the chosen agent is connected to
node B.  A publishes the ``request`` frame to B's inbox channel, in a
:mod:`wire.bus` envelope naming the agent's session; B opens a normal stream
on that session and publishes the agent's ``data``/``end``/``error`` frames
back to A's inbox as they arrive.  A's ``credit`` and ``cancel`` frames flow
to B, so B's agent is held to the same per-stream window as a local one.  On
A the stream is an ordinary :class:`inflight.Stream` whose link is a
:class:`RemoteLink`: one stream machine, two transports.

An upload (a request's audio file) follows its request the same way: A
publishes ``upload`` frames within the credit it holds, B queues them (at
most one window: A has no more credit than that outstanding) and forwards
them to the agent through its own stream's machine, and passes the agent's
upload credit back to A, naming the agent session (which is what tells it
from A's answer credit on the bus, see ``wire.bus``).

Why pub/sub rather than Redis streams: this traffic is live and only useful
to the one node waiting for it.  Pub/sub delivers in one hop and stores
nothing; a stream would need XADD + XREAD + trimming per chunk and would keep
bytes nobody reads after a node dies.  What pub/sub does not give, we get
cheaply: PUBLISH returns the number of receivers, so a publisher learns at
once that the other node is gone, and each node's liveness covers the
rest.  Order holds because each stream has one publishing task per side,
which awaits every PUBLISH before the next.

The frames of a stream in flight (the answer's data, its end, credit, upload)
are published through a client of their own (``in_flight``, built with the
stream's idle limit as its timeout, ``connection.connect(patience=...)``): a
node whose event loop runs seconds behind under load waits for its turn on
a connection and for Redis's reply, and the stream slows down rather than
being cut because ``RELAY_REDIS_TIMEOUT`` passed (issue 21: 1,000 streams
through a saturated pair of nodes lost 1-2 % this way).  Such a wait never
ends in a silent gap: a frame that cannot be published (Redis refused or
reset the connection, or no reply within the idle limit) fails the stream
with an error, as before.  New work (the request frame) keeps the short
timeout: it is refused quickly instead (and ``overload.py`` sheds it first).

A message this node cannot decode, or that names a stream it does not know,
is logged and dropped: another node's bug never takes this one down.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

import wire
from relay.errors import RelayError, ServiceNotReady
from relay.serving.inflight import LinkLost, Stream, cleanup_scope, split_items
from relay.serving.sessions import SessionManager
from relay.store import connection, keys
from relay.store.agents import AgentEntry
from relay.store.registry import InstanceRegistry
from relay.telemetry import logs

log = logging.getLogger("relay.crossnode")

#: Unknown remote streams remembered, so each gets one extra cancel at most.
MAX_STOPPED = 4096
#: The 0.1 codec: kind byte, 16 ASCII request-id bytes, payload.
LEGACY_RID_LEN = 16


class NodeGone(LinkLost):
    """The other node has no subscriber on its inbox: it is down."""


class RemoteLink:
    """The :class:`inflight.StreamLink` of a stream whose agent sits on another node."""

    __slots__ = ("bus", "node", "session")

    def __init__(self, bus: CrossNode, node: str, session: str = ""):
        self.bus = bus
        self.node = node
        #: The agent session on ``node``: its upload credit comes back naming it.
        self.session = session

    async def send_credit(self, stream_id: int, amount: int) -> None:
        await self.bus.send(self.node, wire.Credit(stream_id, amount), in_flight=True)

    async def send_cancel(self, stream_id: int, reason: str) -> None:
        await self.bus.send(self.node, wire.Cancel(stream_id, reason))

    async def send_upload(self, stream_id: int, payload: bytes) -> None:
        await self.bus.send(self.node, wire.Upload(stream_id, payload), in_flight=True)

    def forget(self, stream_id: int) -> None:
        self.bus.ingress.pop(stream_id, None)

    async def alive(self) -> bool:
        return await self.bus.node_alive(self.node)


class _Served:
    """A stream this node's agent serves for another node (node B's side)."""

    __slots__ = ("scope", "stream", "stopped_because", "window", "uploads", "queued", "wake")

    def __init__(self, scope: anyio.CancelScope, window: int = wire.DEFAULT_WINDOW):
        self.scope = scope
        self.stream: Stream | None = None  # once the request is on its way to the agent
        #: Set when this node stops the stream itself: the caller's node is told why.
        self.stopped_because = ""
        self.window = window
        #: Upload frames from the caller's node not yet passed to the agent,
        #: and their size: at most a window, or the caller's node broke the protocol.
        self.uploads: deque[bytes] = deque()
        self.queued = 0
        #: Set when an upload frame or the agent's upload credit arrives.
        self.wake = asyncio.Event()

    def stop(self, because: str = "") -> None:
        self.stopped_because = self.stopped_because or because
        self.scope.cancel()


class CrossNode:
    """This node's end of the bus: opens streams on other nodes' agents, serves theirs."""

    def __init__(self, redis: Redis, node_id: str, sessions: SessionManager, registry: InstanceRegistry,
                 *, heartbeat_timeout: float, window: int, idle_timeout: float = 60.0,
                 in_flight: Redis | None = None):
        self.redis = redis
        self._publish = connection.publisher(redis)
        #: For the frames of streams in flight: a client as patient as a stream's idle limit.
        self._publish_in_flight = connection.publisher(in_flight) if in_flight is not None else self._publish
        self.node_id = node_id
        self.sessions = sessions
        self.registry = registry
        self.heartbeat_timeout = heartbeat_timeout
        self.idle_timeout = idle_timeout  # B gives up on a silent agent after this, as A does
        self.window = window
        self.ingress: dict[int, Stream] = {}  # streams we serve to our HTTP clients, by our id
        self.egress: dict[tuple[str, int], _Served] = {}  # streams our agents serve: (their node, their id)
        self._next_id = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped: dict[tuple[str, int], None] = {}  # unknown streams we sent a cancel for
        #: Whether our inbox subscription is up (set by the subscriber).  While
        #: it is down, replies to us are dropped by Redis (PUBLISH reaches no
        #: one), so we must not open remote streams.
        self.subscribed = False
        self.forwarded_out = 0  # streams opened on another node's agent (for /metrics)
        self.forwarded_in = 0  # streams our agents served for another node
        #: Raises when this node takes no new work (``overload.LoadMonitor.check``, set by the
        #: composition root): a request another node routed to one of our agents is new work
        #: here too, and is refused as our own callers' requests are (503 node_overloaded).
        self.admit_new: Callable[[], None] = lambda: None

    @property
    def channel(self) -> str:
        return keys.inbox(self.node_id)

    def streams_held(self) -> int:
        """Streams this node holds now: served by its agents (for its callers or another node's),
        and answered to its callers by another node's agents.  What a drain waits for, and what
        ``RELAY_MAX_INFLIGHT`` counts."""
        return self.sessions.inflight() + len(self.ingress)

    async def send(self, node: str, event: wire.Event, session: str = "", *, in_flight: bool = False) -> None:
        """Publish one frame to another node; LinkLost (NodeGone) when it cannot arrive.

        ``in_flight``: a frame of a stream already running, published with the
        stream's patience rather than Redis's short timeout (see the module's doc).
        """
        publish = self._publish_in_flight if in_flight else self._publish
        try:
            receivers = await publish(keys.inbox(node), wire.encode_envelope(self.node_id, event, session))
        except (RedisError, OSError) as exc:
            raise LinkLost(f"message bus unavailable ({type(exc).__name__})") from None
        if not receivers:
            raise NodeGone(f"relay node {node} is gone")

    async def node_alive(self, node: str) -> bool:
        try:
            return await self.registry.node_alive(node)
        except (RedisError, OSError):
            return True  # cannot tell; the idle timeout still bounds the wait

    # -- node A: the node the caller talks to ---------------------------------

    async def open(self, entry: AgentEntry, op: str, body: dict[str, Any], stream: bool, upload: int = 0) -> Stream:
        """Open a stream on ``entry``'s agent, on its node; NodeGone if that node is down.

        ``upload`` bytes are to follow (``Stream.send_upload`` publishes them).
        """
        if not self.subscribed:
            # Node B would answer into the void and the caller would wait for
            # the first-chunk timeout: refuse now instead (just after a Redis
            # restart, until the subscriber is back).
            raise ServiceNotReady("this relay node is reconnecting to its message bus; retry",
                                  headers={"Retry-After": "1"})
        self._next_id = self._next_id % wire.MAX_STREAM_ID + 1
        remote = Stream(RemoteLink(self, entry.node, entry.session), self._next_id, self.window,
                        check_every=self.heartbeat_timeout, upload=upload)
        self.ingress[remote.id] = remote
        request = wire.Request(remote.id, body, stream, self.window, op, logs.request_id.get() or "", upload)
        try:
            await self.send(entry.node, request, entry.session)
        except BaseException:
            self.ingress.pop(remote.id, None)
            raise
        self.forwarded_out += 1
        return remote

    def inbox_lost(self) -> None:
        """Our inbox subscription broke: fail every stream that crosses nodes, now.

        With ``503 relay_unavailable`` (here and wherever the bus fails a stream): a
        moment's outage of the relay's own plumbing, worth retrying; before the
        first byte the caller gets it as its status, with ``Retry-After``.

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
            remote.fail(503, "relay lost its message bus mid-stream; retry", "relay_unavailable")
        for served in list(self.egress.values()):
            served.stop("the relay node holding the agent lost its message bus mid-stream; retry")

    async def send_quietly(self, node: str, event: wire.Event, session: str = "") -> None:
        """Best effort: a node that cannot be reached has nothing left to be told."""
        try:
            await self.send(node, event, session)
        except LinkLost:
            pass

    async def kick(self, node: str, session: str) -> None:
        """Tell another node to drop a stale session of an agent that reconnected here."""
        await self.send_quietly(node, wire.Kick(), session)

    # -- our inbox -------------------------------------------------------------

    def handle(self, message: bytes) -> None:
        """Dispatch one message of our inbox; a bad one is logged and dropped."""
        try:
            envelope = wire.decode_envelope(message)
        except wire.ProtocolError as exc:
            if not self._answer_legacy_open(message):
                log.warning("dropping malformed cross-node message: %s", exc)
            return
        sender = envelope.sender
        match envelope.event:
            case wire.Data() | wire.End() | wire.StreamError() as event:  # node B -> us (node A)
                remote = self.ingress.get(event.id)
                if remote is None or not isinstance(remote.link, RemoteLink) or remote.link.node != sender:
                    if type(event) is wire.Data:
                        self._stop_unknown(sender, event.id)
                    return  # closed here already (late frames), or not that node's stream
                try:
                    remote.feed(event)
                except wire.ProtocolError as exc:  # logged once, with the stream's end (operations.py)
                    remote.fail(502, f"the relay node holding the agent ({sender}) sent a bad frame: {exc}",
                                "relay_protocol_error")
                if remote.finished:
                    self.ingress.pop(remote.id, None)
            case wire.Credit() as credit if envelope.session:  # node B -> us (node A): the agent's upload credit
                remote = self.ingress.get(credit.id)
                link = remote.link if remote is not None else None
                if remote is None or not isinstance(link, RemoteLink) or (link.node, link.session) != \
                        (sender, envelope.session):
                    return  # closed here already, or not that node's stream
                try:
                    remote.feed_credit(credit)
                except wire.ProtocolError as exc:  # logged once, with the stream's end (operations.py)
                    remote.fail(502, f"the relay node holding the agent ({sender}) sent a bad frame: {exc}",
                                "relay_protocol_error")
            case wire.Credit(id=sid, amount=amount):  # node A -> us (node B)
                served = self.egress.get((sender, sid))
                if served is not None and served.stream is not None:
                    self._spawn(served.stream.consumed(amount))
            case wire.Upload() as upload:  # node A -> us (node B)
                served = self.egress.get((sender, upload.id))
                if served is None:
                    return  # refused or stopped here: node A has heard, or will, from the error we sent
                if served.queued + len(upload.payload) > served.window:  # logged once, as the stream stops
                    served.stop(f"the caller's relay node ({sender}) sent more upload than the agent granted")
                    return
                served.uploads.append(upload.payload)
                served.queued += len(upload.payload)
                served.wake.set()
            case wire.Cancel(id=sid):
                served = self.egress.get((sender, sid))
                if served is not None:
                    served.stop()
            case wire.Request() as request:
                key = (sender, request.id)
                if key in self.egress:
                    self._spawn(self._reply_error(sender, request.id, "agent no longer available on its relay node"))
                    return
                try:
                    self.admit_new()
                except RelayError as refused:  # before the agent hears of it: the caller gets the 503
                    self._spawn(self._reply_error(sender, request.id, "the agent's relay node is overloaded; "
                                                  "retry shortly", refused.status, refused.code or "node_overloaded"))
                    return
                # Listed before anything is awaited, so neither a cancel nor the
                # upload frames that follow the request at once are lost.
                served = self.egress[key] = _Served(anyio.CancelScope(), request.window)
                self._spawn(self._serve(sender, envelope.session, request, served))
            case wire.Kick(reason=reason):
                session = self.sessions.by_session(envelope.session)
                if session is not None:
                    self._spawn(session.close(wire.CloseCode.REPLACED, reason))
            case other:
                log.warning("dropping %s frame from node %s: not a cross-node frame", type(other).__name__, sender)

    def _stop_unknown(self, node: str, stream_id: int) -> None:
        """Data for a stream we do not have: its cancel was lost; send one more, once."""
        key = (node, stream_id)
        if key in self._stopped:
            return
        self._stopped[key] = None
        if len(self._stopped) > MAX_STOPPED:
            del self._stopped[next(iter(self._stopped))]
        self._spawn(self.send_quietly(node, wire.Cancel(stream_id, "stream unknown to the caller's relay node")))

    def _answer_legacy_open(self, message: bytes) -> bool:
        """A 0.1 node's ``open`` (its unversioned codec): refuse it in that codec, so its caller
        gets a 503 at once rather than a timeout while the nodes are being upgraded."""
        if message[:1] != b"O" or len(message) < 1 + LEGACY_RID_LEN:
            return False
        try:
            reply = orjson.loads(message[1 + LEGACY_RID_LEN:])["reply"]
            channel = keys.inbox(str(reply))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return False
        error = {"status": 503, "message": "the agent's relay node runs a newer version; retry",
                 "code": "instance_offline"}
        refusal = b"X" + message[1 : 1 + LEGACY_RID_LEN] + orjson.dumps(error)
        self._spawn(self._publish_quietly(channel, refusal))
        log.info("refused a stream from a relay node of an older version (upgrade it)")
        return True

    async def _publish_quietly(self, channel: str, message: bytes) -> None:
        try:
            await self._publish(channel, message)
        except (RedisError, OSError):
            pass

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("cross-node task failed: %r", task.exception())

    # -- node B: the node the agent is connected to ----------------------------

    async def _serve(self, reply: str, session_id: str, request: wire.Request, served: _Served) -> None:
        logs.bind(request_id=request.request_id or None)
        key = (reply, request.id)
        session = self.sessions.by_session(session_id)
        if session is None or not session.has_capacity or request.op not in session.capabilities \
                or (request.upload and session.protocol < 2):
            self.egress.pop(key, None)
            await self._reply_error(reply, request.id, "agent no longer available on its relay node")
            return
        logs.bind(instance_id=session.instance_id)
        # The scope, unlike a task's cancel(), stays cancelled: no await
        # inside can swallow it.
        self.forwarded_in += 1
        local: Stream | None = None
        uploader: asyncio.Task[None] | None = None
        try:
            with served.scope:
                local = await session.open_stream(request.op, request.body, stream=request.stream,
                                                  request_id=request.request_id, window=request.window,
                                                  upload=request.upload)
                served.stream = local
                if request.upload:
                    local.on_upload_credit = served.wake.set
                    uploader = asyncio.create_task(self._forward_upload(reply, session_id, request.id, served, local))
                await self._forward(reply, request.id, local)
        except NodeGone:
            pass  # the caller's node went away: nobody to tell
        except LinkLost as exc:  # the agent, or Redis for a moment: tell the caller's node if we can
            served.stopped_because = served.stopped_because or f"relay node holding the agent: {exc}"
        finally:
            if uploader is not None:
                uploader.cancel()
            self.egress.pop(key, None)
            with cleanup_scope():
                if local is not None:
                    await local.close("caller's relay node cancelled")
                if served.stopped_because:
                    # This node ended the stream: one line here (the caller's node logs its own).
                    log.warning("stream %s served for node %s stopped by this node: %s", request.id, reply,
                                served.stopped_because)
                    await self._reply_error(reply, request.id, served.stopped_because, 503, "relay_unavailable")

    async def _forward(self, reply: str, stream_id: int, local: Stream) -> None:
        silent = 0.0
        while True:
            try:
                items = await local.next(self.heartbeat_timeout)
            except TimeoutError:
                # An agent receiving an upload is not silent: it answers after
                # the last byte (node A bounds a stalled upload itself).
                silent = 0.0 if local.tracker.uploading else silent + self.heartbeat_timeout
                if not await self.node_alive(reply):
                    return
                if silent >= self.idle_timeout:  # the caller's node gave up by now; so do we
                    await self.send(reply, wire.StreamError(stream_id, 504, "the model went silent", "model_timeout"),
                                    in_flight=True)
                    return
                continue
            silent = 0.0
            payload, last = split_items(items)
            if payload:
                await self.send(reply, wire.Data(stream_id, payload), in_flight=True)
            if type(last) is wire.End:
                await self.send(reply, wire.End(stream_id), in_flight=True)
                return
            if type(last) is wire.StreamError:
                await self.send(reply, wire.StreamError(stream_id, last.status, last.message, last.code),
                                in_flight=True)
                return

    async def _forward_upload(self, reply: str, session_id: str, stream_id: int, served: _Served,
                              local: Stream) -> None:
        """Pass node A's upload frames to the agent, and the agent's upload credit back to A.

        Frames go through the local stream's machine, which holds them to the
        agent's credit (node A cannot have more); credit goes back as the
        difference since the last one passed on, so none is lost or doubled
        whichever order the wake-ups come in.  Ends with the upload, or when
        the stream stops uploading (the agent failed, a cancel); never raises:
        a lost agent fails the local stream, which ``_forward`` reports.
        """
        passed_on = 0
        try:
            while True:
                served.wake.clear()  # before looking: what arrives from here on wakes us again
                while served.uploads:
                    payload = served.uploads.popleft()
                    served.queued -= len(payload)
                    if not await local.push_upload(payload):
                        served.uploads.clear()
                        served.queued = 0
                        break
                granted = local.tracker.upload_granted
                if granted > passed_on:
                    # Never dropped silently: node A's upload would wait for it until its stall limit.
                    try:
                        await self.send(reply, wire.Credit(stream_id, granted - passed_on), session_id,
                                        in_flight=True)
                    except LinkLost as exc:
                        local.fail(503, f"could not pass the agent's upload credit on: {exc}", "relay_unavailable")
                        return
                    passed_on = granted
                if not local.tracker.uploading:
                    return
                await served.wake.wait()
        except wire.ProtocolError as exc:  # more than the agent granted: node A's bug (node A logs the end)
            local.fail(502, f"the caller's relay node ({reply}) sent more upload than the agent granted: {exc}",
                       "relay_protocol_error")

    async def _reply_error(self, reply: str, stream_id: int, message: str, status: int = 503,
                           code: str = "instance_offline") -> None:
        await self.send_quietly(reply, wire.StreamError(stream_id, status, message, code))
