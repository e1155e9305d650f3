"""Overload: a node past what it can carry refuses new work, so the work it holds goes on.

A node's limit is its event loop: every chunk of every stream, every Redis
reply and every new request is a callback on it.  Past what the cores can run,
callbacks wait in line, and everything slows down together; the node's own
Redis sends (bounded by ``RELAY_REDIS_TIMEOUT``) and the caller's patience
are what gives first.  Streams already running must slow down rather than be
cut (``crossnode`` lets their frames wait on the stream's own idle limit), so
what has to give is new work: :meth:`LoadMonitor.check` refuses a new
request with ``503 node_overloaded`` and ``Retry-After`` before any Redis
work is done for it, when

* the event loop's lag (how late a periodic timer fires, smoothed; or how
  late the next one already is, for a loop blocked right now) is past
  ``RELAY_SHED_LAG`` seconds, or
* the streams this node already answers or serves are ``RELAY_MAX_INFLIGHT``
  or more.

The node an agent is connected to applies the same check to requests other
nodes route to it (``crossnode``): they are new work there too, and its
refusal reaches the caller as the 503 of the caller's node.

A refusal costs a few microseconds and no Redis round trip, so a flood of new
requests cannot itself push the loop further behind.  Either limit at 0 is
off.  ``relay_shed_requests_total{reason}`` counts refusals,
``relay_event_loop_lag_seconds`` shows the lag.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from relay.errors import ServiceNotReady

log = logging.getLogger("relay.overload")

#: Seconds between the lag probe's ticks: the finest lag it can see, and its own cost (~20 wake-ups/s).
TICK = 0.05
#: Weight of the newest tick in the smoothed lag: ~5 ticks (a quarter second) to follow a change.
SMOOTHING = 0.2
#: Seconds between two WARNING lines about shedding (one per episode, not one per request).
LOG_EVERY = 10.0


class NodeOverloaded(ServiceNotReady):
    """This node is past what it can carry: retry shortly (here, or on another node)."""

    code = "node_overloaded"


class LoadMonitor:
    """The node's event-loop lag and in-flight count, and the admission check on them."""

    def __init__(self, *, shed_lag: float, max_inflight: int, inflight: Callable[[], int],
                 retry_after: int = 1, on_shed: Callable[[str], None] | None = None):
        self.shed_lag = shed_lag
        self.max_inflight = max_inflight
        self.inflight = inflight
        self.retry_after = str(max(1, retry_after))
        #: Called with the reason ("lag" or "inflight") each time a request is refused (a metric).
        self.on_shed = on_shed
        #: Smoothed lateness of the probe's timer, seconds.
        self.lag = 0.0
        #: Loop time the probe's next tick is due at (None while not running).
        self._due: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._logged_at = -LOG_EVERY
        self._shed_since_log = 0

    async def run(self) -> None:
        """Measure the loop's lag until cancelled (one of the node's background tasks)."""
        loop = self._loop = asyncio.get_running_loop()
        try:
            while True:
                self._due = loop.time() + TICK
                await asyncio.sleep(TICK)
                late = max(0.0, loop.time() - self._due)
                self.lag += SMOOTHING * (late - self.lag)
        finally:
            self._due = None

    def current_lag(self) -> float:
        """The smoothed lag, or how late the probe's pending tick already is, whichever is larger.

        The second one sees a loop that is stuck right now (a burst of work
        still being run) before the probe's late tick gets to count it.
        """
        due, loop = self._due, self._loop
        if due is None or loop is None:
            return self.lag
        return max(self.lag, loop.time() - due)

    def check(self) -> None:
        """Refuse a new request (:class:`NodeOverloaded`) when the node is past a limit; else nothing."""
        if self.shed_lag > 0:
            lag = self.current_lag()
            if lag > self.shed_lag:
                self._refuse("lag", f"event loop {lag * 1000:.0f} ms behind (limit {self.shed_lag * 1000:.0f} ms)")
        if self.max_inflight > 0:
            held = self.inflight()
            if held >= self.max_inflight:
                self._refuse("inflight", f"{held} streams in flight (limit {self.max_inflight})")

    def _refuse(self, reason: str, detail: str) -> None:
        self._shed_since_log += 1
        if self.on_shed is not None:
            self.on_shed(reason)
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY:
            log.warning("node overloaded, refusing new requests (503 node_overloaded): %s; %d refused since "
                        "the last such line", detail, self._shed_since_log)
            self._logged_at = now
            self._shed_since_log = 0
        raise NodeOverloaded("this relay node is overloaded; retry shortly",
                             headers={"Retry-After": self.retry_after})
