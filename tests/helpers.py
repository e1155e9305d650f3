"""Test helpers: run the real relay, a real agent and a fake model in-process.

The only thing faked anywhere in the suite is the model: ``FakeUpstream`` is
a small OpenAI-compatible server (real HTTP, real SSE) that records what it
was asked and notices when a caller hangs up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from websockets.exceptions import ConnectionClosed

import wire
from agent.client import AgentClient
from agent.demo_model import DemoBackend
from agent.media import encode_png
from agent.upstream import OpenAIBackend
from relay.app import create_app
from relay.server.edge import RelayServer, uvicorn_config
from relay.services import Services
from relay.settings import RelaySettings
from relay.store import connection


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_client(url: str):
    """A client for any Redis URL the relay takes (one server, or Sentinel), connected as the relay connects."""
    return connection.connect(url, RelaySettings())


async def kill_subscriptions(redis) -> int:
    """Close every pub/sub connection Redis has (on every node of a cluster); how many were closed."""
    if connection.is_cluster(redis):
        killed = await redis.client_kill_filter(_type="pubsub", target_nodes=redis.ALL_NODES)
        return sum(killed.values())
    return await redis.client_kill_filter(_type="pubsub")


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
    server = server_class(config, app.state.services) if server_class is RelayServer else server_class(config)
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
    def services(self) -> Services:
        return self.app.state.services

    @property
    def registry(self):
        return self.services.registry

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30)

    async def register(self, name: str = "test") -> tuple[str, str]:
        return await register_at(self.url, name)


async def register_at(url: str, name: str) -> tuple[str, str]:
    """Register an instance at the relay at ``url``: (instance id, agent token)."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        response = await client.post("/api/instances", json={"name": name})
        response.raise_for_status()
        data = response.json()
    return data["instance_id"], data["agent_token"]


async def until_healthy(proc: Spawned, url: str, path: str = "/healthz", timeout: float = 30.0) -> None:
    """Wait until the relay process ``proc`` answers ``path`` with 200; fail at once if it exits."""
    async def healthy() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"relay exited ({proc.popen.returncode}):\n{proc.output}")
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(f"{url}{path}", timeout=2)).status_code == 200
        except httpx.HTTPError:
            return False

    await wait_until(healthy, timeout=timeout, what=f"relay {path}")


#: The relays this process runs (``running_relay``), by URL.
_in_process: dict[str, RunningRelay] = {}


@contextlib.asynccontextmanager
async def running_relay(redis_url: str, **overrides: Any) -> AsyncIterator[RunningRelay]:
    settings = fast_settings(redis_url=redis_url, **overrides)
    app = create_app(settings)
    async with serve_app(app, uvicorn_config(app, settings), RelayServer) as server:
        relay = RunningRelay(f"http://127.0.0.1:{settings.port}", app, settings, server)
        _in_process[relay.url] = relay
        try:
            yield relay
        finally:
            _in_process.pop(relay.url, None)


@contextlib.asynccontextmanager
async def running_agent(relay_url: str, token: str, backend=None, *, models=None, max_concurrency: int = 16,
                        max_upload: int | None = None, parameters: dict[str, Any] | None = None,
                        ) -> AsyncIterator[AgentClient]:
    """A connected agent; with an in-process relay, one that requests can already reach.

    The relay sends its welcome before it records the agent in Redis (a request
    must never reach an agent before its welcome), so "connected" alone does not
    mean routable: a request sent at once, at this node or another, could find
    the instance offline.  Waits for the agent's entry (or for the connection
    to end: some tests connect agents the relay closes at once).
    """
    backend = backend or DemoBackend(rate=0)
    client = AgentClient(
        relay_url=relay_url, token=token, backend=backend, models=models or await backend.models(),
        max_concurrency=max_concurrency, max_backoff=1.0, on_status=lambda line: None,
        **({} if max_upload is None else {"max_upload": max_upload}), parameters=parameters,
    )
    task = asyncio.create_task(client.run())
    try:
        await asyncio.wait_for(client.connected.wait(), 10)
        relay = _in_process.get(relay_url)
        if relay is not None:
            async def recorded_or_gone() -> bool:
                if not client.connected.is_set() or task.done():
                    return True
                try:
                    live = await relay.registry.live_agents(client.status.instance_id)
                except Exception:  # Redis down in this test: nothing to wait for
                    return True
                return any(entry.agent_id == client.agent_id for entry in live)

            await wait_until(recorded_or_gone, 10, what="the agent recorded by the relay")
        yield client
    finally:
        swallowed = await _stop(task)
        close = getattr(backend, "aclose", None)  # its connections to the model server (it stays usable)
        if close is not None:
            await close()
    if swallowed:  # (only when the test itself passed: its own failure comes first)
        raise AssertionError("AgentClient.run() went on after it was cancelled (a swallowed CancelledError: "
                             "the agent would not stop on SIGTERM either)")


