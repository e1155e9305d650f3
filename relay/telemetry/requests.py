"""The request middleware: an id for every request, and its place in the metrics.

One pure-ASGI middleware does both jobs, so a streamed answer pays for one
``send`` wrapper (a type check and a flag test per write), not two.  Per
HTTP request it

- takes the caller's ``X-Request-Id`` when it looks like an id (a proxy such
  as nginx may set one, so both logs join up), otherwise makes one, binds it
  and the instance id from the path for log lines (:mod:`relay.telemetry.logs`), and
  returns it as the ``X-Request-Id`` response header;
- counts the request by endpoint and status, keeps ``relay_active_streams``,
  and for a streamed answer observes the time to its first bytes and the
  time to its end.

While a request's body is incomplete, each read of it may wait at most
``body_timeout`` seconds (``RELAY_BODY_TIMEOUT``), and the whole body must
keep up an average of ``min_rate`` bytes a second after that grace
(``RELAY_BODY_MIN_RATE``: a body that trickles a byte just inside every pause
would otherwise hold its connection, and an upload its memory, for ever):
past either the read raises ``RequestTimeout`` (408 in the door's dialect,
and the connection closed).
Only the body is timed: once its last part is in, ``receive`` waits for the
caller's disconnect, which a streamed answer does for as long as it runs
(and a ``GET``'s is not timed at all: no route reads one).

Agent websockets get a connection id, and a refused handshake is counted as
a rejection.  The lifespan gets the node id, which every background task of
the node inherits.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay.errors import RequestTimeout
from relay.telemetry import logs
from relay.telemetry.metrics import RelayMetrics

#: The instance a request is about, for its log lines (``/api/instances/events`` follows many: none).
_INSTANCE_PATH = re.compile(r"^/api/(?:chat|instances)/(?!events(?:/|$))([^/]+)")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_EVENT_STREAM = b"text/event-stream"
#: Methods whose body no route reads: no deadline to keep (a body sent anyway is uvicorn's to drop).
_BODILESS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Endpoints polled by load balancers and Prometheus: logged only when they fail.
_QUIET = frozenset({"health", "metrics"})

access_log = logging.getLogger("relay.access")


#: What runs on an agent, by the path's end (per instance and on /v1 alike).
_DOOR_SUFFIXES = (("/models", "models"), ("/chat/completions", "chat"), ("/chat-messages", "chat"),
                  ("/images/generations", "images"), ("/audio/transcriptions", "audio"),
                  ("/audio-to-text", "audio"))
#: The labels of requests that run an operation on an agent (``relay_active_streams``).
OPERATIONS = frozenset({"chat", "images", "audio"})
#: SwiftChat's routes at the root (``doors/swiftchat.py``).
_SWIFTCHAT = {"/api/converse": "chat", "/api/models": "models", "/api/image": "images", "/api/upgrade": "upgrade"}


def endpoint_of(path: str) -> str:
    """A small, fixed set of labels (never the raw path: ids would explode cardinality)."""
    if path.startswith(("/api/chat/", "/v1/")):
        for suffix, label in _DOOR_SUFFIXES:
            if path.endswith(suffix):
                return label
        if path.count("/") == 3 and path.startswith("/api/chat/"):
            return "chat"  # /api/chat/{id}: Second Me's chat URL itself
        return "conversations"  # the Dify API's reads and writes: messages, conversations, parameters
    if path in _SWIFTCHAT:
        return _SWIFTCHAT[path]
    if path == "/api/instances/events":
        return "watch"  # the dashboard's live status streams: long-lived, and not answers
    if path.startswith("/api/instances"):
        return "instances"
    if path.startswith("/api/agent/"):
        return "agent"
    if path in ("/", "/register") or path.startswith(("/i/", "/static/")):
        return "dashboard"
    if path in ("/healthz", "/readyz"):
        return "health"
    if path == "/metrics":
        return "metrics"
    return "other"


def request_id_from(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _VALID_ID.match(candidate):
                return candidate
            break
    return secrets.token_hex(8)


def body_deadline(receive: Receive, timeout: float, min_rate: int = 0) -> Receive:
    """``receive``, each wait for more of the body bounded by ``timeout`` seconds, and the body as a
    whole by ``timeout`` plus one second per ``min_rate`` bytes received (then ``RequestTimeout``).

    A timer costs ~8 us; most bodies are already read when the app asks for
    them (a chat's arrives with its headers).  uvicorn's ``receive`` is its
    request cycle's method, whose ``message_event`` is set when it has the
    next part: then ``receive`` cannot wait, and no timer is started.
    """
    done = False
    ready: asyncio.Event | None = getattr(getattr(receive, "__self__", None), "message_event", None)
    loop = asyncio.get_running_loop()
    started = loop.time()
    received = 0

    async def timed() -> Message:
        nonlocal done, received
        if done:
            return await receive()
        if ready is not None and ready.is_set():
            message = await receive()
        else:
            wait = timeout
            if min_rate:  # what the body's average rate leaves: its grace plus what it earned
                wait = min(wait, started + timeout + received / min_rate - loop.time())
            try:
                if wait <= 0:
                    raise TimeoutError
                async with asyncio.timeout(wait):
                    message = await receive()
            except TimeoutError:
                done = True
                if wait < timeout:
                    raise RequestTimeout(f"the request body arrived slower than {min_rate} bytes a second") from None
                raise RequestTimeout(f"the request body paused for more than {timeout:g} s") from None
        received += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            done = True  # the body is whole (or the caller left): what follows waits for the disconnect
        return message

    return timed


class RequestObserver:
    def __init__(self, app: ASGIApp, *, metrics: RelayMetrics, node_id: str, log_requests: bool = True,
                 body_timeout: float = 0, body_min_rate: int = 0) -> None:
        self.app = app
        self.metrics = metrics
        self.node_id = node_id
        self.log_requests = log_requests
        self.body_timeout = body_timeout
        self.body_min_rate = body_min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        logs.node_id.set(self.node_id)
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = self.metrics
        rid = request_id_from(scope)
        path = scope["path"]
        match = _INSTANCE_PATH.match(path)
        logs.request_id.set(rid)
        logs.instance_id.set(match.group(1) if match else None)
        endpoint = endpoint_of(path)
        started = time.perf_counter()
        status = 500  # if the app raises before answering, the server answers 500
        streaming = awaiting_first = False
        header = (b"x-request-id", rid.encode())
        chat = endpoint in OPERATIONS

        async def observed_send(message: Message) -> None:
            nonlocal status, streaming, awaiting_first
            if awaiting_first and message.get("body"):
                # The hot path passes here once per write: one flag test.
                awaiting_first = False
                metrics.time_to_first_chunk.observe(time.perf_counter() - started)
            elif message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                # Answers' streams only: the dashboard's status streams are not answers.
                streaming = awaiting_first = chat and status == 200 and any(
                    name.lower() == b"content-type" and value.startswith(_EVENT_STREAM) for name, value in headers
                )
                message = {**message, "headers": [*headers, header]}
            await send(message)

        if chat:
            metrics.active_streams.inc()
        if self.body_timeout and scope["method"] not in _BODILESS:
            receive = body_deadline(receive, self.body_timeout, self.body_min_rate)
        try:
            await self.app(scope, receive, observed_send)
        finally:
            if chat:
                metrics.active_streams.dec()
            metrics.requests.labels(endpoint, str(status)).inc()
            elapsed = time.perf_counter() - started
            if streaming:
                metrics.stream_duration.observe(elapsed)
            if self.log_requests and (status >= 400 or endpoint not in _QUIET):
                # The path only: the query string is the caller's, and no body is ever logged.
                access_log.info("%s %s %d %.3fs", scope["method"], path, status, elapsed)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        logs.request_id.set("ws-" + secrets.token_hex(6))
        logs.instance_id.set(None)  # set by the endpoint once the token says which
        deciding = True

        async def observed_send(message: Message) -> None:
            nonlocal deciding
            if deciding:  # only the first message (accept, close or denial) decides
                deciding = False
                if message["type"] == "websocket.http.response.start":
                    self.metrics.rejections.labels(_agent_refusal(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, observed_send)


def _agent_refusal(status: int) -> str:
    return {401: "agent_invalid_token", 403: "agent_forbidden", 429: "agent_rate_limited",
            503: "agent_not_ready"}.get(status, f"agent_refused_{status}")
