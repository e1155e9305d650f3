"""One request in flight, as the relay's HTTP side sees it, wherever its agent is.

A :class:`Stream` is the wire protocol's stream machine
(:class:`wire.StreamTracker`) plus a queue of what arrived for the HTTP
response, over a :class:`StreamLink`: the agent's websocket when the agent
is connected to this node (``sessions.AgentSession``), the bus to the node
holding it otherwise (``crossnode.RemoteLink``).  The chat response reads
the same interface either way: ``next``, ``consumed``, ``close``.

Every ending goes through the machine: the agent's ``end``/``error``, the
relay's own failures (:meth:`Stream.fail`), the caller leaving
(:meth:`Stream.close`).  Whatever breaks on the way, including the link
refusing a credit frame, turns into a ``StreamError`` in the queue, so the
caller always gets an error event and the end of the stream.

A request with an upload (an audio file) sends it through the same stream
(:meth:`Stream.send_upload`): one window at most per frame, each frame
waiting for the agent's credit, so the upload shares the agent's websocket
with every other stream frame by frame, and holds nothing beyond the bytes
the door already read.  The machine stops it as soon as the stream ends
for any reason (the agent failed early, the caller left, the link broke).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio

import wire

log = logging.getLogger("relay.streams")

#: What the queue holds: payload bytes, or the event that ended the stream.
Item = bytes | wire.End | wire.StreamError

#: Error codes a relay node decides (this one, or the node holding the agent), never
#: an agent: a stream ended with one of them was ended by the relay, and the node
#: answering the caller logs it at WARNING, once (``operations.py``).
RELAY_CODES = frozenset({"relay_unavailable", "relay_protocol_error", "agent_disconnected", "model_timeout",
                         "instance_offline"})

#: Longest a shielded cleanup (cancel the agent's stream, give slots back) may
#: take: cleanups must finish even when the caller is gone, but never hang.
CLEANUP_TIMEOUT = 10.0


def cleanup_scope() -> anyio.CancelScope:
    """A cancel scope for cleanup that cancellation cannot interrupt, bounded in time."""
    return anyio.CancelScope(shield=True, deadline=anyio.current_time() + CLEANUP_TIMEOUT)


class LinkLost(Exception):
    """The transport of a stream cannot carry frames any more (agent or node gone)."""


class StreamLink(Protocol):
    """Where a stream's credit, cancel and upload frames go; raises :class:`LinkLost` when it cannot."""

    async def send_credit(self, stream_id: int, amount: int) -> None: ...

    async def send_cancel(self, stream_id: int, reason: str) -> None: ...

    async def send_upload(self, stream_id: int, payload: bytes) -> None: ...

    def forget(self, stream_id: int) -> None: ...

    async def alive(self) -> bool:
        """Checked when the stream has been silent a while: is the other end still there?"""
        ...


def split_items(items: list[Item]) -> tuple[bytes, wire.End | wire.StreamError | None]:
    """Join the payloads of a backlog; return them with the final event, if any.

    Whoever drains a stream writes everything queued in one go (one socket
    write or one publish), then handles the end or error.
    """
    if len(items) == 1 and type(items[0]) is bytes:
        return items[0], None  # the common case: one chunk, no copy
    payload = bytearray()
    last: wire.End | wire.StreamError | None = None
    for item in items:
        if type(item) is bytes:
            payload += item
        else:
            last = item  # type: ignore[assignment]
    return bytes(payload), last