async def _stop(task: asyncio.Task, deadline: float = 15.0) -> bool:
    """Cancel ``task`` and wait for it to end; True if it swallowed the cancellation.

    A task that swallows it is cancelled again until it ends, so that a bug
    there fails the test that met it instead of hanging the whole run.
    """
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=deadline)
    if done:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            task.result()
        return False
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1)
    return True


# -- what callers see -------------------------------------------------------------


def _url_of(where: str | RunningRelay | Any) -> str:
    return where if isinstance(where, str) else where.url


async def instance_view(where: str | RunningRelay | httpx.AsyncClient | Any, instance_id: str) -> dict[str, Any]:
    """``GET /api/instances/{id}`` at a relay: a URL, a ``RunningRelay``, a spawned node, or a client."""
    if isinstance(where, httpx.AsyncClient):
        response = await where.get(f"/api/instances/{instance_id}")
    else:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(f"{_url_of(where)}/api/instances/{instance_id}")
    response.raise_for_status()
    return response.json()


async def online(where: Any, instance_id: str, agents: int | None = None) -> dict[str, Any] | None:
    """The instance's view if it is online (with exactly ``agents`` agents, if given), else None."""
    view = await instance_view(where, instance_id)
    if view["status"] == "online" and (agents is None or view["agents"] == agents):
        return view
    return None


async def offline(where: Any, instance_id: str) -> bool:
    return (await instance_view(where, instance_id))["status"] == "offline"


