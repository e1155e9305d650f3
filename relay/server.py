"""uvicorn, configured for the relay, with a graceful drain on SIGTERM.

uvicorn's own shutdown closes websockets at once, which would cut every
stream served by this node's agents.  ``RelayServer`` first stops accepting
connections and new chat requests, lets in-flight streams finish for up to
``drain_timeout`` seconds, then tells its agents to reconnect elsewhere
(``goaway`` + close 1001), and only then lets uvicorn finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import uvicorn

from .settings import RelaySettings

log = logging.getLogger("relay.server")


def uvicorn_config(app: Any, settings: RelaySettings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # uvicorn's loggers never below INFO: at DEBUG, websockets logs every frame of every agent
        # (two lines per ping and pong), a cost an agent's frame rate would set.  The relay's own
        # DEBUG lines are unaffected.
        log_level=max(logging.INFO, uvicorn.config.LOG_LEVELS.get(settings.log_level.lower(), logging.INFO)),
        access_log=False,  # one line per chunk-stream is noise; errors are logged by the app
        log_config=None,  # uvicorn's lines go through our root handler (relay.logs), same format
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=None,  # agents heartbeat inside the protocol
        timeout_graceful_shutdown=5,
        lifespan="on",
    )


class RelayServer(uvicorn.Server):
    """uvicorn, draining the node before it closes connections."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.relay_app = app

    def active_streams(self) -> int:
        state = self.relay_app.state
        return int(state.sessions.inflight() + len(state.bus.ingress))

    async def shutdown(self, sockets: Any = None) -> None:
        state = self.relay_app.state
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
