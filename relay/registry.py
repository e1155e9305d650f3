"""Instances and their presence, stored in Redis.

``InstanceRegistry`` owns registration (ids, hashed agent tokens, paging) and
presence (which agents of an instance are connected, on which node).  All key
names come from :mod:`relay.keys`; every multi-step change is a pipeline
(MULTI/EXEC) or a Lua script, so concurrent relay nodes never see half of one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from . import keys
from .errors import Forbidden, NotFound, Unauthorized

TOKEN_PREFIX = "ira_"


def new_token() -> str:
    # 32 random bytes = 256 bits, url-safe so it survives headers and shells.
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    # Tokens carry 256 bits of entropy, so a fast hash is enough: there is
    # nothing to brute-force, and agents authenticate on every reconnect.
    return hashlib.sha256(token.encode()).hexdigest()


def new_instance_id() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class AgentEntry:
    """One connected agent of an instance, as recorded in Redis."""

    agent_id: str
    node: str
    session: str
    max_concurrency: int
    models: tuple[str, ...]
    connected_at: float

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "node": self.node,
                "session": self.session,
                "max_concurrency": self.max_concurrency,
                "models": list(self.models),
                "connected_at": self.connected_at,
            }
        )

    @classmethod
    def decode(cls, agent_id: str, raw: bytes | str) -> "AgentEntry":
        obj = orjson.loads(raw)
        return cls(
            agent_id=agent_id,
            node=obj["node"],
            session=obj["session"],
            max_concurrency=int(obj["max_concurrency"]),
            models=tuple(obj["models"]),
            connected_at=float(obj["connected_at"]),
        )


# Agents of one instance whose node is alive.  Entries of dead nodes are
# removed on the way (a dead node cannot clean up after itself).  One round
# trip per call, whatever the number of agents.
_LIVE_AGENTS = """
local entries = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #entries, 2 do
  local entry = cjson.decode(entries[i + 1])
  if redis.call('EXISTS', ARGV[1] .. entry['node']) == 1 then
    table.insert(out, entries[i])
    table.insert(out, entries[i + 1])
  else
    redis.call('HDEL', KEYS[1], entries[i])
  end
end
return out
"""

# Remove an agent only if the entry still belongs to the session that is
# leaving: a reconnect may already have replaced it with a newer session.
_REMOVE_AGENT = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw and cjson.decode(raw)['session'] == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HSET', KEYS[2], 'last_seen', ARGV[3])
  return 1
end
return 0
"""


