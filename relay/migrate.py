"""Data written by an older relay, moved to the key layout this one reads (``keys.LAYOUT``).

Layout 1 (before 0.14) named an instance's keys by its id alone
(``ir:inst:<id>``); layout 2 puts the id in a hash tag (``ir:inst:{<id>}``)
so that a Redis Cluster keeps every key of an instance in one slot.  What
lasts is moved: instance records and caller keys (which also gain their
in-slot index by hash).  What a running relay rebuilds is deleted: agent
entries and load counters (agents reconnect, and their nodes record them
again); rate buckets, stream leases and node liveness keys (``ir:node:<id>``)
expire by themselves.  Directory, token and caller-key indexes keep their names.

The first node to start on old data moves it, holding a lock; the others
wait for the layout key.  A relay of layout 1 must not run beside one of
layout 2 (it would write the old names): stop the old nodes first.  On a
cluster there is nothing to move (layout 1 could not run on one).
"""

from __future__ import annotations

import logging

import anyio
import orjson
from redis.asyncio import Redis

from . import keys, storage
from .registry import text

log = logging.getLogger("relay.migrate")

#: How long one node may hold the migration before another may take over.
LOCK_MS = 120_000
LOCK_KEY = keys.PREFIX + "migrating"
OLD_INSTANCE = keys.PREFIX + "inst:"
OLD_CALLER_KEYS = keys.PREFIX + "ckeys:"
OLD_DISPOSABLE = (keys.PREFIX + "agents:", keys.PREFIX + "load:")


class LayoutTooNew(RuntimeError):
    """The data was written by a newer relay than this one."""


async def ensure_layout(redis: Redis, *, wait: float = 600.0) -> int:
    """Bring the data to ``keys.LAYOUT``; returns how many instances were moved (0: nothing to do)."""
    found = await redis.get(keys.LAYOUT_KEY)
    layout = int(found) if found is not None else None
    if layout == keys.LAYOUT:
        return 0
    if layout is not None and layout > keys.LAYOUT:
        raise LayoutTooNew(f"the data in Redis is of key layout {layout}; this relay reads layout {keys.LAYOUT} "
                           "(run the newer relay)")
    if storage.is_cluster(redis):
        await redis.set(keys.LAYOUT_KEY, keys.LAYOUT, nx=True)
        return 0
    with anyio.fail_after(wait):
        while not await redis.set(LOCK_KEY, "1", nx=True, px=LOCK_MS):
            if await redis.get(keys.LAYOUT_KEY) is not None:
                return 0  # another node moved it meanwhile
            await anyio.sleep(0.2)
    try:
        moved = await _move(redis)
        await redis.set(keys.LAYOUT_KEY, keys.LAYOUT)
    finally:
        await redis.delete(LOCK_KEY)
    if moved:
        log.info("moved %d instances to key layout %d", moved, keys.LAYOUT)
    return moved


def _old_id(key: bytes, prefix: str) -> str | None:
    """The instance id of a layout-1 key, None for a key already in layout 2."""
    rest = text(key)[len(prefix):]
    return None if rest.startswith("{") else rest


async def _move(redis: Redis) -> int:
    moved = 0
    async for key in redis.scan_iter(match=OLD_INSTANCE + "*", count=1000):
        if (iid := _old_id(key, OLD_INSTANCE)) is not None and await redis.renamenx(key, keys.instance(iid)):
            moved += 1
    async for key in redis.scan_iter(match=OLD_CALLER_KEYS + "*", count=1000):
        if (iid := _old_id(key, OLD_CALLER_KEYS)) is None:
            continue
        new = keys.caller_keys(iid)
        if not await redis.renamenx(key, new):
            continue
        # Layout 2 finds a key id by its hash inside the instance's own hash.
        records = await redis.hgetall(new)
        index = [part for key_id, raw in records.items() for part in (keys.caller_key_field(_key_hash(raw)), key_id)]
        if index:
            await redis.hset(new, items=index)
    for prefix in OLD_DISPOSABLE:
        async for key in redis.scan_iter(match=prefix + "*", count=1000):
            if _old_id(key, prefix) is not None:
                await redis.delete(key)
    return moved


def _key_hash(raw: bytes | str) -> str:
    return str(orjson.loads(raw)["key_hash"])
