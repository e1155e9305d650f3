"""Test helpers: run the real relay, a real agent and a fake model in-process.

The only thing faked anywhere in the suite is the model: ``FakeUpstream`` is
a small OpenAI-compatible server (real HTTP, real SSE) that records what it
was asked and notices when a caller hangs up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from agent.backends import DemoBackend, OpenAIBackend
from agent.client import AgentClient
from relay.app import create_app
from relay.server import RelayServer, uvicorn_config
from relay.settings import RelaySettings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fast_settings(**overrides: Any) -> RelaySettings:
    """Relay settings with short timeouts so fault tests finish quickly."""
    base = dict(
        host="127.0.0.1",
        port=free_port(),
        heartbeat_interval=0.2,
        heartbeat_timeout=1.0,
        first_chunk_timeout=5.0,
        idle_timeout=5.0,
        log_level="warning",
    )
    base.update(overrides)
    return RelaySettings(**base)


@contextlib.asynccontextmanager
async def serve_app(app, config: uvicorn.Config, server_class=uvicorn.Server) -> AsyncIterator[uvicorn.Server]:
    server = server_class(config, app) if server_class is RelayServer else server_class(config)
    server.install_signal_handlers = lambda: None  # uvicorn < 0.29 compatibility
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                await task
                raise RuntimeError("server failed to start")
            await asyncio.sleep(0.01)
        yield server
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


@dataclass
class RunningRelay:
    url: str
    app: Any
    settings: RelaySettings
    server: uvicorn.Server

    @property
    def registry(self):
        return self.app.state.registry

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30)

    async def register(self, name: str = "test") -> tuple[str, str]:
        async with self.client() as client:
            response = await client.post("/api/instances", json={"name": name})
            response.raise_for_status()
            data = response.json()
        return data["instance_id"], data["agent_token"]


@contextlib.asynccontextmanager
async def running_relay(redis_url: str, **overrides: Any) -> AsyncIterator[RunningRelay]:
    settings = fast_settings(redis_url=redis_url, **overrides)
    app = create_app(settings)
    async with serve_app(app, uvicorn_config(app, settings), RelayServer) as server:
        yield RunningRelay(f"http://127.0.0.1:{settings.port}", app, settings, server)


@contextlib.asynccontextmanager
async def running_agent(relay_url: str, token: str, backend=None, *, models=None, max_concurrency: int = 16,
                        ) -> AsyncIterator[AgentClient]:
    backend = backend or DemoBackend(rate=0)
    client = AgentClient(
        relay_url=relay_url, token=token, backend=backend, models=models or await backend.models(),
        max_concurrency=max_concurrency, max_backoff=1.0, on_status=lambda line: None,
    )
    task = asyncio.create_task(client.run())
    try:
        await asyncio.wait_for(client.connected.wait(), 10)
        yield client
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


# -- the fake model --------------------------------------------------------------


@dataclass
class FakeUpstream:
    """An OpenAI-compatible model server for tests.

    ``chunks`` words per answer, ``delay`` seconds between them; ``hang=True``
    accepts requests and never answers.  ``requests`` records each body and
    ``disconnects`` counts streams the caller abandoned.

    ``echo=True`` prefixes every word with the last user message, so
    concurrent callers can tell their answers apart; ``gate=N`` holds every
    stream until N are in flight at once (proof of concurrency, not timing);
    ``error_after=N`` sends an error event after N words, mid-stream.
    ``inflight``/``max_inflight`` count streams being answered.
    """

    chunks: int = 5
    delay: float = 0.0
    hang: bool = False
    fail_status: int | None = None
    model: str = "fake-model"
    requests: list[dict[str, Any]] = field(default_factory=list)
    disconnects: int = 0
    completed: int = 0
    echo: bool = False
    gate: int = 0
    error_after: int | None = None
    inflight: int = 0
    max_inflight: int = 0
    url: str = ""
    _gate_open: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/models", self._models),
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
        ])

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                         "owned_by": "test"}]})

    def _chunk(self, n: int, delta: dict, finish: str | None = None) -> bytes:
        return orjson.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
                             "model": self.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        if self.fail_status:
            return JSONResponse({"error": {"message": "fake failure", "type": "server_error"}},
                                status_code=self.fail_status)
        if self.hang:
            # Never answer, but notice the caller hanging up (uvicorn does not
            # cancel a handler whose client left, and would wait for it forever
            # at shutdown).
            while not await request.is_disconnected():
                await asyncio.sleep(0.02)
            self.disconnects += 1
            return Response(status_code=499)
        prefix = f"{_last_user_text(body)}-" if self.echo else ""
        if not body.get("stream"):
            text = " ".join(f"{prefix}w{i}" for i in range(self.chunks))
            self.completed += 1
            return JSONResponse({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": self.chunks, "total_tokens": self.chunks + 1},
            })

        async def events() -> AsyncIterator[bytes]:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            try:
                if self.gate:
                    if self.inflight >= self.gate:
                        self._gate_open.set()
                    await asyncio.wait_for(self._gate_open.wait(), 30)
                for i in range(self.chunks):
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    if i == self.error_after:
                        yield b'data: {"error": {"message": "fake mid-stream failure", "type": "server_error"}}\n\n'
                        return
                    yield b"data: " + self._chunk(i, {"content": f"{prefix}w{i} "}) + b"\n\n"
                yield b"data: " + self._chunk(self.chunks, {}, "stop") + b"\n\n"
                yield b"data: [DONE]\n\n"
                self.completed += 1
            except (asyncio.CancelledError, GeneratorExit):
                self.disconnects += 1
                raise
            finally:
                self.inflight -= 1

        return StreamingResponse(events(), media_type="text/event-stream")


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
            return str(content)
    return ""


@contextlib.asynccontextmanager
async def running_upstream(upstream: FakeUpstream) -> AsyncIterator[FakeUpstream]:
    port = free_port()
    app = upstream.app()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    async with serve_app(app, config):
        upstream.url = f"http://127.0.0.1:{port}/v1"
        yield upstream


def openai_backend(upstream: FakeUpstream) -> OpenAIBackend:
    return OpenAIBackend(upstream.url)


# -- subprocesses ---------------------------------------------------------------


def spawn(args: list[str], env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen:
    """Run one of our console scripts as a real process (same interpreter)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", *args], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs
    )