def assert_openai_error(response: httpx.Response, status: int, *, type_: str | None = None,
                        code: str | None = None, param: str | None = None) -> dict:
    """``response`` is an error in OpenAI's shape, with this status (and type, code, param if given)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if type_ is not None:
        assert error["type"] == type_
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


# -- the fake model --------------------------------------------------------------


#: The fake model server's picture: a real 3x2 PNG (red, green, blue over white, grey, black).
FAKE_PNG = encode_png(3, 2, [b"\xff\x00\x00\x00\xff\x00\x00\x00\xff", b"\xff\xff\xff\x80\x80\x80\x00\x00\x00"])


@dataclass
class FakeUpstream:
    """An OpenAI-compatible model server for tests.

    ``chunks`` words per answer, ``delay`` seconds between them; ``hang=True``
    accepts requests and never answers.  ``requests`` records each body and
    ``disconnects`` counts streams the caller abandoned.

    ``recall=True`` prefixes every word with how many user messages the model got and
    the first one (what a conversation's history looks like from the model).
    ``echo=True`` prefixes every word with the last user message, so
    concurrent callers can tell their answers apart; ``gate=N`` holds every
    stream until N are in flight at once (proof of concurrency, not timing);
    ``error_after=N`` sends an error event after N words, mid-stream.
    ``hold_after=N`` streams N words, then holds each stream until
    ``release()`` (a stream that is surely still in flight when a test breaks
    something, however slow the machine; a caller hanging up still ends it).
    ``inflight``/``max_inflight`` count streams being answered.

    ``/images/generations`` answers ``n`` copies of ``FAKE_PNG`` as
    ``b64_json`` and records each body in ``image_requests``; with
    ``image_as_url=True`` it answers ``url`` items pointing at its own
    ``/files/x.png`` instead, which serves ``image_file`` (``FAKE_PNG`` unless
    set), unsized (chunked), and records each download's headers in
    ``file_requests``.  ``fail_status`` fails image requests too.

    ``/audio/transcriptions`` parses the multipart body as OpenAI would and
    records, in ``transcriptions``, the file's size, SHA-256, name and
    content type and the other fields; it answers ``{"text": "fake
    transcript of N bytes"}``, or that text alone for the ``text``, ``srt``
    and ``vtt`` formats.  ``fail_status`` fails it too.
    """

    chunks: int = 5
    delay: float = 0.0
    hang: bool = False
    fail_status: int | None = None
    model: str = "fake-model"
    requests: list[dict[str, Any]] = field(default_factory=list)
    #: The client address of each chat request: one port for many requests is a connection kept alive.
    peers: list[tuple[str, int]] = field(default_factory=list)
    disconnects: int = 0
    completed: int = 0
    echo: bool = False
    recall: bool = False
    gate: int = 0
    error_after: int | None = None
    hold_after: int | None = None
    inflight: int = 0
    max_inflight: int = 0
    url: str = ""
    image_requests: list[dict[str, Any]] = field(default_factory=list)
    image_as_url: bool = False
    image_file: bytes | None = None
    file_requests: list[dict[str, str]] = field(default_factory=list)
    transcriptions: list[dict[str, Any]] = field(default_factory=list)
    _gate_open: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _released: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def release(self) -> None:
        """Let held streams (and every later one) run to their end."""
        self._released.set()

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/models", self._models),
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/images/generations", self._images, methods=["POST"]),
            Route("/v1/files/{name}", self._file),
            Route("/v1/audio/transcriptions", self._transcriptions, methods=["POST"]),
        ])

    async def _transcriptions(self, request: Request) -> Response:
        async with request.form(max_files=1) as form:
            upload = form.get("file")
            fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            content = await upload.read() if isinstance(upload, UploadFile) else b""
            record = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest(), "fields": fields,
                      "filename": upload.filename if isinstance(upload, UploadFile) else None,
                      "content_type": upload.content_type if isinstance(upload, UploadFile) else None}
        self.transcriptions.append(record)
        if self.fail_status:
            return JSONResponse({"error": {"message": "fake transcription failure", "type": "invalid_request_error"}},
                                status_code=self.fail_status)
        if not isinstance(upload, UploadFile):
            return JSONResponse({"error": {"message": "no file", "type": "invalid_request_error"}}, status_code=400)
        text = f"fake transcript of {len(content)} bytes"
        if fields.get("response_format") in ("text", "srt", "vtt"):
            return PlainTextResponse(text)
        return JSONResponse({"text": text})

    async def _images(self, request: Request) -> Response:
        body = await request.json()
        self.image_requests.append(body)
        if self.fail_status:
            return JSONResponse({"error": {"message": "fake image failure", "type": "server_error"}},
                                status_code=self.fail_status)
        n = body.get("n") or 1
        if self.image_as_url:
            items = [{"url": f"{self.url}/files/x.png", "revised_prompt": body.get("prompt")} for _ in range(n)]
        else:
            items = [{"b64_json": base64.b64encode(FAKE_PNG).decode()} for _ in range(n)]
        return JSONResponse({"created": 1, "data": items})

    async def _file(self, request: Request) -> Response:
        self.file_requests.append(dict(request.headers))
        content = FAKE_PNG if self.image_file is None else self.image_file

        async def pieces() -> AsyncIterator[bytes]:
            for start in range(0, len(content), 1 << 20):
                yield content[start : start + (1 << 20)]

        # No content-length: the agent has to count what it reads to keep its bound.
        return StreamingResponse(pieces(), media_type="image/png")

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                         "owned_by": "test"}]})

    def _chunk(self, n: int, delta: dict, finish: str | None = None) -> bytes:
        return orjson.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
                             "model": self.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        if request.client is not None:
            self.peers.append((request.client.host, request.client.port))
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
        if self.recall:  # an answer that shows what history the model was given
            users = [m.get("content") for m in body.get("messages", []) if m.get("role") == "user"]
            prefix = f"[{len(users)} asked, first {users[0]!s}]-" if users else ""
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
                    if i == self.hold_after:
                        await self._released.wait()
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    if i == self.error_after:
                        yield b'data: {"error": {"message": "fake mid-stream failure", "type": "server_error"}}\n\n'
                        return
                    yield b"data: " + self._chunk(i, {"content": f"{prefix}w{i} "}) + b"\n\n"
                yield b"data: " + self._chunk(self.chunks, {}, "stop") + b"\n\n"
                if (body.get("stream_options") or {}).get("include_usage") is True:  # OpenAI's last chunk
                    usage = {"prompt_tokens": 1, "completion_tokens": self.chunks, "total_tokens": self.chunks + 1}
                    yield b"data: " + orjson.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                                                    "created": 0, "model": self.model, "choices": [],
                                                    "usage": usage}) + b"\n\n"
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
        try:
            yield upstream
        finally:
            upstream.release()  # a held stream must not hold up the server's shutdown


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

    async def wait_for_count(self, pattern: str, n: int, timeout: float = 20.0) -> None:
        """Until ``n`` lines printed so far match ``pattern`` (its output is read by a thread: it may lag)."""
        deadline = time.monotonic() + timeout
        while self.count(pattern) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: fewer than {n} lines matching {pattern!r} within {timeout}s:\n"
                                     f"{self.output}")
            await asyncio.sleep(0.02)

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
                raise AssertionError(
                    f"{self.name} exited ({self.popen.returncode}) without {pattern!r}:\n{self.output}")
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


@contextlib.contextmanager
def frozen(process: Spawned | subprocess.Popen) -> Iterator[None]:
    """SIGSTOP ``process`` for the block, like a cut network (its sockets stay open, it says nothing).

    It is resumed on leaving, whatever happened: a frozen process cannot act on
    SIGTERM, and must not outlive the test frozen.
    """
    popen = process.popen if isinstance(process, Spawned) else process
    popen.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGCONT)


class Stopwatch:
    """Measures one recovery and prints it, so a ``-s`` run shows the figures (never asserted on)."""

    def __init__(self, what: str):
        self.what = what
        self.start = time.monotonic()

    def lap(self, event: str) -> float:
        elapsed = time.monotonic() - self.start
        print(f"\n[recovery] {self.what}: {event} after {elapsed:.2f}s")
        return elapsed


async def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
                     what: str = "condition") -> Any:
    """Poll ``predicate`` (plain or async) until it returns something true, and return that.

    ``timeout`` is a deadline for a behaviour that must happen, never a
    performance bound: make it generous, a loaded machine is slow.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
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


class InFlight:
    """A streaming response that has begun: ``events`` so far, ``rest()`` for the others."""

    def __init__(self, response: httpx.Response):
        self.response = response
        self.events: list[str] = []
        self._lines = response.aiter_lines()

    async def read(self, n: int) -> None:
        async for line in self._lines:
            if line.startswith("data: "):
                self.events.append(line[6:])
                if len(self.events) >= n:
                    return
        raise AssertionError(f"the stream ended after {len(self.events)} events: {self.events[-3:]}")

    async def rest(self, timeout: float = 30.0) -> list[str]:
        """Every event up to the end of the stream; all of them, in order.

        ``timeout`` is generous: it turns a stream that never ends into a failure.
        """
        async with asyncio.timeout(timeout):
            async for line in self._lines:
                if line.startswith("data: "):
                    self.events.append(line[6:])
        return self.events


@contextlib.asynccontextmanager
async def stream_in_flight(client: httpx.AsyncClient, url: str, body: dict[str, Any], *, after: int = 2,
                           headers: dict[str, str] | None = None) -> AsyncIterator[InFlight]:
    """POST a streaming chat request and enter once ``after`` events arrived: the stream is running.

    What a test breaks inside the block (an agent, a node, Redis) happens
    mid-stream; ``rest()`` reads what the caller gets then.  Leaving the block
    without reading the rest hangs up, mid-stream.
    """
    async with client.stream("POST", url, json=body, headers=headers) as response:
        assert response.status_code == 200, (await response.aread()).decode(errors="replace")
        stream = InFlight(response)
        await stream.read(after)
        yield stream


async def keep_alive(ws: Any) -> None:
    """Ping the relay from a raw test agent every 0.2 s, until its connection closes.

    Well-behaved in this one respect, so the relay's heartbeat timeout never
    decides a test meant to be about something else.
    """
    with contextlib.suppress(ConnectionClosed):
        while True:
            await asyncio.sleep(0.2)
            await ws.send(wire.encode(wire.Ping(0.0)))


async def chat_ok(client: httpx.AsyncClient, url: str) -> bool:
    """Whether one streamed chat at ``url`` answers 200 and ends with ``[DONE]`` (False on a transport error)."""
    try:
        async with client.stream("POST", url, json={"messages": [{"role": "user", "content": "hi"}],
                                                    "stream": True}) as response:
            return response.status_code == 200 and (await sse_lines(response))[-1] == "[DONE]"
    except httpx.HTTPError:
        return False


def assert_serve_refuses_url(url: str, tmp_path: Any, capsys: Any) -> None:
    """``relay serve --redis-url url`` stops at once with exit 2 and a one-line reason, no traceback."""
    import logging
    import signal as signals

    from relay.server.cli import main

    handler = signals.getsignal(signals.SIGTERM)  # main() installs its own
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # ... and its log handler, on this test's captured stderr
    try:
        assert main(["serve", "--redis-url", url, "--data-dir", str(tmp_path)]) == 2
    finally:
        signals.signal(signals.SIGTERM, handler)
        root.handlers[:], root.level = handlers, level
    error = capsys.readouterr().err
    assert error.startswith("relay: bad Redis URL:") and "Traceback" not in error
