"""How the relay connects to Redis: one pool, its timeouts, its connection class.

Short timeouts: a hung Redis must turn into a quick 503, not a hung request.
A blocking pool: a burst (thousands of agents leaving at once) waits its turn
for a connection instead of failing with "Too many connections".

redis-py bounds each write to the socket with ``asyncio.wait_for`` when a
socket timeout is set, which on Python 3.11 runs every send as a task of
its own: in a burst of a thousand chats that was an eighth of the relay's
CPU (``python -m bench --phases profile``).  :class:`TimedSends` keeps
the same bound with ``asyncio.timeout``, one timer and no task.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import TimeoutError as RedisTimeout

from .settings import RelaySettings


class TimedSends(AbstractConnection):
    """Sends bounded by ``asyncio.timeout`` rather than ``asyncio.wait_for`` (mixed into TCP and unix connections)."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        timeout = self.socket_timeout
        if not timeout:
            await super().send_packed_command(command, check_health)
            return
        # redis-py takes an unset socket timeout to mean "write directly";
        # the deadline around the call bounds the write, and the health check
        # that may precede it, just as its own wait_for did.  A connection is
        # used by one task at a time, so nothing reads the unset value meanwhile.
        self.socket_timeout = None
        try:
            async with asyncio.timeout(timeout):
                await super().send_packed_command(command, check_health)
        except TimeoutError:
            raise RedisTimeout("Timeout writing to socket") from None
        finally:
            self.socket_timeout = timeout


def timed(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """``connection_class`` (TCP or unix socket, as the URL said) with :class:`TimedSends`."""
    return type(f"Timed{connection_class.__name__}", (TimedSends, connection_class), {})


def connect(url: str, settings: RelaySettings) -> Redis:
    """The relay's client for ``url``: a blocking pool of timed connections, opened lazily (so the
    composition root can still wrap their class: ``RelayMetrics.count_round_trips``)."""
    pool = BlockingConnectionPool.from_url(
        url, max_connections=settings.redis_max_connections, timeout=settings.redis_timeout,
        socket_timeout=settings.redis_timeout, socket_connect_timeout=min(2.0, settings.redis_timeout),
        health_check_interval=10,
    )
    pool.connection_class = timed(pool.connection_class)
    return Redis(connection_pool=pool)
