"""The agent's connection to the relay: handshake, multiplexing, reconnects.

``AgentClient.run()`` connects, says hello, then serves requests until the
connection ends, and starts over with backoff, forever (unless the relay
says retrying is pointless: bad token, incompatible protocol).  Each request
runs in its own task against the backend; a ``cancel`` from the relay cancels
that task, which aborts the upstream HTTP request.

A request with an upload (``request.upload``: an audio file) is stored as
its ``upload`` frames arrive, into a buffer that can hold exactly the
declared size and no more; the read loop only stores and counts (it never
waits), and the request's task sends the credit that lets the relay go on.
The operation runs once all of it is there.  Checks that need no audio
(capacity, capability, size, the backend's own) run first, so a request
that cannot succeed fails before its upload is sent, and the relay stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

import wire
from wire import redaction

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
    upgrade: str = ""  # a newer agent version the relay announced


@dataclass
class _Upload:
    """A request's upload as it arrives: the account, the bytes, the credit owed the relay."""

    receiver: wire.UploadReceiver
    data: bytearray = field(default_factory=bytearray)
    owed: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Stream:
    task: asyncio.Task
    window: wire.SendWindow
    credit: asyncio.Event = field(default_factory=asyncio.Event)
    upload: _Upload | None = None


#: The largest upload the agent accepts by default: OpenAI's own limit for audio.
DEFAULT_MAX_UPLOAD = 25 * 1024 * 1024


def _error_of(chunk: bytes) -> BackendError | None:
    # Some servers report a mid-stream failure as an event with an "error" key.
    if not chunk.startswith(b'{"error"') and b'"error":' not in chunk[:40]:
        return None
    message = wire.error_message(chunk)
    return None if message is None else BackendError(502, f"model server: {message}", "upstream_error")


