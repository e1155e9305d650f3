"""This node's pub/sub subscription: registry events and its own inbox.

One connection follows two kinds of channel: ``ir:events`` (what every node
must hear: an instance deleted, an agent token rotated) and this node's
inbox (cross-node stream frames).  Each message goes to the handler of its
channel; a handler that fails is logged, and the message dropped, so one
bad message can never end the subscription (or the tasks that run beside
it).  When Redis goes away the subscription is rebuilt, forever, and the
parts that depend on it are told (``on_lost``, ``on_subscribed``).

On a Redis Cluster each channel is a shard channel, followed on a connection
of its own to the master owning its slot (SSUBSCRIBE must be sent there), so
a node's traffic loads one shard, not the whole cluster.  That connection
breaks when the master dies, and Redis unsubscribes it when the slot moves
to another shard: either way the subscription is rebuilt on the slot map as
it is now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import PubSub
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from relay.store.cluster import as_redis_errors

log = logging.getLogger("relay.subscriber")

Handler = Callable[[bytes], Awaitable[None] | None]

#: Pause before resubscribing after the connection broke.
RESUBSCRIBE_DELAY = 0.5
#: The PING payload that tells our probe's answer from anything else.
PROBE = b"relay-subscription-probe"


class ChannelMoved(RedisConnectionError):
    """Redis ended a shard channel's subscription: its slot moved to another master."""


#: Which channels a subscription event is about.
Channels = frozenset[str]


class Subscriber:
    def __init__(
        self,
        redis: Redis,
        handlers: dict[str, Handler],
        *,
        on_subscribed: Callable[[Channels, bool], Awaitable[None]],
        on_lost: Callable[[Channels], None],
        probe_after: float = 5.0,
        probe_timeout: float = 5.0,
    ):
        self.redis = redis
        self.handlers = {name.encode(): handler for name, handler in handlers.items()}
        # Called with the channels concerned, and True when it is a resubscription.
        self.on_subscribed = on_subscribed
        self.on_lost = on_lost
        #: Set while every channel is subscribed: the composition root waits for it before serving.
        self.listening = asyncio.Event()
        self._down: set[Channels] = set()
        # A subscription only reads, so a connection that went silent (the
        # master's host gone without a reset, a frozen server after a Sentinel
        # failover) would never fail on its own: after ``probe_after`` seconds
        # without a message it is asked for a PING, and must answer within
        # ``probe_timeout``, or it is rebuilt (on the new master, if any).
        self.probe_after = probe_after
        self.probe_timeout = probe_timeout

    async def run(self) -> None:
        """Follow the channels forever, resubscribing after Redis comes back.

        One connection for all of them on one server.  On a cluster each
        channel has its own, on its own shard, and is rebuilt on its own: a
        failover of the shard carrying registry events does not touch this
        node's inbox, nor the streams riding it.
        """
        names = [channel.decode() for channel in self.handlers]
        groups = [frozenset(names)] if not isinstance(self.redis, RedisCluster) else [frozenset([n]) for n in names]
        self._down = set(groups)
        async with anyio.create_task_group() as tg:
            for group in groups:
                tg.start_soon(self._keep, group)

    async def _keep(self, channels: Channels) -> None:
        """Keep ``channels`` subscribed, forever."""
        again = False
        while True:
            try:
                async with contextlib.AsyncExitStack() as stack:
                    pubsub = await self._subscribe(stack, channels, again)
                    self._down.discard(channels)
                    if not self._down:
                        self.listening.set()
                    await self.on_subscribed(channels, again)
                    await self._follow(pubsub)
            except (RedisError, OSError) as exc:
                self._down.add(channels)
                self.listening.clear()
                self.on_lost(channels)
                again = True
                log.debug("pub/sub connection for %s lost (%s); resubscribing", ", ".join(sorted(channels)), exc)
                if not isinstance(exc, ChannelMoved):
                    await anyio.sleep(RESUBSCRIBE_DELAY)  # a moved channel's new owner is up: no pause

    async def _subscribe(self, stack: contextlib.AsyncExitStack, channels: Channels, again: bool) -> PubSub:
        """A connection subscribed to ``channels``: to the server, or to the master owning the
        one shard channel on a cluster."""
        if not isinstance(self.redis, RedisCluster):
            pubsub = await stack.enter_async_context(self.redis.pubsub())
            await pubsub.subscribe(*channels)
            return pubsub
        (channel,) = channels
        cluster = self.redis
        with as_redis_errors():  # no node answering, a slot not covered: a connection error
            if again or not cluster.nodes_manager.slots_cache:
                await cluster.nodes_manager.initialize()  # the slot map as it is now (a failover, a migration)
            node = cluster.get_node_from_key(channel)
        shard = await stack.enter_async_context(_node_client(cluster, node.host, node.port))
        pubsub = await stack.enter_async_context(shard.pubsub())
        await pubsub.ssubscribe(channel)
        return pubsub

    async def _follow(self, pubsub: PubSub) -> None:
        """Dispatch one connection's messages, probing it when silent, until it breaks."""
        while True:
            message = await pubsub.get_message(timeout=self.probe_after)
            if message is None:
                await self._probe(pubsub)
            else:
                await self._take(message)

    async def _take(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind in ("message", "smessage"):
            await self.dispatch(message["channel"], message["data"])
        elif kind in ("unsubscribe", "sunsubscribe"):
            # Never asked for: Redis dropped the subscription (its slot moved to another shard).
            raise ChannelMoved(f"Redis ended the subscription to {message['channel']!r}")

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
                await self._take(message)
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


def _node_client(cluster: RedisCluster, host: str, port: int) -> Redis:
    """A plain client for one node of ``cluster``, with the cluster's credentials, TLS and timeouts."""
    given = cluster.nodes_manager.connection_kwargs
    wanted = {name: value for name, value in given.items()
              if name in ("username", "password", "socket_timeout", "socket_connect_timeout", "socket_keepalive",
                          "credential_provider", "client_name") or name.startswith("ssl_")}
    if issubclass(given.get("connection_class", Connection), SSLConnection):
        wanted["ssl"] = True
    # No retries: redis-py would reconnect a broken subscription and subscribe again
    # by itself, and the messages lost meanwhile would go unnoticed (``on_lost``).
    return Redis(host=host, port=port, retry=Retry(NoBackoff(), 0), **wanted)