class LazyDeadline:
    """A deadline that moves on every chunk and almost never expires, on one timer.

    ``asyncio.timeout`` around each wait or send scheduled and cancelled a
    timer per chunk.  Here moving the deadline only stores a float; the
    timer, when it fires early (the deadline moved on since it was armed),
    re-arms itself at the current deadline, and calls ``fire`` only once the
    deadline has really passed.  A stream that flows never touches the event
    loop's timer heap.  Used for the model's idle limit (``Backlog``) and the
    caller's stall limit (``operations.StallGuard``).
    """

    __slots__ = ("_when", "_timer", "_fire")

    def __init__(self, fire: Callable[[], None]):
        self._when = math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._fire = fire

    def set(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        """Expire at ``when`` (loop time); arms a timer only if none is armed for earlier."""
        self._when = when
        if self._timer is None or self._timer.when() > when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(when, self._expire, loop)

    def clear(self) -> None:
        """Nothing to expire now (an armed timer finds this and lapses)."""
        self._when = math.inf

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._when == math.inf:
            return  # cleared since: the next set() arms a timer again
        if loop.time() < self._when:
            self._timer = loop.call_at(self._when, self._expire, loop)
        else:
            self._when = math.inf
            self._fire()

    def discard(self) -> None:
        """Done for good: no timer may keep the owner alive."""
        self._when = math.inf
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Backlog:
    """Items queued for one reader, and the one waiter the reader may be.

    The feeder pushes without ever blocking; the reader takes everything
    queued at once (so it can coalesce it into one write) or waits, up to a
    deadline kept by a :class:`LazyDeadline`.
    """

    __slots__ = ("_items", "_waiter", "_deadline")

    def __init__(self) -> None:
        self._items: deque[Item] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = LazyDeadline(self._timed_out)

    def __bool__(self) -> bool:
        return bool(self._items)

    def push(self, item: Item) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        """Return once something is queued; TimeoutError after ``timeout`` seconds."""
        if self._items:
            return
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        if timeout is not None:
            self._deadline.set(loop, loop.time() + timeout)
        try:
            await waiter
        finally:
            self._waiter = None
            self._deadline.clear()

    def _timed_out(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    def discard(self) -> None:
        """The stream is over: no timer may keep it alive."""
        self._deadline.discard()

    def take(self) -> list[Item]:
        items = list(self._items)
        self._items.clear()
        return items


class Stream:
    """One request in flight: the machine, the queue, the link.

    The queue cannot grow past the window plus one frame: the sender must
    wait for credit, and the machine refuses a sender that does not.
    """

    __slots__ = ("id", "link", "tracker", "on_close", "on_upload_credit", "check_every", "_items", "_closed",
                 "_sender_done", "_ended_here", "_upload_wake")

    def __init__(self, link: StreamLink, stream_id: int, window: int, *, check_every: float | None = None,
                 upload: int = 0):
        self.id = stream_id
        self.link = link
        self.tracker = wire.StreamTracker(stream_id, window, upload=upload)
        #: Called when the agent grants upload credit (node B passes it on to node A).
        self.on_upload_credit: Callable[[], None] | None = None
        #: Set whenever the uploader may be able to go on: credit came, or the stream ended.
        self._upload_wake = asyncio.Event()
        #: Awaited once when the stream is closed (the router gives its slot back).
        self.on_close: Callable[[], Awaitable[None]] | None = None
        #: How long a silent stream waits before asking ``link.alive()`` (None: never).
        self.check_every = check_every
        self._items = Backlog()
        self._closed = False
        #: The sender ended the stream itself (end or error): nothing to cancel.
        self._sender_done = False
        #: The relay ended it (failed or cancelled) before the sender did.
        self._ended_here = False

    @property
    def finished(self) -> bool:
        return self.tracker.finished

    def ended_by_relay(self, error: wire.StreamError) -> bool:
        """Whether ``error``, which ended this stream, was a relay's decision rather than the agent's report."""
        return (self._ended_here and not self._sender_done) or error.code in RELAY_CODES

    # -- fed by the transport ----------------------------------------------------

    def feed(self, event: wire.Data | wire.End | wire.StreamError) -> None:
        """A frame from the sender; ProtocolError when it is illegal (the sender's fault)."""
        if self._ended_here and not self._sender_done:  # two flags on the per-chunk path
            # The relay ended this stream and the sender has not heard yet:
            # its frames in flight are expected, and dropped.
            self._sender_done = not isinstance(event, wire.Data)
            return
        self.tracker.receive(event)
        if isinstance(event, wire.Data):
            self._items.push(event.payload)
        else:
            self._sender_done = True
            self._items.push(event)
            self._upload_wake.set()  # an early error stops the upload

    def feed_credit(self, event: wire.Credit) -> None:
        """Upload credit from the agent; ProtocolError when no upload is in progress (the agent's fault)."""
        if self._ended_here and not self._sender_done:
            return  # ended here, the agent has not heard yet: its credit in flight means nothing now
        self.tracker.receive(event)
        self._upload_wake.set()
        if self.on_upload_credit is not None:
            self.on_upload_credit()

    def fail(self, status: int, message: str, code: str | None = None) -> None:
        """End the stream from the relay's side (agent lost, node gone ...); idempotent."""
        error = wire.StreamError(self.id, status, message, code)
        if self.tracker.end_here(error):
            self._ended_here = True
            self._items.push(error)
            self._upload_wake.set()

    # -- the upload ----------------------------------------------------------------

    async def push_upload(self, payload: bytes) -> bool:
        """Send one upload frame the credit covers; False once the stream has stopped uploading.

        The frame is counted before it is sent, so the machine moves to OPEN
        (answers allowed) before the agent can have the last byte.  A link
        that cannot carry it fails the stream.  ProtocolError when it is
        more than the credit allows (on node B: node A's fault).
        """
        if not self.tracker.uploading:
            return False
        self.tracker.receive(wire.Upload(self.id, payload))
        try:
            await self.link.send_upload(self.id, payload)
        except LinkLost as exc:
            log.debug("stream %s: upload frame not delivered (%s); failing it", self.id, exc)
            self.fail(502, f"lost the agent mid-upload: {exc}", "agent_disconnected")
            return False
        return True

    async def send_upload(self, data: bytes, *, stall_timeout: float) -> None:
        """Send the request's upload (``data``, exactly ``tracker.upload`` bytes) as the credit allows.

        Returns once all of it is sent, or as soon as the stream ended: the
        agent failed early, the caller left (the stream was closed), the link
        broke.  An agent that grants nothing for ``stall_timeout`` seconds
        fails the stream (504); a link that can die silently (another node)
        is checked every ``check_every`` seconds of waiting.
        """
        tracker = self.tracker
        if len(data) != tracker.upload:
            raise ValueError(f"upload of {len(data)} bytes on a stream that declared {tracker.upload}")
        view = memoryview(data)
        frame = tracker.window  # a frame never exceeds a window: the agent's frame limit fits one
        while tracker.uploading:
            room = tracker.upload_room
            if room <= 0:
                await self._wait_for_credit(stall_timeout)
                continue
            start = tracker.upload_sent
            if not await self.push_upload(bytes(view[start : start + min(room, frame)])):
                return

    async def _wait_for_credit(self, stall_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + stall_timeout
        tracker = self.tracker
        while tracker.uploading and tracker.upload_room <= 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.fail(504, f"the agent took none of the upload for {stall_timeout:g} s", "model_timeout")
                return
            slice_ = remaining if self.check_every is None else min(remaining, self.check_every)
            self._upload_wake.clear()  # cleared before waiting, after checking: no wake-up is lost
            try:
                async with asyncio.timeout(slice_):
                    await self._upload_wake.wait()
            except TimeoutError:
                if self.check_every is not None and tracker.uploading and not await self.link.alive():
                    self.fail(502, "the relay node holding the agent is gone", "agent_disconnected")

    # -- drained by the HTTP response --------------------------------------------

    async def next(self, timeout: float | None) -> list[Item]:
        """Everything queued so far (at least one item), or TimeoutError.

        Returning the whole backlog lets the response coalesce chunks already
        waiting into one socket write without delaying a lone chunk.  A link
        that can die silently (another node) is checked every ``check_every``
        seconds of silence, and a dead one fails the stream.
        """
        if self.check_every is None or self._items:
            await self._items.wait(timeout)
            return self._items.take()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._items:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            slice_ = self.check_every if remaining is None else min(remaining, self.check_every)
            try:
                await self._items.wait(slice_)
            except TimeoutError:
                if not self._items and not await self.link.alive():
                    self.fail(502, "the relay node holding the agent is gone", "agent_disconnected")
        return self._items.take()

    async def consumed(self, nbytes: int) -> None:
        """The client took ``nbytes``: return credit to the sender when due.

        Never raises: a link that cannot carry the credit fails the stream,
        and the caller reads that as the stream's error and end.
        """
        grant = self.tracker.consumed(nbytes)
        if not grant:
            return
        try:
            await self.link.send_credit(self.id, grant)
        except LinkLost as exc:
            # Not logged here: the caller's response logs the stream's end, once (operations.py).
            log.debug("stream %s: credit not delivered (%s); failing it", self.id, exc)
            self.fail(502, f"lost the agent mid-stream: {exc}", "agent_disconnected")

    async def close(self, reason: str = "client disconnected") -> None:
        """Done with this stream, for whatever reason; idempotent.

        A stream still running is cancelled at the agent (which aborts the
        model's request); late frames for it are then dropped.
        """
        if self._closed:
            return
        self._closed = True
        self._items.discard()
        if self.tracker.end_here(wire.Cancel(self.id, reason)):
            self._ended_here = True
        self._upload_wake.set()
        # Forgotten first: frames the sender sends while the cancel is on its
        # way are dropped as late, never taken for a protocol violation.
        self.link.forget(self.id)
        try:
            if not self._sender_done:  # running, or ended by the relay alone: stop the sender
                try:
                    await self.link.send_cancel(self.id, reason)
                except LinkLost:
                    pass  # agent or node already gone: nothing left to cancel
        finally:
            if self.on_close is not None:
                await self.on_close()
