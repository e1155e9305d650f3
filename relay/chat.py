"""The public chat endpoint: route a request to an agent and stream the answer.

A request is validated, given to the least busy agent of the instance, and
answered once the agent's first frame arrives, so the HTTP status can still
say what happened (a model that fails at once is a 4xx/5xx, not a 200 with an
error inside).  After that the response is Server-Sent Events written as the
agent's bytes arrive, exactly in OpenAI's format, ending in ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio
import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from . import protocol as p
from .errors import ModelTimeout, error_body, from_status
from .sessions import RelayStream, cleanup_scope, split_items

log = logging.getLogger("relay.chat")

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    # Proxies and browsers must neither cache nor buffer an event stream.
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


async def first_items(relay_stream: RelayStream, timeout: float) -> list:
    """Wait for the model's first frame; 504 if nothing comes in time."""
    try:
        return await relay_stream.next(timeout)
    except TimeoutError:
        await relay_stream.close("no first chunk in time")
        raise ModelTimeout(f"the model sent nothing within {timeout:g} s") from None


def raise_if_error(items: list) -> None:
    """Turn an error the agent reported before any data into an HTTP error."""
    head = items[0]
    if type(head) is p.StreamError:
        raise from_status(head.status, head.message, head.code)


async def collect(relay_stream: RelayStream, items: list, idle_timeout: float) -> bytes:
    """Gather a non-streaming answer: the agent sends the JSON body as data."""
    parts: list[bytes] = []
    while True:
        for item in items:
            if type(item) is bytes:
                parts.append(item)
                await relay_stream.consumed(len(item))
            elif type(item) is p.End:
                return b"".join(parts)
            else:  # StreamError after some data: still report it as an error
                raise from_status(item.status, item.message, item.code)
        try:
            items = await relay_stream.next(idle_timeout)
        except TimeoutError:
            await relay_stream.close("idle timeout")
            raise ModelTimeout(f"the model went silent for {idle_timeout:g} s") from None


def sse_error(message: str, type_: str, code: str | None) -> bytes:
    return p.sse_event(orjson.dumps(error_body(message, type_, None, code))) + p.SSE_DONE


class SlowReader(Exception):
    """The client stopped reading for longer than the stall limit."""


class EventStreamResponse(Response):
    """Writes a relay stream to the client as Server-Sent Events.

    Two tasks share one cancel scope: the writer forwards the agent's bytes
    (several queued chunks in one write, a lone chunk at once), the watcher
    waits for the client to disconnect.  Whichever ends first ends both, and
    if the stream is still running the agent is told to cancel it.
    """

    def __init__(self, relay_stream: RelayStream, first: list, idle_timeout: float, stall_timeout: float):
        self.relay_stream = relay_stream
        self.first = first
        self.idle_timeout = idle_timeout
        self.stall_timeout = stall_timeout
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relay_stream = self.relay_stream
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_disconnect)
                try:
                    await self._write(send)
                except (OSError, SlowReader):
                    pass  # client gone or stalled; the finally clause cancels the stream
                tg.cancel_scope.cancel()
        finally:
            with cleanup_scope():
                await relay_stream.close("client disconnected")

    async def _write(self, send: Send) -> None:
        relay_stream, items = self.relay_stream, self.first
        while True:
            payload, last = split_items(items)
            if last is None:
                tail = None
            elif type(last) is p.End:
                tail = p.SSE_DONE
            else:
                tail = sse_error(last.message, "upstream_error", last.code)
            if payload:
                try:
                    # A client that stops reading blocks this send (uvicorn
                    # waits for the socket to drain); the agent stops too once
                    # the window is spent.  Past the stall limit, give up.
                    async with asyncio.timeout(self.stall_timeout):
                        await send({"type": "http.response.body", "body": payload, "more_body": True})
                except TimeoutError:
                    log.warning("stream %s: client read nothing for %gs; cutting it off",
                                relay_stream.id, self.stall_timeout)
                    raise SlowReader() from None
                await relay_stream.consumed(len(payload))
            if tail is not None:
                await send({"type": "http.response.body", "body": tail, "more_body": False})
                return
            try:
                items = await relay_stream.next(self.idle_timeout)
            except TimeoutError:
                log.warning("stream %s: model idle for %gs, ending it", relay_stream.id, self.idle_timeout)
                await relay_stream.close("idle timeout")
                body = sse_error(f"the model went silent for {self.idle_timeout:g} s", "timeout_error", "model_timeout")
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def run_chat(router: Any, instance_id: str, request: Any, settings: Any,
                   receive: Receive | None = None) -> Response:
    """Route one validated chat request and build its response.

    ``receive`` (the request's ASGI channel, body already read) lets the wait
    for the model's first chunk, or for a whole non-streaming answer, end as
    soon as the caller hangs up: the server does not cancel a handler whose
    client left, and the model would otherwise work for nobody until a timeout.
    """
    relay_stream = await router.open(instance_id, request)
    try:
        body = None
        with anyio.CancelScope() as waiting:
            watcher = asyncio.create_task(_cancel_on_disconnect(receive, waiting)) if receive else None
            try:
                items = await first_items(relay_stream, settings.first_chunk_timeout)
                raise_if_error(items)
                if not request.stream:
                    body = await collect(relay_stream, items, settings.idle_timeout)
            finally:
                if watcher is not None:
                    watcher.cancel()
        if waiting.cancelled_caught:
            with cleanup_scope():
                await relay_stream.close("client disconnected")
            return Response(status_code=499)  # nobody is left to read it
        if request.stream:
            # From here the response owns the stream and closes it.
            return EventStreamResponse(relay_stream, items, settings.idle_timeout, settings.stall_timeout)
        with cleanup_scope():
            await relay_stream.close("done")
        return Response(body, media_type="application/json")
    except BaseException:
        # Errors and cancellation (client gone while we waited) stop the agent too.
        with cleanup_scope():
            await relay_stream.close("request failed")
        raise