def newer_version(latest: str, mine: str) -> bool:
    """Whether the relay's ``latest`` agent version is newer than ours."""
    return bool(latest) and wire.parse_version(latest) > wire.parse_version(mine)


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
        max_upload: int = DEFAULT_MAX_UPLOAD,
        parameters: dict[str, Any] | None = None,
    ):
        # Several relay URLs may be given (comma-separated): when one fails
        # or asks us to go away, the next attempt uses the next one.
        self.relay_urls = [u.strip() for u in relay_url.split(",") if u.strip()]
        self._url_index = 0
        self.token = token
        self.backend = backend
        self.models = models
        self.max_concurrency = max_concurrency
        #: The largest request upload it holds (a larger one is refused with 413 before it is sent).
        self.max_upload = max_upload
        #: ``hello.parameters``: the conversation API's suggested introduction and variables.
        self.parameters = parameters or {}
        #: Operations this agent can run, declared in its hello (protocol 2).
        self.capabilities = tuple(backend.capabilities)
        self.protocol = wire.PROTOCOL_VERSION  # the version agreed with the relay
        #: The newest version the next hello offers.  A relay older than this
        #: agent reads only that number and refuses one it does not speak
        #: (4001), so after such a refusal the agent offers the one before.
        self._offer = wire.PROTOCOL_VERSION
        self._retry_now = False
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
            if self._retry_now:  # same relay, an older protocol: no backoff, no other URL
                self._retry_now = False
                self.on_status(reason)
                continue
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
            message = wire.error_message(body) or body[:200] or f"HTTP {status}"
            if not is_retryable(status=status):
                raise FatalAgentError(f"relay refused the agent token ({status}): {message}") from None
            return f"relay answered {status}: {message}"
        except ConnectionClosed as exc:
            return self._closed_reason(exc)
        except InvalidURI as exc:
            raise FatalAgentError(f"bad relay URL {self.relay_url!r}: {exc}") from None
        except (OSError, TimeoutError) as exc:
            return f"cannot reach relay ({type(exc).__name__}: {exc})"
        except wire.ProtocolError as exc:
            if exc.close_code == wire.CloseCode.UNSUPPORTED_VERSION:
                raise FatalAgentError(str(exc)) from None
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
        if code == wire.CloseCode.UNSUPPORTED_VERSION and not self.status.connected \
                and self._offer > min(wire.SUPPORTED_VERSIONS):
            self._offer -= 1
            self._retry_now = True
            return f"relay refused protocol {self._offer + 1} ({reason}); offering protocol {self._offer}"
        if not is_retryable(close_code=code):
            raise FatalAgentError(f"relay closed the connection ({code}): {reason}") from None
        if code == wire.CloseCode.POLICY_VIOLATION and not self.status.connected:
            # Before the welcome, 1008 refuses the hello itself (too many models, too long a name):
            # the same hello would be refused again.  Declare fewer models (--model) or ask the operator.
            raise FatalAgentError(f"relay refused this agent's hello ({code}): {reason}") from None
        if code == wire.CloseCode.GOING_AWAY:
            return "relay going away"
        return f"connection closed ({code}{': ' + reason if reason else ''})"

    # -- one connection -------------------------------------------------------

    async def _serve(self, ws: ClientConnection) -> str:
        self._ws = ws
        hello = wire.Hello(
            protocol=self._offer, agent_version=__version__, agent_id=self.agent_id,
            models=tuple(self.models), max_concurrency=self.max_concurrency,
            capabilities=self.capabilities, min_protocol=min(wire.SUPPORTED_VERSIONS),
            image_models=tuple(self.backend.image_models),
            transcribe_models=tuple(getattr(self.backend, "transcribe_models", ())),
            parameters=self.parameters,
        )
        await ws.send(wire.encode(hello))
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancel
        # that lands as the awaited call completes, and the agent would not stop.
        async with asyncio.timeout(10):
            welcome = wire.decode(await ws.recv())
        if type(welcome) is not wire.Welcome:
            raise wire.ProtocolError(f"expected welcome, got {type(welcome).__name__}")
        if welcome.protocol not in wire.SUPPORTED_VERSIONS:
            raise wire.ProtocolError(f"relay chose protocol {welcome.protocol}, which this agent does not speak",
                                     wire.CloseCode.UNSUPPORTED_VERSION)
        self.protocol = welcome.protocol
        self._offer = wire.PROTOCOL_VERSION  # the next connection may reach an upgraded relay
        self.status.connected, self.status.instance_id, self.status.node_id = True, welcome.instance_id, welcome.node_id
        self.connected.set()
        image_models = self.backend.image_models
        images = f"; image models {', '.join(image_models)}" if image_models else ""
        transcribe_models = getattr(self.backend, "transcribe_models", ())
        audio = f"; transcription models {', '.join(transcribe_models)}" if transcribe_models else ""
        self.on_status(
            f"connected to {self.relay_url} (node {welcome.node_id}) as instance {welcome.instance_id}; "
            f"models {', '.join(self.models)}{images}{audio}; chat URL {welcome.chat_url}"
        )
        if newer_version(welcome.latest_agent_version, __version__):
            self.status.upgrade = welcome.latest_agent_version
            self.on_status(f"upgrade available: relay-agent {welcome.latest_agent_version} "
                           f"(this is {__version__}): pip install -U instance-relay")
        interval = welcome.heartbeat_interval
        heartbeat = asyncio.create_task(self._heartbeat(ws, interval))
        try:
            return await self._read(ws, interval)
        finally:
            heartbeat.cancel()

    async def _heartbeat(self, ws: ClientConnection, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._send(wire.encode(wire.Ping(time.time())))

    async def _read(self, ws: ClientConnection, interval: float) -> str:
        # The relay answers every ping, so hearing nothing for three intervals
        # means the path is dead even if TCP has not noticed yet.
        silence = max(3 * interval, 1.0)
        while True:
            try:
                async with asyncio.timeout(silence):
                    message = await ws.recv()
            except TimeoutError:
                await ws.close(wire.CloseCode.HEARTBEAT_TIMEOUT, "relay silent")
                return f"relay silent for {silence:.0f}s"
            match wire.decode(message):
                case wire.Credit(id=sid, amount=amount):
                    stream = self._streams.get(sid)
                    if stream is not None:
                        stream.window.grant(amount)
                        stream.credit.set()
                case wire.Upload(id=sid, payload=payload):
                    self._store_upload(sid, payload)
                case wire.Request() as request:
                    self._start(request)
                case wire.Cancel(id=sid):
                    stream = self._streams.pop(sid, None)
                    if stream is not None:
                        stream.task.cancel()
                case wire.Pong() | wire.Ping():
                    pass
                case wire.GoAway():
                    return "relay going away"
                case other:
                    raise wire.ProtocolError(f"relay sent unexpected {type(other).__name__}")

    # -- requests -------------------------------------------------------------

    def _start(self, request: wire.Request) -> None:
        if request.id in self._streams:
            raise wire.ProtocolError(f"relay reused stream id {request.id}")
        window = wire.SendWindow(request.window)
        # The account exists before the task runs: upload frames may follow at once.
        upload = _Upload(wire.UploadReceiver(request.id, request.upload, request.window)) if request.upload else None
        task = asyncio.create_task(self._handle(request, window))
        self._streams[request.id] = _Stream(task, window, upload=upload)
        self.status.inflight = len(self._streams)

    def _store_upload(self, sid: int, payload: bytes) -> None:
        """One upload frame: counted against the credit granted and the size declared, then stored.

        Never waits: the read loop serves every stream.  A frame for a
        stream this agent no longer has is late (it failed early, or was
        cancelled) and is dropped; one beyond what was granted or declared
        breaks the protocol.
        """
        stream = self._streams.get(sid)
        if stream is None:
            return
        upload = stream.upload
        if upload is None:
            raise wire.ProtocolError(f"relay sent upload for stream {sid}, which declared none")
        upload.owed += upload.receiver.receive(len(payload))
        upload.data += payload
        upload.arrived.set()

    async def _receive_upload(self, sid: int, upload: _Upload) -> bytes:
        """Wait for the whole upload, sending the credit owed as the bytes are stored."""
        while True:
            upload.arrived.clear()  # before looking: a frame stored meanwhile wakes us again
            if upload.owed:
                amount, upload.owed = upload.owed, 0
                await self._send(wire.encode_credit(sid, amount))
            if upload.receiver.complete:
                data = bytes(upload.data)
                upload.data = bytearray()  # held once, not twice, while the backend works
                return data
            await upload.arrived.wait()

    async def _handle(self, request: wire.Request, window: wire.SendWindow) -> None:
        sid = request.id
        try:
            if len(self._streams) > self.max_concurrency:
                raise BackendError(503, "agent at capacity", "agent_at_capacity")
            if request.op not in self.capabilities:
                raise BackendError(501, f"this agent cannot run {request.op!r}", "capability_not_supported")
            if request.op == wire.OP_TRANSCRIBE:
                await self._send_body(sid, window, await self._transcribe(request), request.window)
            elif request.upload:
                raise BackendError(400, f"{request.op!r} takes no upload", "invalid_request")
            elif request.op == wire.OP_IMAGES:
                await self._send_body(sid, window, await self.backend.images(request.body), request.window)
            elif request.stream:
                await self._relay_stream(sid, window, request.body, cap=request.window)
            else:
                await self._send_body(sid, window, await self.backend.complete(request.body), request.window)
            await self._send(wire.encode(wire.End(sid)))
            self.status.served += 1
        except BackendError as exc:
            self.status.failed += 1
            await self._try_send(wire.encode(wire.StreamError(sid, exc.status, exc.message, exc.code)))
        except asyncio.CancelledError:
            raise  # cancelled by the relay or by losing the connection: nothing to say
        except Exception as exc:  # a bug or an odd upstream: fail this stream, not the agent
            log.exception("request %s (relay request %s) failed", sid, request.request_id or "-")
            self.status.failed += 1
            error = wire.StreamError(sid, 502, f"agent error: {type(exc).__name__}", "agent_error")
            await self._try_send(wire.encode(error))
        finally:
            self._streams.pop(sid, None)
            self.status.inflight = len(self._streams)

    async def _transcribe(self, request: wire.Request) -> bytes:
        # Everything that can be refused without the audio is, before it is sent.
        if not request.upload:
            raise BackendError(422, "a transcription needs an audio file", "invalid_request")
        if request.upload > self.max_upload:
            raise BackendError(413, f"the audio file ({request.upload} bytes) is larger than this agent takes "
                                    f"({self.max_upload} bytes)", "upload_too_large")
        self.backend.check_transcribe(request.body)
        stream = self._streams.get(request.id)
        if stream is None or stream.upload is None:
            raise asyncio.CancelledError()  # cancelled before it began
        audio = await self._receive_upload(request.id, stream.upload)
        return await self.backend.transcribe(request.body, audio)

    async def _relay_stream(self, sid: int, window: wire.SendWindow, body: dict[str, Any], *, cap: int) -> None:
        """Read the model's stream and send it on.

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
                # At most one window per frame: a read can bring more than that
                # at once, and the relay holds a stream's frames until sent on.
                payload = bytes(pending[:cap])
                del pending[:cap]
                room.set()
                await self._send_data(sid, window, payload)

        send_task = asyncio.create_task(writer())
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

    async def _send_body(self, sid: int, window: wire.SendWindow, body: bytes, frame_size: int) -> None:
        """A whole JSON body, in frames of at most one window each, each waiting for credit.

        Never as one frame: a frame past the relay's limit (1 MiB by default;
        generated images reach it easily) makes the relay close the whole
        connection, this agent's other streams with it.  The window (256 KiB
        by default) is what the relay holds for a stream at once anyway.
        """
        view = memoryview(body)
        # An empty body still goes as one (empty) frame, as it always did.
        for start in range(0, max(len(body), 1), frame_size):
            await self._send_data(sid, window, bytes(view[start : start + frame_size]))

    async def _send_data(self, sid: int, window: wire.SendWindow, payload: bytes) -> None:
        while not window.can_send:
            stream = self._streams.get(sid)
            if stream is None:
                raise asyncio.CancelledError()
            stream.credit.clear()
            await stream.credit.wait()
        await self._send(wire.encode_data(sid, payload))
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