_SIGTERM = signal.SIGTERM


class Spawned:
    """A spawned process and everything it printed so far (stdout+stderr, read by a thread)."""

    def __init__(self, name: str, popen: subprocess.Popen, url: str = ""):
        self.name = name
        self.popen = popen
        self.url = url
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.popen.stdout is not None
        for raw in iter(self.popen.stdout.readline, b""):
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def count(self, pattern: str) -> int:
        return sum(1 for line in list(self.lines) if re.search(pattern, line))

    async def wait_for_line(self, pattern: str, timeout: float = 20.0, start: int = 0) -> re.Match:
        """The first match of ``pattern`` in a line printed (from line ``start`` on)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.lines)[start:]:
                if match := regex.search(line):
                    return match
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no line matching {pattern!r} within {timeout}s:\n{self.output}")
            if self.popen.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}) without {pattern!r}:\n{self.output}")
            await asyncio.sleep(0.02)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL, and reap (a SIGSTOPped process is resumed first so it can die cleanly)."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
            os.kill(self.popen.pid, signal.SIGCONT)
        self.popen.wait(5)
        self._reader.join(2)

    def stop(self, sig: int = _SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` and wait; SIGKILL if it does not exit in time.  Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._reader.join(5)
        return self.popen.returncode

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} still running after {timeout}s:\n{self.output}")
            await asyncio.sleep(0.02)
        self._reader.join(2)
        return self.popen.returncode


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def sse_lines(response: httpx.Response) -> list[str]:
    """All ``data:`` payloads of an SSE response, in order."""
    out = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            out.append(line[6:])
    return out
