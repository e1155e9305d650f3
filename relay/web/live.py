"""Live instance status for browsers: ``GET /api/instances/events?ids=…``.

Presence is derived (an agent entry counts only while its node's liveness
lasts), so there is no single moment at which "instance X went offline" could
be published: a node that dies just stops renewing its liveness.  The truth is a
read.  So each node runs one poller for every browser connected to it: once
per ``interval`` it reads the views of the union of the ids its watchers
follow (one pipeline, whatever the number of watchers), and tells each
watcher what changed since it last heard.

A watcher keeps only the newest view per id (``pending``), never a queue: a
slow reader costs one view per id it follows, and reads the latest state
when it catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import anyio
import orjson
from redis.exceptions import RedisError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from relay.errors import RateLimited, ServiceNotReady
from relay.inputs import address_group
from relay.serving.operations import cancel_on_disconnect
from relay.store.registry import InstanceRegistry

log = logging.getLogger("relay.watch")

#: Ids one watcher may follow: a directory page, with room to spare.
MAX_IDS = 100
#: Distinct ids one node follows for all its watchers (each is read once per interval).
MAX_IDS_PER_NODE = 20_000
#: Seconds a status stream lives before the relay ends it (EventSource reconnects at
#: once, with a fresh snapshot): no stream, and no stalled reader, is held forever.
MAX_AGE = 1800.0
#: Seconds one write may wait for a client that reads nothing before the stream ends.
WRITE_TIMEOUT = 30.0


def comparable(view: dict[str, Any] | None) -> Any:
    """What a change means: an online instance's ``last_seen`` is "now" at every read."""
    if view is None or view["status"] != "online":
        return view
    return {k: v for k, v in view.items() if k != "last_seen"}


class Watcher:
    """One browser's subscription: the ids it follows and the views it has not read yet."""

    def __init__(self, ids: list[str], address: str):
        self.ids = ids
        self.address = address
        self.seen: dict[str, Any] = {}
        self.pending: dict[str, dict[str, Any] | None] = {}
        self.changed = asyncio.Event()
        self.closed = False

    def offer(self, views: dict[str, dict[str, Any] | None]) -> list[str]:
        """Note what changed; return the ids that are gone (told once, then no longer followed)."""
        gone = []
        for iid in self.ids:
            if iid not in views:
                continue
            view = views[iid]
            key = comparable(view)
            if iid in self.seen and self.seen[iid] == key:
                continue
            self.seen[iid] = key
            self.pending[iid] = view
            self.changed.set()
            if view is None:
                gone.append(iid)
        if gone:
            self.ids = [iid for iid in self.ids if iid not in gone]
        return gone

    def take(self) -> dict[str, dict[str, Any] | None]:
        out, self.pending = self.pending, {}
        self.changed.clear()
        return out


