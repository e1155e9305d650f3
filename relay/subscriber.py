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
from redis.exceptions import RedisError

log = logging.getLogger("relay.subscriber")

Handler = Callable[[bytes], Awaitable[None] | None]

#: Pause before resubscribing after the connection broke.
RESUBSCRIBE_DELAY = 0.5


class Subscriber:
    def __init__(
        self,
        redis: Redis,
        handlers: dict[str, Handler],
        *,
        on_subscribed: Callable[[bool], Awaitable[None]],
        on_lost: Callable[[], None],
    ):
        self.redis = redis
        self.handlers = {name.encode(): handler for name, handler in handlers.items()}
        self.on_subscribed = on_subscribed  # called with True when it is a resubscription
        self.on_lost = on_lost
        #: Set while subscribed: the composition root waits for it before serving.
        self.listening = asyncio.Event()

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
                        message = await pubsub.get_message(timeout=None)
                        if message is not None:
                            await self.dispatch(message["channel"], message["data"])
            except (RedisError, OSError) as exc:
                self.listening.clear()
                self.on_lost()
                again = True
                log.debug("pub/sub connection lost (%s); resubscribing", exc)
                await anyio.sleep(RESUBSCRIBE_DELAY)

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
