"""One operation on an agent, answered: route it, wait for the first frame, stream or collect.

A request is validated by its door, given to the least busy agent of the instance, and
answered once the agent's first frame arrives, so the HTTP status can still
say what happened (a model that fails at once is a 4xx/5xx, not a 200 with an
error inside).  After that the response is Server-Sent Events written as the
agent's bytes arrive, exactly in OpenAI's format, ending in ``data: [DONE]``;
whatever breaks after that point ends the stream with an error event and
``data: [DONE]`` (DESIGN.md), unless the caller is the one who left.

Doors that speak another dialect (SwiftChat's plain-text stream, Dify's
events) pass a :class:`BodyEncoder`; the OpenAI chat doors pass none, and the
agent's streamed bytes go out untouched, never parsed.  (Collected answers
are parsed once where a door reshapes them: :func:`answer_json`.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

import anyio
import orjson
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

import wire
from relay.errors import ModelTimeout, RelayError, UpstreamError, from_status, sse_error
from relay.serving.claims import Claim
from relay.serving.inflight import Item, LazyDeadline, Stream, cleanup_scope, split_items
from relay.serving.router import StreamRouter
from relay.settings import RelaySettings
from relay.telemetry import logs

log = logging.getLogger("relay.chat")

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    # Proxies and browsers must neither cache nor buffer an event stream.
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def answer_json(answer: Response) -> dict[str, Any]:
    """A collected answer's JSON object, for the doors that reshape it (images, Dify, SwiftChat).

    The agent is not trusted to send JSON: anything else is its failure (502), not a relay bug.
    """
    try:
        document = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        document = None
    if not isinstance(document, dict):
        raise UpstreamError("the agent's answer is not a JSON object", code="upstream_error")
    return document


def prefers_event_stream(accept: str | None) -> bool:
    """Whether a caller that left ``stream`` out wants SSE, judging by its ``Accept`` header.

    OpenAI's SDKs (Python and Node, and what is built on them: LangChain,
    LlamaIndex ...) send ``Accept: application/json``; curl, httpx, requests
    and Second Me's clients send ``*/*`` or nothing, and browsers' EventSource
    ``text/event-stream``.  So: SSE unless JSON is asked for and SSE is not.
    """
    if not accept:
        return True
    types = set()
    for item in accept.split(","):
        kind, *params = (piece.strip().lower() for piece in item.split(";"))
        if not any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params):
            types.add(kind)  # q=0 means "not this one" (RFC 9110, 12.4.2)
    return "text/event-stream" in types or "application/json" not in types


class BodyEncoder(Protocol):
    """Turns the agent's SSE payloads into another dialect's body (one encoder per response)."""

    def data(self, payload: bytes) -> bytes:
        """The bytes to write for a payload of SSE events; raise RelayError to end with an error."""

    def done(self) -> bytes:
        """The bytes that end a complete answer."""

    def error(self, error: RelayError) -> bytes:
        """The bytes that end an answer cut short by ``error``."""


def ended_by_relay(stream: Stream, error: RelayError) -> RelayError:
    """The one WARNING line of a stream the relay ended (idle or stall limit, agent or node gone,
    message bus lost, answer too large, drain ...), and ``error``, to raise or send: request and
    instance ids come from the context."""
    log.warning("stream %s ended by the relay: %s [%s]", stream.id, error.message, error.code or "error")
    return error


def stream_error(stream: Stream, item: wire.StreamError) -> RelayError:
    """The error that ended ``stream``, as its caller gets it; logged once when a relay decided it."""
    error = from_status(item.status, item.message, item.code)
    return ended_by_relay(stream, error) if stream.ended_by_relay(item) else error


async def first_items(stream: Stream, timeout: float) -> list[Item]:
    """Wait for the model's first frame; 504 if nothing comes in time."""
    try:
        return await stream.next(timeout)
    except TimeoutError:
        await stream.close("no first chunk in time")
        raise ended_by_relay(stream, ModelTimeout(f"the model sent nothing within {timeout:g} s")) from None


def raise_if_error(stream: Stream, items: list[Item]) -> None:
    """Turn an error the agent (or a relay, for it) reported before any data into an HTTP error."""
    head = items[0]
    if type(head) is wire.StreamError:
        raise stream_error(stream, head)


