"""Where answers come from: a local OpenAI-compatible server, or the demo model.

A backend turns one OpenAI chat request into either a stream of chunk JSON
documents (``stream``, yielding them in batches: all the chunks that arrived
together, so the agent can send them in one frame without waiting for more)
or one ``chat.completion`` JSON body (``complete``), as raw bytes.  Failures are
:class:`BackendError` with an HTTP status hint.
Cancelling the consuming task aborts the upstream HTTP request at once
(httpx closes the connection when its stream context is left).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

import httpx
import orjson

import wire


class BackendError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class Backend(Protocol):
    #: Operations it can run (``wire.OP_CHAT`` ...), declared to the relay in ``hello``.
    capabilities: tuple[str, ...]

    async def models(self) -> list[str]: ...

    def stream(self, body: dict[str, Any]) -> AsyncIterator[list[bytes]]: ...

    async def complete(self, body: dict[str, Any]) -> bytes: ...

    async def aclose(self) -> None: ...


# -- OpenAI-compatible upstream -------------------------------------------------


def _upstream_error(status: int, payload: bytes) -> BackendError:
    message = (wire.error_message(payload) or payload.decode(errors="replace")[:500]
               or f"upstream answered HTTP {status}")
    # The caller's mistakes (4xx) keep their status; the model server's own
    # failures become 502, since for the caller the gateway's upstream failed.
    mapped = status if 400 <= status < 500 and status not in (401, 403, 407) else 502
    return BackendError(mapped, f"model server: {message}", "upstream_error")


class OpenAIBackend:
    """Any server that speaks OpenAI's ``/chat/completions`` and ``/models``."""

    capabilities: tuple[str, ...] = (wire.OP_CHAT,)

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
                    events = wire.iter_sse_data(buffer, data)
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


def text_of(content: Any) -> str:
    """The text of a message's ``content``, whatever the caller put there.

    The relay's schema allows a string, null, or a list of parts of any type,
    where only ``text`` parts must carry a string ``text``: an image part has
    none, and another part may say ``"text": null``.  Anything that is not a
    string contributes nothing.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def demo_reply(messages: Any) -> list[str]:
    """The demo model's deterministic answer, as the words it streams."""
    last = ""
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            last = text_of(message.get("content"))
            break
    said = " ".join(last.split()[:24]) or "nothing"
    text = (
        "Hello! I am the instance-relay demo model, answering from the agent's machine "
        f"through the relay. You said: {said}. Point the agent at a real model with "
        "--backend openai --upstream-url to get real answers."
    )
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _count_tokens(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(len(text_of(m.get("content")).split()) + 3 for m in messages if isinstance(m, dict))


class DemoBackend:
    """A built-in model that streams a fixed reply word by word at ``rate`` words/s."""

    capabilities: tuple[str, ...] = (wire.OP_CHAT,)

    def __init__(self, rate: float = 20.0, model: str = DEMO_MODEL):
        self.rate = rate
        self.model = model

    async def models(self) -> list[str]:
        return [self.model]

    def _words(self, body: dict[str, Any]) -> tuple[list[str], str]:
        words = demo_reply(body.get("messages"))
        # The tighter of max_tokens and max_completion_tokens (OpenAI's newer
        # name); a value that is not a positive count sets no limit.
        asked = (body.get("max_tokens"), body.get("max_completion_tokens"))
        limit = min((n for n in asked if isinstance(n, int) and not isinstance(n, bool) and n > 0),
                    default=len(words))
        return words[:limit], ("stop" if limit >= len(words) else "length")

    def _usage(self, body: dict[str, Any], completion: int) -> dict[str, int]:
        prompt = _count_tokens(body.get("messages"))
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
        options = body.get("stream_options")  # an object or null; anything else is no options
        if isinstance(options, dict) and options.get("include_usage") is True:
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