class InstanceRegistry:
    def __init__(self, redis: Redis, *, heartbeat_timeout: float, base_url: str):
        self.redis = redis
        self.heartbeat_timeout = heartbeat_timeout
        self.base_url = base_url.rstrip("/")
        self._live_agents = redis.register_script(_LIVE_AGENTS)
        self._remove_agent = redis.register_script(_REMOVE_AGENT)

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
        async with self.redis.pipeline(transaction=True) as pipe:
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
        return {k.decode(): v.decode() for k, v in record.items()}

    async def exists(self, instance_id: str) -> bool:
        return bool(await self.redis.exists(keys.instance(instance_id)))

    async def authenticate(self, token: str) -> str | None:
        """The instance an agent token belongs to, or None."""
        token_hash = hash_token(token)
        instance_id = await self.redis.get(keys.token(token_hash))
        if instance_id is None:
            return None
        instance_id = instance_id.decode()
        stored = await self.redis.hget(keys.instance(instance_id), "token_hash")
        # The lookup above is by hash; the constant-time compare guards the
        # record itself against a stale or tampered index entry.
        if stored is None or not hmac.compare_digest(stored.decode(), token_hash):
            return None
        return instance_id

    async def check_owner(self, instance_id: str, token: str | None) -> None:
        """Raise unless ``token`` is the agent token of ``instance_id``."""
        record = await self._record(instance_id)
        if not token:
            raise Unauthorized("owner token required: Authorization: Bearer <agent_token>")
        if not hmac.compare_digest(record["token_hash"], hash_token(token)):
            raise Forbidden("this token does not own the instance")

    async def delete(self, instance_id: str) -> None:
        record = await self._record(instance_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.instance(instance_id), keys.agents(instance_id))
            pipe.delete(keys.token(record["token_hash"]))
            pipe.zrem(keys.INSTANCES, instance_id)
            pipe.publish(keys.EVENTS_CHANNEL, orjson.dumps({"deleted": instance_id}))
            await pipe.execute()

    # -- presence ----------------------------------------------------------

    async def add_agent(self, instance_id: str, entry: AgentEntry) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.agents(instance_id), entry.agent_id, entry.encode())
            pipe.hset(
                keys.instance(instance_id),
                mapping={"models": orjson.dumps(list(entry.models)), "last_seen": repr(time.time())},
            )
            await pipe.execute()

    async def remove_agent(self, instance_id: str, agent_id: str, session: str) -> bool:
        removed = await self._remove_agent(
            keys=[keys.agents(instance_id), keys.instance(instance_id)],
            args=[agent_id, session, repr(time.time())],
        )
        return bool(removed)

    async def live_agents(self, instance_id: str) -> list[AgentEntry]:
        flat = await self._live_agents(keys=[keys.agents(instance_id)], args=[keys.node("")])
        return [AgentEntry.decode(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2)]

    async def refresh_node(self, node_id: str, entries: list[tuple[str, AgentEntry]] = ()) -> None:
        """Mark this node alive for one more heartbeat timeout.

        ``entries`` (instance id, agent) are re-asserted in the same pipeline;
        pass them after Redis came back, since it may have lost them.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(keys.node(node_id), repr(time.time()), px=keys.node_ttl_ms(self.heartbeat_timeout))
            for instance_id, entry in entries:
                pipe.hset(keys.agents(instance_id), entry.agent_id, entry.encode())
            await pipe.execute()

    async def drop_node(self, node_id: str) -> None:
        await self.redis.delete(keys.node(node_id))

    # -- views -------------------------------------------------------------

    def _view(self, instance_id: str, record: dict[str, str], live: list[AgentEntry]) -> dict[str, Any]:
        models: list[str] = []
        for entry in live:
            models.extend(m for m in entry.models if m not in models)
        if not models:
            models = orjson.loads(record.get("models") or "[]")
        online = bool(live)
        last_seen = time.time() if online else (float(record["last_seen"]) if "last_seen" in record else None)
        return {
            "instance_id": instance_id,
            "name": record["name"],
            "description": record.get("description", ""),
            "status": "online" if online else "offline",
            "models": models,
            "agents": len(live),
            "last_seen": last_seen,
            "created_at": float(record["created_at"]),
            "chat_url": self.chat_url(instance_id),
        }

    async def view(self, instance_id: str) -> dict[str, Any]:
        record = await self._record(instance_id)
        return self._view(instance_id, record, await self.live_agents(instance_id))

    async def list(
        self, *, status: str | None = None, limit: int = 50, cursor: int = 0
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of instances in registration order.

        The cursor is the registration sequence of the last instance returned;
        with a status filter, pages are filled by reading further batches, so a
        page is short only at the end of the list.
        """
        out: list[dict[str, Any]] = []
        position = cursor
        while len(out) < limit:
            batch = await self.redis.zrangebyscore(
                keys.INSTANCES, f"({position}", "+inf", start=0, num=limit, withscores=True
            )
            if not batch:
                return out, None
            async with self.redis.pipeline(transaction=False) as pipe:
                for member, _ in batch:
                    pipe.hgetall(keys.instance(member.decode()))
                    pipe.hgetall(keys.agents(member.decode()))
                results = await pipe.execute()
            agent_maps = [
                [AgentEntry.decode(k.decode(), v) for k, v in raw.items()] for raw in results[1::2]
            ]
            # One liveness read per distinct node in the batch, not per agent.
            nodes = sorted({e.node for entries in agent_maps for e in entries})
            alive = dict(zip(nodes, await self.redis.mget([keys.node(n) for n in nodes]))) if nodes else {}
            for (member, score), record, entries in zip(batch, results[0::2], agent_maps):
                position = int(score)
                if not record:
                    continue  # deleted between the two reads
                iid = member.decode()
                live = [e for e in entries if alive.get(e.node) is not None]
                view = self._view(iid, {k.decode(): v.decode() for k, v in record.items()}, live)
                if status is None or view["status"] == status:
                    out.append(view)
                    if len(out) == limit:
                        break
        more = await self.redis.zcount(keys.INSTANCES, f"({position}", "+inf")
        return out, (str(position) if more else None)