class StatusWatch:
    """The node's watchers and its one poller.

    Cost is bounded three ways: streams per address group and per node, and
    distinct ids per node (``max_ids``; each id costs a read per interval,
    however many watchers follow it).  A newcomer's first views are read at
    once, for its own ids only; everyone else's on the interval.
    """

    def __init__(self, registry: InstanceRegistry, *, interval: float, max_watchers: int, per_address: int,
                 max_ids: int = MAX_IDS_PER_NODE):
        self.registry = registry
        self.interval = interval
        self.max_watchers = max_watchers
        self.per_address = per_address
        self.max_ids = max_ids
        self.watchers: set[Watcher] = set()
        self._by_address: Counter[str] = Counter()
        #: How many watchers follow each id.
        self._refs: Counter[str] = Counter()
        self._newcomers: set[Watcher] = set()
        self._wake = asyncio.Event()

    def open(self, ids: list[str], address: str) -> Watcher:
        """Follow ``ids`` until :meth:`release`; 429 past the per-address cap, 503 past the node's."""
        group = address_group(address)
        if self._by_address[group] >= self.per_address:
            raise RateLimited(f"at most {self.per_address} live status streams per address",
                              headers={"Retry-After": "5"})
        if len(self.watchers) >= self.max_watchers or (
                len(self._refs) + sum(1 for iid in ids if iid not in self._refs) > self.max_ids):
            raise ServiceNotReady("this relay node follows as many live status streams as it can",
                                  headers={"Retry-After": "5"})
        watcher = Watcher(ids, group)
        self.watchers.add(watcher)
        self._by_address[group] += 1
        self._refs.update(ids)
        self._newcomers.add(watcher)
        self._wake.set()  # a newcomer gets its first views now, not an interval later
        return watcher

    def release(self, watcher: Watcher) -> None:
        if watcher not in self.watchers:
            return
        self.watchers.discard(watcher)
        self._newcomers.discard(watcher)
        self._by_address[watcher.address] -= 1
        if not self._by_address[watcher.address]:
            del self._by_address[watcher.address]
        self._forget(watcher.ids)

    def _forget(self, ids: list[str]) -> None:
        self._refs.subtract(ids)
        for iid in ids:
            if self._refs[iid] <= 0:
                del self._refs[iid]

    def close(self) -> None:
        """End every watcher's stream (the node is draining: browsers reconnect elsewhere)."""
        for watcher in self.watchers:
            watcher.closed = True
            watcher.changed.set()

    async def run(self) -> None:
        """The poller: one batched read per interval while anyone watches, and newcomers' first reads.

        It runs in the task group of the node's heartbeat and subscriber: a
        poll that fails is logged and the next one tried, never let out of here.
        """
        loop = asyncio.get_running_loop()
        due = loop.time() + self.interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(due):
                    await self._wake.wait()
            self._wake.clear()
            everyone = loop.time() >= due
            if everyone:
                due = loop.time() + self.interval
            watchers = set(self.watchers) if everyone else set(self._newcomers)
            self._newcomers.clear()
            if watchers:
                try:
                    await self.poll(watchers)
                except Exception:
                    log.exception("live status: a poll failed; the next one is tried in %gs", self.interval)

    async def poll(self, watchers: set[Watcher] | None = None) -> None:
        """Read the views ``watchers`` (default: all) follow, in one batch, and offer them."""
        watchers = self.watchers if watchers is None else watchers
        ids = sorted({iid for watcher in watchers for iid in watcher.ids})
        if not ids:
            return
        try:
            views = await self.registry.views(ids)
        except (RedisError, OSError) as exc:
            # Watchers hear nothing until Redis answers; the browser shows the last state it read.
            log.warning("live status: could not read %d instances (%s)", len(ids), exc)
            return
        for watcher in list(watchers):
            if watcher in self.watchers:
                self._forget(watcher.offer(views))


class WatchResponse(Response):
    """The SSE body: ``instance`` events (a view) and ``deleted`` events, comments to keep proxies open.

    Releases its watcher however the response ends (finished, client gone, cancelled).
    """

    def __init__(self, watch: StatusWatch, watcher: Watcher, keepalive: float, headers: list[tuple[bytes, bytes]]):
        self.watch, self.watcher, self.keepalive = watch, watcher, keepalive
        self.status_code = 200
        self.background = None
        self.raw_headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            if scope.get("method") == "HEAD":  # the headers a GET gets; a body would never end
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_on_disconnect, receive, tg.cancel_scope)
                async for part in self.events():
                    async with asyncio.timeout(WRITE_TIMEOUT):
                        await send({"type": "http.response.body", "body": part, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                tg.cancel_scope.cancel()
        except (OSError, TimeoutError):
            pass  # the client went away mid-write, or reads nothing: the stream ends
        finally:
            self.watch.release(self.watcher)

    async def events(self) -> AsyncIterator[bytes]:
        watcher = self.watcher
        loop = asyncio.get_running_loop()
        # Spread out: streams opened together (a node's restart) must not all end together.
        end = loop.time() + MAX_AGE * random.uniform(0.75, 1.0)
        # Tell EventSource to reconnect quickly after a node goes away.
        yield b"retry: 2000\n\n"
        while not watcher.closed and loop.time() < end:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(self.keepalive, max(0.0, end - loop.time()))):
                    await watcher.changed.wait()
            if watcher.closed:
                return
            changes = watcher.take()
            if not changes:
                yield b": keep-alive\n\n"
                continue
            yield b"".join(event(iid, view) for iid, view in changes.items())


def event(instance_id: str, view: dict[str, Any] | None) -> bytes:
    if view is None:
        return b"event: deleted\ndata: " + orjson.dumps({"instance_id": instance_id}) + b"\n\n"
    return b"event: instance\ndata: " + orjson.dumps(view) + b"\n\n"