async def collect(stream: Stream, items: list[Item], idle_timeout: float, limit: int) -> bytes:
    """Gather a non-streaming answer: the agent sends the JSON body as data (at most ``limit`` bytes)."""
    parts: list[bytes] = []
    size = 0
    while True:
        for item in items:
            if type(item) is bytes:
                parts.append(item)
                size += len(item)
                if size > limit:  # an agent is not trusted to bound what the relay holds
                    await stream.close("answer too large")
                    raise ended_by_relay(stream, UpstreamError(f"the model's answer exceeds {limit} bytes",
                                                               code="answer_too_large"))
                await stream.consumed(len(item))
            elif type(item) is wire.End:
                return b"".join(parts)
            elif type(item) is wire.StreamError:  # after some data: still an error
                raise stream_error(stream, item)
        try:
            items = await stream.next(idle_timeout)
        except TimeoutError:
            await stream.close("idle timeout")
            raise ended_by_relay(stream, ModelTimeout(f"the model went silent for {idle_timeout:g} s")) from None


class ClientGone(Exception):
    """The caller hung up, or stopped reading for longer than the stall limit."""


async def cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    """Wait for the client to hang up, then cancel ``scope`` (the task group writing its response)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


class StallGuard:
    """A deadline on the send in progress (a :class:`inflight.LazyDeadline`): past it, the
    sending task is cancelled, and :meth:`stalled` tells that cancellation from any other."""

    __slots__ = ("timeout", "_deadline", "_task", "fired")

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._deadline = LazyDeadline(self._expired)
        self._task: asyncio.Task[object] | None = None
        self.fired = False

    def start(self) -> None:
        self._task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        self._deadline.set(loop, loop.time() + self.timeout)

    def stop(self) -> None:
        self._deadline.clear()

    def _expired(self) -> None:
        if self._task is not None:
            self.fired = True
            self._task.cancel()

    def stalled(self) -> bool:
        """After a CancelledError in the send: was it this guard's, and only this guard's?"""
        if not self.fired:
            return False
        self.fired = False
        task = asyncio.current_task()
        return task is not None and task.uncancel() == 0

    def discard(self) -> None:
        self._deadline.discard()


class EventStreamResponse(Response):
    """Writes a stream to the client as Server-Sent Events.

    Two tasks share one cancel scope: the writer forwards the agent's bytes
    (several queued chunks in one write, a lone chunk at once), the watcher
    waits for the client to disconnect.  Whichever ends first ends both, and
    if the stream is still running the agent is told to cancel it.
    """

    def __init__(self, stream: Stream, first: list[Item], idle_timeout: float, stall_timeout: float,
                 encoder: BodyEncoder | None = None):
        self.encoder = encoder
        self.stream = stream
        self.first = first
        self.idle_timeout = idle_timeout
        self.stall_timeout = stall_timeout
        self.guard = StallGuard(stall_timeout)
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            # Every message, body chunks too, goes through the whole middleware
            # chain: a middleware added later sees the streams (measured: the
            # two or three calls it costs a chunk are lost in the noise, bench/README.md).
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_on_disconnect, receive, tg.cancel_scope)
                try:
                    await self._write(send)
                except ClientGone:
                    pass  # the finally clause cancels the stream at the agent
                tg.cancel_scope.cancel()
        finally:
            self.guard.discard()
            with cleanup_scope():
                await self.stream.close("client disconnected")

    async def _send(self, send: Send, body: bytes, more: bool) -> None:
        message: Message = {"type": "http.response.body", "body": body, "more_body": more}
        # A client that stops reading blocks this send (uvicorn waits for the
        # socket to drain); the agent stops too once the window is spent.
        # Past the stall limit, give up on the client.
        guard = self.guard
        guard.start()
        try:
            await send(message)
        except asyncio.CancelledError:
            if not guard.stalled():
                raise
            ended_by_relay(self.stream, RelayError(f"the client read nothing for {self.stall_timeout:g} s",
                                                   code="client_stalled"))
            logs.ended_on_purpose()
            raise ClientGone() from None
        except OSError:
            raise ClientGone() from None
        finally:
            guard.stop()

    async def _write(self, send: Send) -> None:
        try:
            await self._relay(send)
        except ClientGone:
            raise
        except RelayError as exc:  # the encoder found the answer broken
            ended_by_relay(self.stream, exc)
            await self._send(send, self._error(exc), False)
        except Exception as exc:  # a bug on our side: still end the caller's stream properly
            log.exception("stream %s failed in the relay", self.stream.id)
            await self._send(send, self._error(RelayError(f"relay error: {type(exc).__name__}")), False)

    def _error(self, error: RelayError) -> bytes:
        return sse_error(error) if self.encoder is None else self.encoder.error(error)

    async def _relay(self, send: Send) -> None:
        stream, items, encoder = self.stream, self.first, self.encoder
        while True:
            payload, last = split_items(items)
            if payload:
                out = payload if encoder is None else encoder.data(payload)
                if out:
                    await self._send(send, out, True)
                await stream.consumed(len(payload))  # never raises: a lost link fails the stream
            if type(last) is wire.End:
                await self._send(send, wire.SSE_DONE if encoder is None else encoder.done(), False)
                return
            if type(last) is wire.StreamError:
                await self._send(send, self._error(stream_error(stream, last)), False)
                return
            try:
                items = await stream.next(self.idle_timeout)
            except TimeoutError:
                await stream.close("idle timeout")
                error = ended_by_relay(stream, ModelTimeout(f"the model went silent for {self.idle_timeout:g} s"))
                await self._send(send, self._error(error), False)
                return


async def run_op(router: StreamRouter, instance_id: str, op: str, body_for: Callable[[tuple[str, ...]], Any],
                 settings: RelaySettings, receive: Receive | None = None, *, stream: bool, claim: Claim | None,
                 model: str = "", encoder: BodyEncoder | None = None, upload: bytes = b"") -> Response:
    """Route one validated operation and build its response.

    ``body_for(models)`` makes the agent's request body once the agent is
    chosen; ``model``, when given, only agents serving it are chosen.  A
    streamed answer is an :class:`EventStreamResponse` (through ``encoder``
    when given); a collected one a ``Response`` whose ``body`` is the agent's
    JSON, which doors may reshape.

    ``receive`` (the request's ASGI channel, body already read) lets the wait
    for the model's first chunk, or for a whole non-streaming answer, end as
    soon as the caller hangs up: the server does not cancel a handler whose
    client left, and the model would otherwise work for nobody until a timeout.

    ``upload`` is a request body too large for the request frame (an audio
    file, read in full and bounded by the door): it follows the request in
    frames of at most one window, each waiting for the agent's credit,
    while the agent's frames are read as they come.  The agent answers only
    once it has the whole upload, but may fail before, which stops the
    upload at once; so does the caller hanging up.  The wait for the first
    chunk starts when the upload is complete: it bounds the model's work,
    not the transfer (which a stall limit bounds instead).

    ``claim``: what the request holds (``admission.leased``), for the router.
    """
    streaming = stream
    opened = await router.open(instance_id, op, body_for, stream=streaming, claim=claim, model=model,
                               upload=len(upload))
    return await _answer(opened, settings, receive, streaming, encoder, upload)


async def _answer(stream: Stream, settings: RelaySettings, receive: Receive | None, streaming: bool,
                  encoder: BodyEncoder | None, upload: bytes = b"") -> Response:
    try:
        body = None
        with anyio.CancelScope() as waiting:
            watcher = asyncio.create_task(cancel_on_disconnect(receive, waiting)) if receive else None
            try:
                if upload:
                    # Returns early if the stream ends: the agent's early error
                    # is then the first item below.
                    await stream.send_upload(upload, stall_timeout=settings.idle_timeout)
                items = await first_items(stream, settings.first_chunk_timeout)
                raise_if_error(stream, items)
                if not streaming:
                    body = await collect(stream, items, settings.idle_timeout, settings.max_answer_bytes)
            finally:
                if watcher is not None:
                    watcher.cancel()
        if waiting.cancelled_caught:
            with cleanup_scope():
                await stream.close("client disconnected")
            return Response(status_code=499)  # nobody is left to read it
        if streaming:
            # From here the response owns the stream and closes it.
            return EventStreamResponse(stream, items, settings.idle_timeout, settings.stall_timeout, encoder)
        with cleanup_scope():
            await stream.close("done")
        return Response(body, media_type="application/json")
    except BaseException:
        # Errors and cancellation (client gone while we waited) stop the agent too.
        with cleanup_scope():
            await stream.close("request failed")
        raise
