"""This node's pub/sub subscription: registry events and its own inbox.

One connection follows two kinds of channel: ``ir:events`` (what every node
must hear: an instance deleted, an agent token rotated) and this node's
inbox (cross-node stream frames).  Each message goes to the handler of its
channel; a handler that fails is logged, and the message dropped, so one
bad message can never end the subscription (or the tasks that run beside
it).  When Redis goes away the subscription is rebuilt, forever, and the
parts that depend on it are told (``on_lost``, ``on_subscribed``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import anyio
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

log = logging.getLogger("relay.subscriber")

Handler = Callable[[bytes], Awaitable[None] | None]

#: Pause before resubscribing after the connection broke.
RESUBSCRIBE_DELAY = 0.5
#: The PING payload that tells our probe's answer from anything else.
PROBE = b"relay-subscription-probe"


class Subscriber:
    def __init__(
        self,
        redis: Redis,
        handlers: dict[str, Handler],
        *,
        on_subscribed: Callable[[bool], Awaitable[None]],
        on_lost: Callable[[], None],
        probe_after: float = 5.0,
        probe_timeout: float = 5.0,
    ):
        self.redis = redis
        self.handlers = {name.encode(): handler for name, handler in handlers.items()}
        self.on_subscribed = on_subscribed  # called with True when it is a resubscription
        self.on_lost = on_lost
        #: Set while subscribed: the composition root waits for it before serving.
        self.listening = asyncio.Event()
        # A subscription only reads, so a connection that went silent (the
        # master's host gone without a reset, a frozen server after a Sentinel
        # failover) would never fail on its own: after ``probe_after`` seconds
        # without a message it is asked for a PING, and must answer within
        # ``probe_timeout``, or it is rebuilt (on the new master, if any).
        self.probe_after = probe_after
        self.probe_timeout = probe_timeout

    async def run(self) -> None:
        """Follow the channels forever, resubscribing after Redis comes back."""
        again = False
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(*self.handlers)
                    self.listening.set()
                    await self.on_subscribed(again)
                    while True:
                        message = await pubsub.get_message(timeout=self.probe_after)
                        if message is None:
                            await self._probe(pubsub)
                        elif message["type"] != "pong":
                            await self.dispatch(message["channel"], message["data"])
            except (RedisError, OSError) as exc:
                self.listening.clear()
                self.on_lost()
                again = True
                log.debug("pub/sub connection lost (%s); resubscribing", exc)
                await anyio.sleep(RESUBSCRIBE_DELAY)

    async def _probe(self, pubsub: PubSub) -> None:
        """PING the subscription; messages that arrive meanwhile are handled; RedisTimeout if no answer."""
        await pubsub.ping(PROBE)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.probe_timeout
        while (remaining := deadline - loop.time()) > 0:
            message = await pubsub.get_message(timeout=remaining)
            if message is None:
                continue
            if message["type"] == "pong":
                if message["data"] == PROBE:
                    return
            else:
                await self.dispatch(message["channel"], message["data"])
        raise RedisTimeout(f"the subscription did not answer a PING within {self.probe_timeout:g} s")

    async def dispatch(self, channel: bytes, data: bytes) -> None:
        handler = self.handlers.get(channel)
        if handler is None:
            return
        try:
            result = handler(data)
            if result is not None:
                await result
        except Exception:
            log.exception("dropping a message on %s that its handler could not take", channel.decode(errors="replace"))
