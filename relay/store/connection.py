"""How the relay connects to Redis: one pool, its timeouts, its connection class.

Three kinds of URL:

* ``redis://`` / ``rediss://`` / ``unix://`` — one server, as redis-py reads them;
* ``redis+cluster://[user:password@]host:port[,host:port...]`` (or
  ``rediss+cluster://`` for TLS) — a Redis Cluster (7.0 or newer), found from
  any of the nodes named; redis-py's cluster client follows slots as they
  move and masters as they fail over.  Every key of an instance shares one
  hash tag (``keys.py``), so every script runs on one shard; node-to-node
  traffic uses shard channels (``publisher``, ``serving/subscriber.py``);
* ``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]`` (or
  ``rediss+sentinel://`` for TLS to the master) — the master Redis Sentinel
  names ``service``.  Every connection asks the sentinels where the master is
  when it connects, so after a failover the relay finds the new master by
  itself: requests fail with 503 while no master is known, then work again.
  The URL's password is the master's; ``?sentinel_password=`` is the
  sentinels' own, when they have one.

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
import re
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from relay.settings import RelaySettings
from relay.store.cluster import RelayCluster


class TimedSends(AbstractConnection):
    """Sends bounded by ``asyncio.timeout`` rather than ``asyncio.wait_for`` (mixed into TCP and unix connections)."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        timeout = self.socket_timeout
        if not timeout:
            await super().send_packed_command(command, check_health)
            return
        # redis-py takes an unset socket timeout to mean "write directly";
        # the deadline around the call bounds the write, as its own wait_for
        # did, and also what may precede it inside the call (a health-check
        # PING, a reconnect after a retry's disconnect): one timeout for all.
        # A connection is used by one task at a time, so nothing reads the
        # unset value meanwhile.
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


SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The Sentinel pool that waits for a free connection when full, as the relay's pool does for one server."""


class BadRedisURL(ValueError):
    """A ``--redis-url`` the relay cannot use; its message says what is wrong."""


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    ssl: bool = False

    @classmethod
    def parse(cls, url: str) -> SentinelURL:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in SENTINEL_SCHEMES:
            raise BadRedisURL(f"not a Sentinel URL (scheme {parts.scheme!r}, expected redis+sentinel://)")
        sentinels = _host_ports(parts.netloc.rpartition("@")[2], "redis+sentinel://s1:26379,s2:26379/mymaster")
        path = [p for p in parts.path.split("/") if p]
        if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise BadRedisURL("Sentinel URL: the path must name the master, e.g. redis+sentinel://s1:26379/mymaster "
                             "(optionally /mymaster/DB)")
        query = urllib.parse.parse_qs(parts.query)
        return cls(sentinels, urllib.parse.unquote(path[0]), int(path[1]) if len(path) == 2 else 0,
                   *_credentials(parts), query.get("sentinel_password", [None])[0], parts.scheme == "rediss+sentinel")


def _credentials(parts: urllib.parse.SplitResult) -> tuple[str | None, str | None]:
    """A URL's user name and password, percent-decoded (None when absent)."""
    unquote = urllib.parse.unquote
    return (unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password is not None else None)


def _host_ports(where: str, example: str) -> list[tuple[str, int]]:
    out = []
    for item in where.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise BadRedisURL(f"{item!r} is not host:port (e.g. {example})")
        out.append((host.strip("[]"), int(port)))
    return out


@dataclass(frozen=True)
class ClusterURL:
    """A parsed ``redis+cluster://`` URL."""

    nodes: list[tuple[str, int]]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: bool = False

    @classmethod
    def parse(cls, url: str) -> ClusterURL:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in CLUSTER_SCHEMES:
            raise BadRedisURL(f"not a cluster URL (scheme {parts.scheme!r}, expected redis+cluster://)")
        nodes = _host_ports(parts.netloc.rpartition("@")[2], "redis+cluster://r1:6379,r2:6379")
        if parts.path.strip("/"):
            raise BadRedisURL("cluster URL: a Redis Cluster has one database, so no /DB path "
                              "(e.g. redis+cluster://r1:6379,r2:6379)")
        return cls(nodes, *_credentials(parts),
                   parts.scheme == "rediss+cluster")


def is_cluster(client: Redis | RedisCluster) -> bool:
    return isinstance(client, RedisCluster)


def publisher(client: Redis) -> Callable[[str, bytes], Any]:
    """How to publish on ``client``: shard channels (SPUBLISH) on a cluster, where a plain
    PUBLISH would be copied to every node of it; PUBLISH on one server (the embedded
    Redis is 6.2, older than shard channels)."""
    return client.spublish if is_cluster(client) else client.publish


def hash_tag(key: str) -> str:
    """What decides ``key``'s cluster slot: the text between its first ``{`` and the next ``}``
    when not empty (Redis Cluster's hash tag), else the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


async def run_scripts(client: Redis, script: Any, calls: Sequence[tuple[list[str], list[Any]]]) -> None:
    """Run ``script`` once per ``(keys, args)`` in ``calls``, in one go: one pipeline on one
    server; on a cluster (whose pipelines take no scripts) concurrent calls, each on
    its keys' shard."""
    if not calls:
        return
    if is_cluster(client):
        await asyncio.gather(*(script(keys=k, args=a) for k, a in calls))
        return
    async with client.pipeline(transaction=False) as pipe:
        for k, a in calls:
            await script(keys=k, args=a, client=pipe)
        await pipe.execute()


Wrapper = Callable[[type[AbstractConnection]], type[AbstractConnection]]


