"""Which relay nodes are alive: one sorted set on the Redis clock, and the sweep of the dead.

Each node writes its own liveness (a heartbeat, :meth:`NodeLiveness.beat`)
into ``ir:nodes``, scored by when it ends.  The scripts that read an
instance's agents run in the instance's slot and cannot read that set, so
each node reads it once a second and passes the live nodes in; a node dead
for good has its agent entries swept from every instance it recorded them in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay.store import connection, keys
from relay.store.scripts import script
from relay.store.tokens import text

log = logging.getLogger("relay.registry")

#: Instances swept per round trip.
SWEEP_BATCH = 200


T = TypeVar("T")


class NodeLiveness:
    """Which relay nodes are alive, read once a second, for the scripts that read agents.

    Those scripts run in an instance's slot and cannot read ``ir:nodes`` (on a
    cluster it is in another), so each node keeps the set and passes it in.
    Only a node listed with a liveness still running counts: one dead, or
    never heard of, does not (a node that just started counts within a
    second).  This node always counts for itself, and a node's own liveness
    writes update its set at once.  A node dead for
    ``keys.dead_node_memory_ms`` is swept (its entries deleted from every
    instance it recorded agents of) and forgotten.
    """

    def __init__(self, redis: Redis, *, heartbeat_timeout: float, node_id: str = "", interval: float = 1.0):
        self.redis = redis
        self.node_id = node_id
        self.interval = interval
        self.memory_ms = keys.dead_node_memory_ms(heartbeat_timeout)
        #: The live nodes, as last read (sorted: every request passes it to a script, unchanged between reads).
        self.alive: tuple[str, ...] = (node_id,) if node_id else ()
        self._beat = redis.register_script(script("node_beat"))
        self._node_alive = redis.register_script(script("node_alive"))
        self._nodes = redis.register_script(script("nodes_read"))
        self._forget = redis.register_script(script("node_forget"))
        self._drop_entries = redis.register_script(script("node_drop_entries"))
        self._sweeping: set[str] = set()
        self._read_at = -1.0

    def _set(self, nodes: set[str]) -> None:
        if self.node_id:
            nodes.add(self.node_id)
        self.alive = tuple(sorted(nodes))

    def saw(self, node: str, alive: bool) -> None:
        """This process just wrote ``node``'s liveness (its heartbeat, or its leaving)."""
        if alive != (node in self.alive):
            self._set({n for n in self.alive if n != node} | ({node} if alive else set()))

    async def beat(self, node: str, ttl_ms: int) -> bool:
        """``node`` alive for ``ttl_ms`` more; False when its liveness had ended or was missing."""
        alive = await self._beat(keys=[keys.NODES], args=[node, ttl_ms])
        self.saw(node, True)
        return bool(alive)

    async def node_alive(self, node: str) -> bool:
        return bool(await self._node_alive(keys=[keys.NODES], args=[node]))

    async def end(self, node: str) -> None:
        """``node``'s liveness ends now (it leaves)."""
        await self.redis.zadd(keys.NODES, {node: 0})
        self.saw(node, False)

    async def refresh(self) -> list[str]:
        """Read which nodes are alive; returns those dead long enough to be swept."""
        started = time.monotonic()
        flat = await self._nodes(keys=[keys.NODES])
        now = int(flat[0])
        nodes = [(text(flat[i]), float(flat[i + 1])) for i in range(1, len(flat), 2)]
        self._set({node for node, ends in nodes if ends > now})
        self._read_at = max(self._read_at, started)
        return [node for node, ends in nodes if ends < now - self.memory_ms and node != self.node_id]

    async def reread(self, since: float) -> bool:
        """Read the set again unless a read that started after ``since`` is done; True if read.

        For a read of agents (a pick that found the instance offline, a view
        that skipped an entry) begun at ``since`` (``time.monotonic()``): the
        agent may be on a node that started within the last second.  Its node
        was listed before its agent was, so a read begun after ``since`` lists
        it; one begun earlier, however recent, may not.  The caller reads its
        agents again once at most, so a dead node's entry costs one read more.
        """
        if self._read_at >= since:
            return False
        await self.refresh()
        return True

    async def read_again_if(self, read: Callable[[], Awaitable[T]], missed: Callable[[T], bool]) -> T:
        """``read()`` (a read of agents passing ``alive``); once more after :meth:`reread` when
        its result ``missed`` an entry for want of a node in the set."""
        since = time.monotonic()
        result = await read()
        if missed(result) and await self.reread(since):
            result = await read()
        return result

    async def sweep(self, node: str) -> int:
        """Delete a long-dead node's entries from every instance it recorded, then forget it.

        One relay node sweeps it (a lock key); if it stops halfway the node
        stays listed, and the sweep is done again once the lock expires.  A
        node that came back meanwhile is made to re-assert its agents.
        """
        if node == self.node_id or not await self.redis.set(keys.sweep_lock(node), "1", nx=True, px=60_000):
            return 0
        swept, batch = 0, []
        async for instance_id in self.redis.sscan_iter(keys.node_instances(node), count=SWEEP_BATCH):
            batch.append(text(instance_id))
            if len(batch) == SWEEP_BATCH:
                swept += await self._drop(node, batch)
                batch = []
        swept += await self._drop(node, batch)
        await self.redis.delete(keys.node_instances(node))
        if await self._forget(keys=[keys.NODES], args=[node, self.memory_ms]) == 2:
            log.warning("relay node %s came back while it was swept; it re-asserts its agents", node)
        return swept

    async def _drop(self, node: str, instance_ids: list[str]) -> int:
        await connection.run_scripts(self.redis, self._drop_entries,
                                  [([keys.agents(iid), keys.load(iid)], [node]) for iid in instance_ids])
        return len(instance_ids)

    async def run(self) -> None:
        """Keep the set fresh and sweep the long dead, forever (started by the composition root).

        A sweep runs beside the reads, so a long one never leaves the set stale.
        """
        async with anyio.create_task_group() as tg:
            while True:
                try:
                    for node in await self.refresh():
                        if node not in self._sweeping:
                            self._sweeping.add(node)
                            tg.start_soon(self._sweep_quietly, node)
                except (RedisError, OSError) as exc:
                    log.debug("could not read node liveness (%s)", exc)
                await anyio.sleep(self.interval)

    async def _sweep_quietly(self, node: str) -> None:
        try:
            log.info("sweeping the entries of relay node %s, dead for good", node)
            await self.sweep(node)
        except (RedisError, OSError) as exc:
            log.warning("could not sweep relay node %s (%s); trying again later", node, exc)
        finally:
            self._sweeping.discard(node)
