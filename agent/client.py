"""The agent's connection to the relay: handshake, multiplexing, reconnects.

``AgentClient.run()`` connects, says hello, then serves requests until the
connection ends, and starts over with backoff, forever (unless the relay
says retrying is pointless: bad token, incompatible protocol).  Each request
runs in its own task against the backend; a ``cancel`` from the relay cancels
that task, which aborts the upstream HTTP request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

from relay import protocol as p
from relay import redaction

from . import __version__
from .backends import Backend, BackendError
from .backoff import FatalAgentError, backoff_delays, is_retryable

log = logging.getLogger("agent")
# websockets logs handshake headers at DEBUG, our Authorization among them.
redaction.install(("websockets.client",))

#: A connection that stayed up this long resets the backoff.
HEALTHY_AFTER = 10.0


def websocket_url(relay_url: str) -> str:
    base = relay_url.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base[len("https://") :]
    elif base.startswith("http://"):
        base = "ws://" + base[len("http://") :]
    return base + "/api/agent/connect"


@dataclass
class AgentStatus:
    """What the agent is doing, for the status line and `relay-agent status`."""

    connected: bool = False
    relay_url: str = ""
    instance_id: str = ""
    node_id: str = ""
    served: int = 0
    failed: int = 0
    inflight: int = 0
    last_error: str = ""


@dataclass
class _Stream:
    task: asyncio.Task
    window: p.SendWindow
    credit: asyncio.Event = field(default_factory=asyncio.Event)


def _usage_of(chunk: bytes) -> dict[str, Any] | None:
    # Parse only chunks that can carry usage: most are plain deltas.
    if b'"usage"' not in chunk:
        return None
    try:
        usage = orjson.loads(chunk).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


def _error_of(chunk: bytes) -> BackendError | None:
    # Some servers report a mid-stream failure as an event with an "error" key.
    if not chunk.startswith(b'{"error"') and b'"error":' not in chunk[:40]:
        return None
    try:
        obj = orjson.loads(chunk)
    except orjson.JSONDecodeError:
        return None
    err = obj.get("error") if isinstance(obj, dict) else None
    if err is None:
        return None
    message = err.get("message") if isinstance(err, dict) else str(err)
    return BackendError(502, f"model server: {message}", "upstream_error")


class AgentClient:
    def __init__(
        self,
        *,
        relay_url: str,
        token: str,
        backend: Backend,
        models: list[str],
        max_concurrency: int = 8,
        max_backoff: float = 30.0,
        on_status: Callable[[str], None] | None = None,
    ):
        # Several relay URLs may be given (comma-separated): when one fails
        # or asks us to go away, the next attempt uses the next one.
        self.relay_urls = [u.strip() for u in relay_url.split(",") if u.strip()]
        self._url_index = 0
        self.token = token
        self.backend = backend
        self.models = models
        self.max_concurrency = max_concurrency
        self.max_backoff = max_backoff
        self.agent_id = uuid.uuid4().hex  # stable across reconnects of this process
        self.status = AgentStatus(relay_url=self.relay_urls[0])
        self.on_status = on_status or (lambda line: log.info("%s", line))
        self.connected = asyncio.Event()
        self._streams: dict[int, _Stream] = {}
        self._ws: ClientConnection | None = None
        self._send_lock = asyncio.Lock()

    @property
    def relay_url(self) -> str:
        return self.relay_urls[self._url_index]

    @property
    def url(self) -> str:
        return websocket_url(self.relay_url)

    # -- reconnect loop -------------------------------------------------------

    async def run(self) -> None:
        """Serve forever; raises FatalAgentError when retrying cannot help."""
        delays = backoff_delays(cap=self.max_backoff)
        while True:
            started = time.monotonic()
            reason = await self._connect_once()
            if time.monotonic() - started >= HEALTHY_AFTER or reason == "relay going away":
                delays = backoff_delays(cap=self.max_backoff)
            delay = next(delays)
            self.status.last_error = reason
            previous = self.relay_url
            self._url_index = (self._url_index + 1) % len(self.relay_urls)
            self.status.relay_url = self.relay_url
            where = "" if self.relay_url == previous else f" to {self.relay_url}"
            self.on_status(f"disconnected from {previous}: {reason}; reconnecting{where} in {delay:.1f}s")
            await asyncio.sleep(delay)

    async def _connect_once(self) -> str:
        """One connection's life; returns why it ended (retryable reasons only)."""
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            async with connect(
                self.url,
                additional_headers=headers,
                user_agent_header=f"instance-relay-agent/{__version__}",
                compression=None,  # chunks are small and the relay forwards them as-is
                max_size=None,
                ping_interval=None,  # our own heartbeat, in the protocol, covers liveness
                open_timeout=10,
                close_timeout=5,
            ) as ws:
                return await self._serve(ws)
        except InvalidStatus as exc:
            status = exc.response.status_code
            body = exc.response.body.decode(errors="replace") if exc.response.body else ""
            message = _error_message(body) or f"HTTP {status}"
            if not is_retryable(status=status):
                raise FatalAgentError(f"relay refused the agent token ({status}): {message}") from None
            return f"relay answered {status}: {message}"
        except ConnectionClosed as exc:
            return self._closed_reason(exc)
        except InvalidURI as exc:
            raise FatalAgentError(f"bad relay URL {self.relay_url!r}: {exc}") from None
        except (OSError, TimeoutError, asyncio.TimeoutError) as exc:
            return f"cannot reach relay ({type(exc).__name__}: {exc})"
        except p.ProtocolError as exc:
            return f"protocol error: {exc}"
        finally:
            self._abort_all()
            if self.status.connected:
                self.status.connected = False
            self.connected.clear()
            self._ws = None

    def _closed_reason(self, exc: ConnectionClosed) -> str:
        rcvd = exc.rcvd
        code, reason = (rcvd.code, rcvd.reason) if rcvd else (None, "")
        if not is_retryable(close_code=code):
            raise FatalAgentError(f"relay closed the connection ({code}): {reason}") from None
        if code == p.CloseCode.GOING_AWAY:
            return "relay going away"
        return f"connection closed ({code}{': ' + reason if reason else ''})"

    # -- one connection -------------------------------------------------------

    async def _serve(self, ws: ClientConnection) -> str:
        self._ws = ws
        await ws.send(
            p.encode(p.Hello(p.PROTOCOL_VERSION, __version__, self.agent_id, tuple(self.models), self.max_concurrency))
        )
        welcome = p.decode(await asyncio.wait_for(ws.recv(), 10))
        if type(welcome) is not p.Welcome:
            raise p.ProtocolError(f"expected welcome, got {type(welcome).__name__}")
        self.status.connected, self.status.instance_id, self.status.node_id = True, welcome.instance_id, welcome.node_id
        self.connected.set()
        self.on_status(
            f"connected to {self.relay_url} (node {welcome.node_id}) as instance {welcome.instance_id}; "
            f"models {', '.join(self.models)}; chat URL {welcome.chat_url}"
        )
        interval = welcome.heartbeat_interval
        heartbeat = asyncio.create_task(self._heartbeat(ws, interval))
        try:
            return await self._read(ws, interval)
        finally:
            heartbeat.cancel()

    async def _heartbeat(self, ws: ClientConnection, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._send(p.encode(p.Ping(time.time())))

    async def _read(self, ws: ClientConnection, interval: float) -> str:
        # The relay answers every ping, so hearing nothing for three intervals
        # means the path is dead even if TCP has not noticed yet.
        silence = max(3 * interval, 1.0)
        while True:
            try:
                message = await asyncio.wait_for(ws.recv(), silence)
            except (asyncio.TimeoutError, TimeoutError):
                await ws.close(p.CloseCode.HEARTBEAT_TIMEOUT, "relay silent")
                return f"relay silent for {silence:.0f}s"
            event = p.decode(message)
            kind = type(event)
            if kind is p.Credit:
                stream = self._streams.get(event.id)
                if stream is not None:
                    stream.window.grant(event.amount)
                    stream.credit.set()
            elif kind is p.Request:
                self._start(event)
            elif kind is p.Cancel:
                stream = self._streams.pop(event.id, None)
                if stream is not None:
                    stream.task.cancel()
            elif kind is p.Pong or kind is p.Ping:
                pass
            elif kind is p.GoAway:
                return "relay going away"
            else:
                raise p.ProtocolError(f"relay sent unexpected {kind.__name__}")

    # -- requests -------------------------------------------------------------

    def _start(self, request: p.Request) -> None:
        if request.id in self._streams:
            raise p.ProtocolError(f"relay reused stream id {request.id}")
        window = p.SendWindow(request.window)
        task = asyncio.create_task(self._handle(request, window))
        self._streams[request.id] = _Stream(task, window)
        self.status.inflight = len(self._streams)

    async def _handle(self, request: p.Request, window: p.SendWindow) -> None:
        sid = request.id
        try:
            if len(self._streams) > self.max_concurrency:
                raise BackendError(503, "agent at capacity", "agent_at_capacity")
            if request.stream:
                usage = await self._relay_stream(sid, window, request.body, cap=request.window)
                await self._send(p.encode(p.End(sid, usage, None)))
            else:
                body = await self.backend.complete(request.body)
                await self._send_data(sid, window, body)
                await self._send(p.encode(p.End(sid, _usage_of(body), None)))
            self.status.served += 1
        except BackendError as exc:
            self.status.failed += 1
            await self._try_send(p.encode(p.StreamError(sid, exc.status, exc.message, exc.code)))
        except asyncio.CancelledError:
            raise  # cancelled by the relay or by losing the connection: nothing to say
        except Exception as exc:  # a bug or an odd upstream: fail this stream, not the agent
            log.exception("request %s failed", sid)
            self.status.failed += 1
            await self._try_send(p.encode(p.StreamError(sid, 502, f"agent error: {type(exc).__name__}", "agent_error")))
        finally:
            self._streams.pop(sid, None)
            self.status.inflight = len(self._streams)

    async def _relay_stream(self, sid: int, window: p.SendWindow, body: dict[str, Any], *,
                            cap: int) -> dict[str, Any] | None:
        """Read the model's stream and send it on; return the usage if reported.

        Reading and sending are two tasks sharing a buffer.  The reader appends
        every chunk it parses and never waits for the websocket; the writer
        runs whenever the reader waits for the model's socket, and sends all
        that is buffered as one frame.  So a lone chunk leaves at once, and
        chunks that arrive faster than they can be sent are coalesced instead
        of costing a frame (and a relay wake-up) each.  The buffer is capped at
        one window: past that the reader stops reading, and the model's TCP
        connection pushes back.
        """
        pending = bytearray()
        wake, room = asyncio.Event(), asyncio.Event()
        finished = False

        async def writer() -> None:
            while True:
                if not pending:
                    if finished:
                        return
                    await wake.wait()
                    wake.clear()
                    continue
                payload = bytes(pending)
                pending.clear()
                room.set()
                await self._send_data(sid, window, payload)

        send_task = asyncio.create_task(writer())
        usage: dict[str, Any] | None = None
        try:
            async for batch in self.backend.stream(body):
                for chunk in batch:
                    error = _error_of(chunk)
                    if error is not None:
                        # What came before the error still reaches the caller, first.
                        finished = True
                        wake.set()
                        await send_task
                        raise error
                    usage = _usage_of(chunk) or usage
                    pending += b"data: "
                    pending += chunk
                    pending += b"\n\n"
                wake.set()
                while len(pending) >= cap and not send_task.done():
                    room.clear()
                    room_waiter = asyncio.ensure_future(room.wait())
                    await asyncio.wait([send_task, room_waiter], return_when=asyncio.FIRST_COMPLETED)
                    room_waiter.cancel()
                if send_task.done():
                    send_task.result()  # the writer failed (connection lost): stop reading
                    raise ConnectionError("writer stopped")
            finished = True
            wake.set()
            await send_task
        finally:
            if not send_task.done():
                send_task.cancel()
        return usage

    async def _send_data(self, sid: int, window: p.SendWindow, payload: bytes) -> None:
        while not window.can_send:
            stream = self._streams.get(sid)
            if stream is None:
                raise asyncio.CancelledError()
            stream.credit.clear()
            await stream.credit.wait()
        await self._send(p.encode_data(sid, payload))
        window.sent(len(payload))

    async def _send(self, message: str | bytes) -> None:
        ws = self._ws
        if ws is None:
            raise ConnectionError("not connected")
        async with self._send_lock:
            await ws.send(message)

    async def _try_send(self, message: str | bytes) -> None:
        try:
            await self._send(message)
        except (ConnectionClosed, ConnectionError):
            pass

    def _abort_all(self) -> None:
        for stream in self._streams.values():
            stream.task.cancel()
        self._streams.clear()
        self.status.inflight = 0


def _error_message(body: str) -> str:
    try:
        obj = orjson.loads(body)
        return obj["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return body[:200]
