"""Streams at once: concurrent-stream leases per instance and per caller.

A stream holds a lease (a member of a sorted set scored by its expiry) for
its whole life; the node renews its leases every heartbeat interval in one
pipeline and releases them when streams end.  Leases of a node that died
expire by themselves.  A request's first pick takes its lease in the same
script (:meth:`StreamLeases.pick`), and its end gives the lease back with the
agent slots it took, in one script too.  429 with ``Retry-After``.  A limit
set to 0 is off.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay.errors import RateLimited
from relay.store import connection
from relay.store.agents import AgentEntry, ConnectedAgents
from relay.store.scripts import script

log = logging.getLogger("relay.limits")


@dataclass(frozen=True, slots=True)
class Slot:
    """One concurrency limit: at most ``limit`` leases in the set ``key``."""

    key: str
    limit: int
    what: str


@dataclass(slots=True)
class Lease:
    id: str
    keys: list[str] = field(default_factory=list)


@dataclass(slots=True)
class PendingLease:
    """A lease not taken yet, and the limits it must fit (only those that are on)."""

    lease: Lease
    slots: list[Slot]


class StreamLeases:
    def __init__(self, redis: Redis, *, ttl_ms: int):
        self.redis = redis
        self.ttl_ms = ttl_ms
        self.held: dict[str, Lease] = {}
        self._acquire = redis.register_script(script("lease_acquire"))
        self._renew = redis.register_script(script("lease_renew"))
        self._release = redis.register_script(script("lease_release"))
        self._lease_and_pick = redis.register_script(script("agent_pick_leased"))

    def prepare(self, slots: list[Slot]) -> PendingLease:
        """A lease for ``slots``, not taken yet (no round trip): :meth:`take` or :meth:`pick` takes it."""
        active = [s for s in slots if s.limit > 0]
        return PendingLease(Lease(secrets.token_hex(8), [s.key for s in active]), active)

    async def acquire(self, slots: list[Slot]) -> Lease:
        """Take a lease in every one of ``slots`` now (429 when one is full)."""
        pending = self.prepare(slots)
        await self.take(pending)
        return pending.lease

    async def take(self, pending: PendingLease) -> None:
        lease = pending.lease
        if not pending.slots:
            return
        full = await self._acquire(keys=lease.keys, args=[lease.id, self.ttl_ms, *(s.limit for s in pending.slots)])
        self._taken(pending, int(full))

    async def pick(self, pending: PendingLease, registry: ConnectedAgents, instance_id: str, op: str, *,
                   here: str, model: str) -> tuple[str, AgentEntry | None]:
        """``registry.pick_agent`` and :meth:`take` in one script: the lease is taken if an agent was picked."""
        if not pending.slots:
            return await registry.pick_agent(instance_id, op, here=here, model=model)
        lease = pending.lease
        pick_keys, pick_args = registry.pick_request(instance_id, op, here=here, model=model)

        async def lease_and_pick() -> tuple[str, AgentEntry | None]:
            result = await self._lease_and_pick(keys=[*pick_keys, *lease.keys],
                                                args=[*pick_args, lease.id, self.ttl_ms,
                                                      *(s.limit for s in pending.slots), *registry.liveness.alive])
            if result[0] == b"full":
                self._taken(pending, int(result[1]))
            return registry.picked(result)

        # Offline: nothing taken; the agent may be on a node too new for the set of live ones.
        verdict, entry = await registry.liveness.read_again_if(lease_and_pick, lambda picked: picked[0] == "offline")
        if entry is not None:
            self.held[lease.id] = lease
        return verdict, entry

    def _taken(self, pending: PendingLease, full: int) -> None:
        """After a script took the lease (``full`` 0) or found slot ``full`` (1-based) full: 429."""
        if full:
            slot = pending.slots[full - 1]
            raise RateLimited(
                f"{slot.what} already has {slot.limit} streams running; retry when one ends",
                code="too_many_streams", headers={"Retry-After": "1"},
            )
        self.held[pending.lease.id] = pending.lease

    async def release(self, lease: Lease, agents: Sequence[tuple[str, str]] = ()) -> None:
        """Give the lease back, and the agent slots ``agents`` (load hash key, session) with it: one script."""
        held = self.held.pop(lease.id, None) is not None
        sets = lease.keys if held else []
        if not sets and not agents:
            return
        try:
            await self._release(keys=[*sets, *(key for key, _ in agents)],
                                args=[lease.id, len(sets), *(session for _, session in agents)])
        except (RedisError, OSError) as exc:
            log.debug("could not release stream lease (%s); it expires on its own", exc)

    async def renew_all(self) -> None:
        """Renew every lease this node holds: one script per slot (an instance's), all in one go."""
        by_slot: dict[str, tuple[list[str], list[str]]] = {}
        for lease in list(self.held.values()):
            for key in lease.keys:
                sets, ids = by_slot.setdefault(connection.hash_tag(key), ([], []))
                sets.append(key)
                ids.append(lease.id)
        await connection.run_scripts(self.redis, self._renew,
                                  [(sets, [self.ttl_ms, *ids]) for sets, ids in by_slot.values()])

    async def run(self, interval: float) -> None:
        """Renew leases forever (started by the composition root)."""
        while True:
            await anyio.sleep(interval)
            try:
                await self.renew_all()
            except (RedisError, OSError) as exc:
                log.debug("could not renew stream leases (%s)", exc)
