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
import secrets
from collections.abc import Callable

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay.store import connection, keys
from relay.store.scripts import script
from relay.store.tokens import text

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
    if connection.is_cluster(redis):
        await redis.set(keys.LAYOUT_KEY, keys.LAYOUT, nx=True)
        return 0
    with anyio.fail_after(wait):
        while not await redis.set(LOCK_KEY, token := secrets.token_hex(8), nx=True, px=LOCK_MS):
            if await redis.get(keys.LAYOUT_KEY) is not None:
                return 0  # another node moved it meanwhile
            await anyio.sleep(0.2)
    try:
        moved = await _move(redis, token)
        await redis.set(keys.LAYOUT_KEY, keys.LAYOUT)
    finally:
        await _unlock(keys=[LOCK_KEY], args=[token], client=redis)
    if moved:
        log.info("moved %d instances to key layout %d", moved, keys.LAYOUT)
    return moved


def _old_id(key: bytes, prefix: str) -> str | None:
    """The instance id of a layout-1 key, None for a key already in layout 2."""
    rest = text(key)[len(prefix):]
    return None if rest.startswith("{") else rest


async def _unlock(*, keys: list[str], args: list[str], client: Redis) -> None:
    await client.eval(script("migrate_unlock"), len(keys), *keys, *args)


async def _move(redis: Redis, token: str) -> int:
    moved = 0
    move_caller_keys = redis.register_script(script("migrate_caller_keys"))
    scanned = 0

    async def keep_lock() -> None:
        # A large registry takes a while: the lock lives on while we hold it.
        nonlocal scanned
        scanned += 1
        if scanned % 500 == 0:
            await redis.pexpire(LOCK_KEY, LOCK_MS)

    async for key in redis.scan_iter(match=OLD_INSTANCE + "*", count=1000):
        await keep_lock()
        if (iid := _old_id(key, OLD_INSTANCE)) is not None and await redis.renamenx(key, keys.instance(iid)):
            moved += 1
    async for key in redis.scan_iter(match=OLD_CALLER_KEYS + "*", count=1000):
        await keep_lock()
        if (iid := _old_id(key, OLD_CALLER_KEYS)) is not None:
            await move_caller_keys(keys=[key, keys.caller_keys(iid)])
    for prefix in OLD_DISPOSABLE:
        async for key in redis.scan_iter(match=prefix + "*", count=1000):
            await keep_lock()
            if _old_id(key, prefix) is not None:
                await redis.delete(key)
    return moved


async def keep_trying(redis: Redis, ready: Callable[[], None], *, interval: float = 1.0) -> None:
    """``ensure_layout`` until it succeeds, then ``ready()``: for a node that started without Redis."""
    while True:
        try:
            await ensure_layout(redis)
        except (RedisError, OSError) as exc:
            log.debug("key layout not checked yet (%s)", exc)
        except LayoutTooNew as exc:
            log.error("%s; this node stays not ready", exc)
            return
        else:
            ready()
            return
        await anyio.sleep(interval)
