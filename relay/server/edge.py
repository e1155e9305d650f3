"""uvicorn, configured for the relay, with a graceful drain on SIGTERM.

uvicorn's own shutdown closes websockets at once, which would cut every
stream served by this node's agents.  ``RelayServer`` first stops accepting
connections and new chat requests, lets in-flight streams finish for up to
``drain_timeout`` seconds, then tells its agents to reconnect elsewhere
(``goaway`` + close 1001), and only then lets uvicorn finish.

The node listens directly (no proxy in front can be assumed), so the HTTP
edge is bounded here, in uvicorn's httptools protocol (``EdgeProtocol``):
the request's header block (``RELAY_MAX_HEADER_BYTES``: 431, closed) and
the time to send it (``RELAY_HEADER_TIMEOUT``: 408, closed).  The body's
pauses are bounded one level up, in ``telemetry/requests.py`` (``RELAY_BODY_TIMEOUT``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from relay.errors import HeadersTooLarge, RelayError, RequestTimeout
from relay.services import Services
from relay.settings import RelaySettings

log = logging.getLogger("relay.server")


class _HeadTooLarge(Exception):
    """Raised in a parser callback: stops httptools where it is."""


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the request's header block bounded in bytes and in time.

    Bytes: what is fed to the parser while a header block is open (from the
    end of the previous request, or the connection's start, to the end of
    the headers) is counted, so an unfinished block is cut off within one
    read (asyncio reads at most 256 KiB) of ``max_header_bytes``; a block
    that completes is measured exactly (URL, names, values) whenever the
    count cannot rule it out.  Past it: 431 and the connection closed, before
    any request reaches the app (httptools itself keeps a header's pieces
    until it ends, which was 128 MiB for one 128 MiB header).

    Time: a connection gets ``header_timeout`` seconds for its first request's
    header block, and a later request as many from its first byte (uvicorn's
    keep-alive timer is cancelled by any byte, so a request begun and never
    finished held its connection for ever).  Past it: 408 and closed; a new
    connection that sent nothing is closed without a word.  The timer is only
    started for a block still unfinished when a read has been parsed: a
    request that arrives whole costs none.  A body nobody reads (the app
    answered without it) keeps uvicorn's keep-alive timer: another byte of it
    no longer cancels it for good.

    The websocket upgrade (agents) and pipelining work as in uvicorn: both
    limits end with the header block, before the upgrade or the queue.
    ``max_header_bytes`` or ``header_timeout`` 0: that limit is off.

    A refusal is written, the sending side shut, and what the client still
    sends is read and dropped for up to ``LINGER`` seconds before the close:
    closing with its bytes unread would reset the connection, and a client
    still sending its headers would lose the answer to the reset.
    """

    max_header_bytes = 64 * 1024
    header_timeout = 10.0
    #: Seconds a refused connection's remaining bytes are read and dropped before it is closed.
    LINGER = 2.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_open = True  # no request begun, or the previous one complete: a header block may come
        self._head_bytes = 0  # bytes read since the block opened (from the start of the read it opened in)
        self._head_slack = 0  # the read the previous request ended in: its rest may be this block's start
        self._read = 0
        self._head_begun = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._lingering = False
        #: When an idle connection closes if it stays idle: fixed once for a body the app answered
        #: without reading, so that trickling the rest of it cannot keep re-arming uvicorn's timer.
        self._idle_deadline: float | None = None
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # refused: dropped unread until the close
        self._unset_keepalive_if_required()
        self._read = len(data)
        if self._head_open and (self._head_begun or data.strip(b"\r\n")):
            # (Empty lines before a request are ignored, RFC 9112 2.2: they begin no block.)
            self._head_bytes += self._read
            self._head_begun = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._refuse(HeadersTooLarge(f"the request's header block exceeds {self.max_header_bytes} bytes"))
                return
            self._bad_request()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._head_open and self._head_begun:
            if self.max_header_bytes and self._head_bytes > self.max_header_bytes:
                self._refuse(HeadersTooLarge(f"the request's header block exceeds {self.max_header_bytes} bytes"))
            elif self._head_timer is None:
                self._arm_head_timer()  # a block begun and not finished: from now, header_timeout to end it
        elif (self.cycle is None or self.cycle.response_complete) and self.timeout_keep_alive_task is None \
                and not self.pipeline:
            # Nothing being answered and no request begun (the rest of a body the app
            # answered without, or empty lines): the connection is idle, and this byte
            # cancelled uvicorn's keep-alive timer.  It runs again, to a deadline fixed
            # by the first such byte.
            now = self.loop.time()
            if self._idle_deadline is None:
                self._idle_deadline = now + self.timeout_keep_alive
            self.timeout_keep_alive_task = self.loop.call_later(max(0.0, self._idle_deadline - now),
                                                                self.timeout_keep_alive_handler)

    def _bad_request(self) -> None:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self._cancel_head_timer()
        self.send_400_response(msg)

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._cancel_head_timer()
        self._head_open = self._head_begun = False
        if self.max_header_bytes and self._head_bytes + self._head_slack > self.max_header_bytes:
            # The reads could hold more than the block: measure the block itself.
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > self.max_header_bytes:
                raise _HeadTooLarge
        super().on_headers_complete()

    def on_message_begin(self) -> None:
        self._head_begun = True
        self._idle_deadline = None  # a request: the connection is no longer idle
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self._head_open, self._head_bytes, self._head_slack = True, 0, self._read
        super().on_message_complete()

    def _arm_head_timer(self) -> None:
        if self.header_timeout:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if not self._head_begun:
            self.transport.close()  # a connection that never said anything: nothing to answer
            return
        if self.flow.read_paused and not self._lingering:
            # uvicorn stopped reading (requests queued before this one are being answered): the
            # client cannot finish the block meanwhile.  Its time starts again once it can.
            self._arm_head_timer()
            return
        self._refuse(RequestTimeout(f"the request's headers did not arrive within {self.header_timeout:g} s"))

    def _refuse(self, error: RelayError) -> None:
        """Answer ``error`` and close, or, while an earlier request is still answered, close after it."""
        self._cancel_head_timer()
        self._head_open = False  # nothing more is counted or timed on this connection
        log.info("%s %s: %s", error.status, error.code, error.message)
        if self.cycle is not None and not self.cycle.response_complete:
            # Pipelined behind a response in progress: that one ends, then the close.  What the
            # client sends meanwhile is dropped unread (uvicorn resumes reading whenever the app
            # waits for its disconnect, so pausing alone would let the refused block grow).
            self.cycle.keep_alive = False
            self._lingering = True
            self.flow.pause_reading()
            return
        body = orjson.dumps(error.body())
        content = [STATUS_LINE[error.status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend([b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
                        b"\r\nconnection: close\r\n\r\n", body])
        self.transport.write(b"".join(content))
        self._lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._head_timer = self.loop.call_later(self.LINGER, self.transport.close)


#: Agent messages a connection may have waiting to be handled (see ``uvicorn_config``).
WS_MAX_QUEUE = 4


def edge_protocol(settings: RelaySettings) -> type[EdgeProtocol]:
    """``EdgeProtocol`` with this node's limits (uvicorn builds one per connection from the class)."""
    return type("EdgeProtocol", (EdgeProtocol,), {"max_header_bytes": settings.max_header_bytes,
                                                  "header_timeout": settings.header_timeout})


def uvicorn_config(app: Any, settings: RelaySettings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=edge_protocol(settings),  # httptools, bounded (h11 would need the same bounds of its own)
        host=settings.host,
        port=settings.port,
        # uvicorn's loggers never below INFO: at DEBUG, websockets logs every frame of every agent
        # (two lines per ping and pong), a cost an agent's frame rate would set.  The relay's own
        # DEBUG lines are unaffected.
        log_level=max(logging.INFO, uvicorn.config.LOG_LEVELS.get(settings.log_level.lower(), logging.INFO)),
        access_log=False,  # one line per chunk-stream is noise; errors are logged by the app
        log_config=None,  # uvicorn's lines go through our root handler (relay.telemetry.logs), same format
        ws_max_size=settings.max_frame_bytes,
        # Messages read off an agent's socket but not yet handled (uvicorn's default is 32): what
        # one agent can make the node hold before its first frame is even judged is this many
        # frames of max_frame_bytes; past it the socket is simply not read (TCP pushes back).
        ws_max_queue=WS_MAX_QUEUE,
        ws_ping_interval=None,  # agents heartbeat inside the protocol
        timeout_graceful_shutdown=5,
        lifespan="on",
    )


class RelayServer(uvicorn.Server):
    """uvicorn, draining the node before it closes connections."""

    def __init__(self, config: uvicorn.Config, services: Services) -> None:
        super().__init__(config)
        self.services = services

    def active_streams(self) -> int:
        return self.services.bus.streams_held()

    async def shutdown(self, sockets: Any = None) -> None:
        state = self.services
        for server in self.servers:
            server.close()  # stop accepting connections
        state.node.draining = True  # new chats get 503 + Retry-After; /readyz turns 503
        state.watch.close()  # browsers' live status streams end; EventSource reconnects elsewhere
        deadline = time.monotonic() + state.settings.drain_timeout
        active = self.active_streams()
        if active:
            log.info("draining: waiting up to %gs for %d streams", state.settings.drain_timeout, active)
        while self.active_streams() and time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)
        left = self.active_streams()
        if left:
            log.warning("drain timeout: cutting %d streams still running", left)
        # While the websockets are still open (uvicorn closes them next): agents
        # reconnect elsewhere at once.  The lifespan's exit does the rest.
        await state.gateway.send_all_away()
        await super().shutdown(sockets)
