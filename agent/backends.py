"""Where answers come from: a local OpenAI-compatible server, or the demo model.

A backend turns one OpenAI chat request into either a stream of chunk JSON
documents (``stream``, yielding them in batches: all the chunks that arrived
together, so the agent can send them in one frame without waiting for more)
or one ``chat.completion`` JSON body (``complete``), as raw bytes.  Failures are :class:`BackendError` with an HTTP status hint.
Cancelling the consuming task aborts the upstream HTTP request at once
(httpx closes the connection when its stream context is left).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any, AsyncIterator, Protocol

import httpx
import orjson


class BackendError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class Backend(Protocol):
    async def models(self) -> list[str]: ...

    def stream(self, body: dict[str, Any]) -> AsyncIterator[list[bytes]]: ...

    async def complete(self, body: dict[str, Any]) -> bytes: ...

    async def aclose(self) -> None: ...


# -- OpenAI-compatible upstream -------------------------------------------------


_LINE_END = re.compile(rb"\r\n|\r|\n")


def iter_sse_data(buffer: bytearray, data: bytes) -> list[bytes]:
    """Feed bytes of an event stream; return the ``data`` of each complete event.

    A small incremental parser for the subset of the SSE format (WHATWG HTML
    s9.2.6) that OpenAI-style servers emit: ``data`` fields, comments, blank
    line = dispatch; lines may end in CRLF, LF or CR, even mixed in one stream
    (so the parser works line by line rather than looking for one fixed
    blank-line pattern); multi-line data joined by LF.  ``buffer`` keeps the
    unfinished event between calls.
    """
    buffer += data
    if b"\r" not in buffer:
        return _lf_events(buffer)
    events: list[bytes] = []
    lines: list[bytes] = []
    pos = event_start = 0
    size = len(buffer)
    while (match := _LINE_END.search(buffer, pos)) is not None:
        line = bytes(buffer[pos : match.start()])
        if match.end() == size and match.group() == b"\r" and line:
            # A CR ending the buffer may be the first half of a CRLF split
            # across feeds; wait for the next byte.  (After an empty line it is
            # safe to dispatch now: a following LF is just one more empty line.)
            break
        pos = match.end()
        if not line:
            if lines:
                events.append(b"\n".join(lines))
                lines = []
            event_start = pos
        elif line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
        elif line == b"data":
            lines.append(b"")
    del buffer[:event_start]
    return events


def _lf_events(buffer: bytearray) -> list[bytes]:
    """The fast path of :func:`iter_sse_data` for LF-only streams (what servers send).

    Splits whole events at blank lines in one pass instead of line by line;
    an event that is exactly one ``data:`` line (nearly all of them) costs one
    slice.
    """
    end = buffer.rfind(b"\n\n")
    if end == -1:
        return []
    block = bytes(buffer[:end])
    del buffer[: end + 2]
    events: list[bytes] = []
    for event in block.split(b"\n\n"):
        if not event.strip(b"\n"):
            continue
        if event.startswith(b"data: ") and b"\n" not in event:
            events.append(event[6:])
            continue
        lines = []
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                value = line[5:]
                lines.append(value[1:] if value.startswith(b" ") else value)
            elif line == b"data":
                lines.append(b"")
        if lines:
            events.append(b"\n".join(lines))
    return events


def _upstream_error(status: int, payload: bytes) -> BackendError:
    message = payload.decode(errors="replace")[:500] or f"upstream answered HTTP {status}"
    try:
        obj = orjson.loads(payload)
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            message = err["message"]
        elif isinstance(err, str):
            message = err
    except orjson.JSONDecodeError:
        pass
    # The caller's mistakes (4xx) keep their status; the model server's own
    # failures become 502, since for the caller the gateway's upstream failed.
    mapped = status if 400 <= status < 500 and status not in (401, 403, 407) else 502
    return BackendError(mapped, f"model server: {message}", "upstream_error")


class OpenAIBackend:
    """Any server that speaks OpenAI's ``/chat/completions`` and ``/models``."""

    def __init__(self, base_url: str, *, api_key: str | None = None, models: list[str] | None = None,
                 timeout: float = 600.0, transport: httpx.AsyncBaseTransport | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._configured_models = models or []
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            # No read timeout on a stream: a model may think for a long time;
            # the relay enforces the first-chunk and idle timeouts.
            timeout=httpx.Timeout(timeout, connect=10.0, read=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            transport=transport,
        )

    async def models(self) -> list[str]:
        if self._configured_models:
            return list(self._configured_models)
        try:
            response = await self.client.get("/models")
            response.raise_for_status()
            data = response.json().get("data", [])
            names = [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            raise BackendError(502, f"cannot list models at {self.base_url}/models: {exc}") from exc
        if not names:
            raise BackendError(502, f"{self.base_url}/models lists no models; pass --model")
        return names

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        body = {**body, "stream": True}
        try:
            async with self.client.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    raise _upstream_error(response.status_code, await response.aread())
                buffer = bytearray()
                done = False
                async for data in response.aiter_raw():
                    if done:
                        continue  # read the body to its end so the connection is reused
                    events = iter_sse_data(buffer, data)
                    if b"[DONE]" in events:
                        events = events[: events.index(b"[DONE]")]
                        done = True
                    if events:
                        yield events
        except httpx.HTTPError as exc:
            raise BackendError(502, f"model server unreachable: {type(exc).__name__}: {exc}") from exc

    async def complete(self, body: dict[str, Any]) -> bytes:
        body = {**body, "stream": False}
        try:
            response = await self.client.post("/chat/completions", json=body)
        except httpx.HTTPError as exc:
            raise BackendError(502, f"model server unreachable: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            raise _upstream_error(response.status_code, response.content)
        return response.content

    async def aclose(self) -> None:
        await self.client.aclose()


# -- demo model ----------------------------------------------------------------

DEMO_MODEL = "demo"


def demo_reply(messages: list[dict[str, Any]]) -> list[str]:
    """The demo model's deterministic answer, as the words it streams."""
    last = ""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            last = str(content or "")
            break
    said = " ".join(last.split()[:24]) or "nothing"
    text = (
        "Hello! I am the instance-relay demo model, answering from the agent's machine "
        f"through the relay. You said: {said}. Point the agent at a real model with "
        "--backend openai --upstream-url to get real answers."
    )
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _count_tokens(messages: list[dict[str, Any]]) -> int:
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        total += len(str(content or "").split()) + 3
    return total


class DemoBackend:
    """A built-in model that streams a fixed reply word by word at ``rate`` words/s."""

    def __init__(self, rate: float = 20.0, model: str = DEMO_MODEL):
        self.rate = rate
        self.model = model

    async def models(self) -> list[str]:
        return [self.model]

    def _words(self, body: dict[str, Any]) -> tuple[list[str], str]:
        words = demo_reply(body.get("messages", []))
        limit = int(body.get("max_tokens") or len(words))
        return words[:limit], ("stop" if limit >= len(words) else "length")

    def _usage(self, body: dict[str, Any], completion: int) -> dict[str, int]:
        prompt = _count_tokens(body.get("messages", []))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        words, finish = self._words(body)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": self.model, "system_fingerprint": None}

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            return orjson.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

        yield [chunk({"role": "assistant", "content": ""})]
        delay = 1.0 / self.rate if self.rate > 0 else 0.0
        for word in words:
            if delay:
                await asyncio.sleep(delay)
            yield [chunk({"content": word})]
        tail = [chunk({}, finish)]
        if (body.get("stream_options") or {}).get("include_usage"):
            tail.append(orjson.dumps({**base, "choices": [], "usage": self._usage(body, len(words))}))
        yield tail

    async def complete(self, body: dict[str, Any]) -> bytes:
        words, finish = self._words(body)
        if self.rate > 0:
            await asyncio.sleep(len(words) / self.rate)
        return orjson.dumps({
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                         "finish_reason": finish}],
            "usage": self._usage(body, len(words)),
        })

    async def aclose(self) -> None:
        pass