def wrap_connections(client: Redis | RedisCluster, wrap: Wrapper) -> None:
    """Make ``client``'s connections of class ``wrap(its class)`` (before any is open: they are lazy)."""
    if isinstance(client, RedisCluster):
        manager = client.nodes_manager
        manager.connection_kwargs["connection_class"] = wrap(
            manager.connection_kwargs.get("connection_class", Connection))
        for node in (*manager.startup_nodes.values(), *manager.nodes_cache.values()):
            node.connection_class = wrap(node.connection_class)  # type: ignore[assignment]
        return
    pool = client.connection_pool
    pool.connection_class = wrap(pool.connection_class)


def connect(url: str, settings: RelaySettings, *, patience: float | None = None) -> Redis:
    """The relay's client for ``url``: a pool of timed connections, opened lazily (so the
    composition root can still wrap their class: ``RelayMetrics.count_round_trips``).

    ``patience``: how long a command (and the wait for a free connection) may take,
    instead of ``RELAY_REDIS_TIMEOUT``.  The frames of streams in flight go through such
    a client (``crossnode``): a node whose event loop runs seconds behind must slow
    them down, not cut them.  Connecting stays bounded by the short timeout, so a Redis
    that is really down (refused, reset) still fails them at once.
    """
    wait = patience or settings.redis_timeout
    timeouts = {"socket_timeout": wait,
                "socket_connect_timeout": min(2.0, settings.redis_timeout)}
    scheme = url.split("://", 1)[0]
    if scheme in CLUSTER_SCHEMES:
        found = ClusterURL.parse(url)
        cluster = RelayCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in found.nodes], username=found.username,
            password=found.password, ssl=found.ssl, max_connections=settings.redis_max_connections,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=10, socket_timeout=wait,
            socket_connect_timeout=timeouts["socket_connect_timeout"])
        cluster.split_keys_wait = wait
        cluster.nodes_manager.connection_kwargs["connection_class"] = SSLConnection if found.ssl else Connection
        wrap_connections(cluster, timed)
        return cluster  # type: ignore[return-value]  # the same commands, as the relay uses them
    if scheme in SENTINEL_SCHEMES:
        target = SentinelURL.parse(url)
        sentinel = Sentinel(target.sentinels, sentinel_kwargs={**timeouts, "password": target.sentinel_password},
                            **timeouts)
        managed = SentinelManagedSSLConnection if target.ssl else SentinelManagedConnection
        return sentinel.master_for(target.service, connection_pool_class=BlockingSentinelPool,
                                   connection_class=timed(managed), db=target.db, username=target.username,
                                   password=target.password, max_connections=settings.redis_max_connections,
                                   timeout=wait, health_check_interval=10)
    try:
        pool = BlockingConnectionPool.from_url(
            url, max_connections=settings.redis_max_connections, timeout=wait,
            health_check_interval=10, **timeouts,
        )
    except ValueError as exc:  # redis-py's word for a URL it cannot read
        raise BadRedisURL(f"{exc} (or redis+sentinel:// for Sentinel, redis+cluster:// for a cluster)") from None
    client = Redis(connection_pool=pool)
    wrap_connections(client, timed)
    return client


async def close(client: Redis) -> None:
    """Close ``client``'s pool, and its sentinels' connections when it has sentinels."""
    if isinstance(client, RedisCluster):
        await client.aclose()
        return
    await client.aclose(close_connection_pool=True)
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()


#: The oldest Redis the relay runs on: ``ZADD ... GT`` and ``SET ... GET`` (6.2).
MINIMUM_VERSION = (6, 2)
#: ... and as a cluster: shard channels (SPUBLISH, SSUBSCRIBE) are new in 7.0.
MINIMUM_CLUSTER_VERSION = (7, 0)


class RedisTooOld(RuntimeError):
    """The Redis behind the URL lacks a command the relay needs."""


def parse_version(text: str) -> tuple[int, ...]:
    """``"7.0.15"`` -> ``(7, 0, 15)``; the leading numeric parts only."""
    parts = []
    for piece in text.split("."):
        digits = re.match(r"[0-9]+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() < len(piece):
            break  # "4-rc1": the number ends here
    return tuple(parts)


async def check_version(client: Redis, minimum: tuple[int, ...] | None = None) -> str:
    """The server's version (a cluster's oldest master's); :class:`RedisTooOld` when it is older
    than ``minimum`` (MINIMUM_VERSION, or MINIMUM_CLUSTER_VERSION on a cluster)."""
    cluster = isinstance(client, RedisCluster)
    minimum = minimum or (MINIMUM_CLUSTER_VERSION if cluster else MINIMUM_VERSION)
    if cluster:
        replies = await client.info("server", target_nodes=RedisCluster.PRIMARIES)
        versions = [str(reply.get("redis_version", "")) for reply in replies.values()]
    else:
        versions = [str((await client.info("server")).get("redis_version", ""))]
    version = min(versions, key=parse_version)
    if parse_version(version) < minimum:
        mode = " as a cluster" if cluster else ""
        raise RedisTooOld(f"Redis {version or '(unknown version)'} is too old: the relay needs "
                          f"{'.'.join(map(str, minimum))} or newer{mode}")
    return version


async def preflight(url: str, settings: RelaySettings) -> None:
    """Before serving: refuse a Redis too old for the relay (RedisTooOld).  An unreachable one is
    not refused: the node starts, says not ready, and keeps trying."""
    client = connect(url, settings)
    try:
        await check_version(client)
    except (RedisError, OSError):
        pass
    finally:
        await close(client)
