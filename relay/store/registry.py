"""Instances in Redis: registration, credentials, views and paging.

``InstanceRegistry`` owns registration (ids, hashed agent tokens, the
directory in registration order) and what is read of an instance (its
view, pages of the directory); it is also the instance's connected agents
(:class:`~relay.store.agents.ConnectedAgents`), whose node liveness
(:class:`~relay.store.liveness.NodeLiveness`) it is given or makes.  All key
names come from :mod:`relay.store.keys`.  A change to one instance's keys is
a Lua script (one slot, atomic on one server and on a cluster alike); a
change that also touches a key of its own (an index by hash, the directory)
is made in the order that keeps every reader right if it stops halfway: the
instance's record is the truth, and indexes only point at it.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any, cast

import orjson
from pydantic import ValidationError
from redis.asyncio import Redis

from relay.bodies.dify import AgentParameters
from relay.errors import Forbidden, NotFound, Unauthorized
from relay.store import connection, keys
from relay.store.agents import AgentEntry, ConnectedAgents
from relay.store.liveness import NodeLiveness
from relay.store.scripts import script
from relay.store.tokens import hash_token, new_instance_id, new_token, text

log = logging.getLogger("relay.registry")

#: Instances read per round trip while filling a filtered page (status, search), and an unfiltered one.
FILTERED_BATCH = 200
LIST_BATCH = 100
#: Model names one view lists per kind, unless the registry is given another cap (the agents'
#: ``RELAY_AGENT_MAX_MODELS``).
VIEW_MAX_MODELS = 256
#: Model names one page of views may carry (``GET /api/instances``, ``/v1/models``, SwiftChat's
#: ``/api/models``): 1024 names of at most 256 characters, under a megabyte in any of them.
PAGE_MAX_NAMES = 1024


class InstanceRegistry(ConnectedAgents):
    def __init__(self, redis: Redis, *, heartbeat_timeout: float, base_url: str,
                 liveness: NodeLiveness | None = None, max_models: int = VIEW_MAX_MODELS):
        super().__init__(redis, heartbeat_timeout=heartbeat_timeout,
                         liveness=liveness or NodeLiveness(redis, heartbeat_timeout=heartbeat_timeout))
        self.base_url = base_url.rstrip("/")
        #: Names a view lists per kind (the union of its agents' lists, first come): each agent is
        #: held to ``RELAY_AGENT_MAX_MODELS``, but replicas may each declare different ones.
        self.max_models = max_models or VIEW_MAX_MODELS
        self._publish = connection.publisher(redis)
        self._delete = redis.register_script(script("instance_delete"))
        self._set_if_exists = redis.register_script(script("instance_set_if_exists"))

    def chat_url(self, instance_id: str) -> str:
        return f"{self.base_url}/api/chat/{instance_id}"

    # -- registration ------------------------------------------------------

    async def register(self, name: str, description: str = "") -> tuple[str, str]:
        """Create an instance; return ``(instance_id, agent_token)``.

        The token is returned here once and stored only as its hash.
        """
        instance_id, token = new_instance_id(), new_token()
        token_hash = hash_token(token)
        seq = await self.redis.incr(keys.SEQUENCE)
        now = time.time()
        # Three keys in three slots, so no transaction: if this stops halfway,
        # the record is there without its index or its directory entry (an
        # orphan nobody has the token of), or the reverse (pointing at nothing,
        # which every reader skips).
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(
                keys.instance(instance_id),
                mapping={
                    "name": name,
                    "description": description,
                    "token_hash": token_hash,
                    "created_at": repr(now),
                    "seq": seq,
                    "models": "[]",
                },
            )
            pipe.set(keys.token(token_hash), instance_id)
            pipe.zadd(keys.INSTANCES, {instance_id: seq})
            await pipe.execute()
        return instance_id, token

    async def _record(self, instance_id: str) -> dict[str, str]:
        record = await self.redis.hgetall(keys.instance(instance_id))
        if not record:
            raise NotFound(f"instance {instance_id!r} not found", param="instance_id")
        return {text(k): text(v) for k, v in record.items()}

    async def parameters(self, instance_id: str) -> dict[str, Any]:
        """The conversation API's ``introduction``, ``variables`` and ``conversations`` switch.

        The owner's settings (``PATCH``) win; what the instance's agent suggested
        (``hello.parameters``) fills what the owner left unset.
        """
        introduction, variables, enabled, suggested = await self.redis.hmget(
            keys.instance(instance_id), "introduction", "variables", "conversations", "agent_parameters")
        agent = orjson.loads(suggested) if suggested else {}
        return {
            "introduction": text(introduction) if introduction is not None else agent.get("introduction", ""),
            "variables": orjson.loads(variables) if variables is not None else agent.get("variables", []),
            "conversations": enabled != b"off",
        }

    async def declare_parameters(self, instance_id: str, parameters: dict[str, Any]) -> None:
        """Keep what an agent suggests for the conversation API (the owner's own settings win).

        The last agent to connect decides (none: the suggestion is withdrawn).
        An agent is not trusted to get it right: what does not validate is
        logged and dropped, and the agent keeps serving.
        """
        try:
            checked = AgentParameters.model_validate(parameters)
        except ValidationError as exc:
            log.warning("instance %s: agent parameters ignored (%s)", instance_id, exc.errors()[0]["msg"])
            return
        stored = checked.model_dump(mode="json", exclude_none=True)
        # Only onto an instance that still exists: a write after its deletion
        # would bring back a record holding nothing else.
        await self._set_if_exists(keys=[keys.instance(instance_id)], args=["agent_parameters", orjson.dumps(stored)])

    async def exists(self, instance_id: str) -> bool:
        return bool(await self.redis.exists(keys.instance(instance_id)))

    async def authenticate(self, token: str) -> str | None:
        """The instance an agent token belongs to, or None."""
        token_hash = hash_token(token)
        found = await self.redis.get(keys.token(token_hash))
        if found is None:
            return None
        instance_id = text(found)
        stored = await self.redis.hget(keys.instance(instance_id), "token_hash")
        # The lookup above is by hash; the constant-time compare guards the
        # record itself against a stale or tampered index entry.
        if stored is None or not hmac.compare_digest(text(stored), token_hash):
            return None
        return instance_id

    async def credential_current(self, instance_id: str, token_hash: str) -> bool:
        """Whether ``token_hash`` is still the agent token hash of the instance."""
        stored = await self.redis.hget(keys.instance(instance_id), "token_hash")
        return stored is not None and hmac.compare_digest(text(stored), token_hash)

    async def token_hashes(self, instance_ids: list[str]) -> dict[str, str | None]:
        """The current agent-token hash of each instance (None when deleted), in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for instance_id in instance_ids:
                pipe.hget(keys.instance(instance_id), "token_hash")
            values = await pipe.execute()
        return {i: (v.decode() if v is not None else None) for i, v in zip(instance_ids, values, strict=True)}

    async def check_owner(self, instance_id: str, token: str | None) -> str:
        """``token``, once it is the agent token of ``instance_id``; 401/403/404 otherwise."""
        record = await self._record(instance_id)
        if not token:
            raise Unauthorized("owner token required: Authorization: Bearer <agent_token>")
        if not hmac.compare_digest(record["token_hash"], hash_token(token)):
            raise Forbidden("this token does not own the instance")
        return token

    async def delete(self, instance_id: str) -> None:
        """Delete an instance: the indexes that point at it, then its record, then tell every node.

        The record goes last, so that a deletion that stops halfway (Redis
        gone for a moment) can be asked again by its owner: the record still
        says who owns it, and each step is done again harmlessly.
        """
        token_hash = await self.redis.hget(keys.instance(instance_id), "token_hash")
        if token_hash is None:
            raise NotFound(f"instance {instance_id!r} not found", param="instance_id")
        entries = await self.redis.hvals(keys.agents(instance_id))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(keys.token(text(token_hash)))
            pipe.zrem(keys.INSTANCES, instance_id)
            for node in {orjson.loads(raw)["node"] for raw in entries}:
                pipe.srem(keys.node_instances(node), instance_id)
            await pipe.execute()
        if not await self._delete(keys=[keys.instance(instance_id), keys.agents(instance_id),
                                        keys.load(instance_id)]):
            raise NotFound(f"instance {instance_id!r} not found", param="instance_id")  # deleted meanwhile
        await self._publish(keys.EVENTS_CHANNEL, orjson.dumps({"deleted": instance_id}))

    # -- views -------------------------------------------------------------

    def _view(self, instance_id: str, record: dict[str, str], live: list[AgentEntry]) -> dict[str, Any]:
        cap = self.max_models
        models = union((e.models for e in live), cap)
        image_models = union((e.image_models for e in live), cap)
        transcribe_models = union((e.transcribe_models for e in live), cap)
        if not models:
            models = union([orjson.loads(record.get("models") or "[]")], cap)
        online = bool(live)
        last_seen = time.time() if online else (float(record["last_seen"]) if "last_seen" in record else None)
        return {
            "instance_id": instance_id,
            "name": record["name"],
            "description": record.get("description", ""),
            "status": "online" if online else "offline",
            "visibility": record.get("visibility", "public"),
            "models": models,
            "image_models": image_models,
            "transcribe_models": transcribe_models,
            "agents": len(live),
            "last_seen": last_seen,
            "created_at": float(record["created_at"]),
            "chat_url": self.chat_url(instance_id),
        }

    async def view(self, instance_id: str) -> dict[str, Any]:
        record = await self._record(instance_id)
        return self._view(instance_id, record, await self.live_agents(instance_id))

    async def _read_views(self, ids: list[str]) -> list[dict[str, Any] | None]:
        """The views of ``ids`` in one pipeline (None for an id not registered)."""
        since = time.monotonic()
        async with self.redis.pipeline(transaction=False) as pipe:
            for iid in ids:
                pipe.hgetall(keys.instance(iid))
                pipe.hgetall(keys.agents(iid))
            results = await pipe.execute()
        agent_maps = [[AgentEntry.decode(text(k), v) for k, v in raw.items()] for raw in results[1::2]]
        alive = set(self.liveness.alive)
        if any(e.node not in alive for entries in agent_maps for e in entries) and await self.liveness.reread(since):
            alive = set(self.liveness.alive)  # a node younger than the last read, or a dead one
        out: list[dict[str, Any] | None] = []
        for iid, record, entries in zip(ids, results[0::2], agent_maps, strict=True):
            if not record:
                out.append(None)  # never registered, or deleted between the two reads
                continue
            live = [e for e in entries if e.node in alive]
            out.append(self._view(iid, {text(k): text(v) for k, v in record.items()}, live))
        return out

    async def views(self, ids: list[str]) -> dict[str, dict[str, Any] | None]:
        """Current views of ``ids`` (private ones too: the id is what shows them), one round trip."""
        return dict(zip(ids, await self._read_views(ids), strict=True)) if ids else {}

    async def list(
        self, *, status: str | None = None, limit: int = 50, cursor: int = 0, query: str = "",
        scan_limit: int = 2000, max_names: int = PAGE_MAX_NAMES,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of instances in registration order.

        The cursor is the registration sequence of the last instance examined;
        with a filter (status, ``query``), pages are filled by reading further
        batches, so a page is short only at the end of the list, or when
        ``scan_limit`` instances were examined without filling it (a search
        that matches little must not read the whole registry in one request:
        the caller follows ``next_cursor``), or when the next instance would
        take the page past ``max_names`` model names (a page of instances
        that each declare hundreds of long names must not weigh megabytes;
        a page always holds at least one instance, which a view's own cap
        keeps far below it).

        ``query`` matches, ignoring case, a substring of the name, the
        description, the id or a model name.
        """
        needle = query.casefold()
        out: list[dict[str, Any]] = []
        position, examined = cursor, 0
        # A filtered page may need many instances read: in larger batches, fewer round trips
        # (what a batch reads past the page's last match is read again by the next page).
        # Batches are bounded too: a batch reads every agent entry of its instances, and a page
        # that fills its names at the first few instances must not have read hundreds.
        batch_size = min(limit, LIST_BATCH) if status is None and not needle else FILTERED_BATCH
        names, full = 0, False
        while len(out) < limit and examined < scan_limit and not full:
            batch = cast("list[tuple[bytes, float]]", await self.redis.zrangebyscore(
                keys.INSTANCES, f"({position}", "+inf", start=0, num=min(batch_size, scan_limit - examined),
                withscores=True,
            ))
            if not batch:
                return out, None
            found = await self._read_views([text(member) for member, _ in batch])
            for (_, score), view in zip(batch, found, strict=True):
                # Private instances are not advertised (their owners know the id); then the filters.
                if view is not None and view["visibility"] == "public" and \
                        (status is None or view["status"] == status) and (not needle or _matches(view, needle)):
                    weight = len(view["models"]) + len(view["image_models"]) + len(view["transcribe_models"])
                    if out and names + weight > max_names:
                        full = True  # the next page starts with this one
                        break
                    out.append(view)
                    names += weight
                position = int(score)
                examined += 1
                if len(out) == limit:
                    break
        more = await self.redis.zcount(keys.INSTANCES, f"({position}", "+inf")
        return out, (str(position) if more else None)


def union(lists: Iterable[Sequence[str]], cap: int = 0) -> list[str]:
    """The names of ``lists`` in order, each once, at most ``cap`` of them (0: all; linear: a dict,
    not list scans, since a view may list hundreds of names per kind)."""
    seen: dict[str, None] = {}
    for names in lists:
        for name in names:
            if cap and len(seen) >= cap:
                return list(seen)
            seen[name] = None
    return list(seen)


def _matches(view: dict[str, Any], needle: str) -> bool:
    """Whether a directory search (casefolded) finds this instance."""
    fields = [view["name"], view["description"], view["instance_id"], *view["models"]]
    return any(needle in str(field).casefold() for field in fields)
