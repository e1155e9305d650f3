"""Instances and their presence, stored in Redis.

``InstanceRegistry`` owns registration (ids, hashed agent tokens, paging) and
presence (which agents of an instance are connected, on which node).  All key
names come from :mod:`relay.keys`; every multi-step change is a pipeline
(MULTI/EXEC) or a Lua script, so concurrent relay nodes never see half of one.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
from pydantic import ValidationError
from redis.asyncio import Redis

from wire import OP_CHAT, OP_IMAGES, OP_TRANSCRIBE
from wire.bus import ENVELOPE_VERSION

from . import keys
from .errors import Forbidden, NotFound, Unauthorized
from .models import AgentParameters

log = logging.getLogger("relay.registry")

TOKEN_PREFIX = "ira_"


def new_token() -> str:
    # 32 random bytes = 256 bits, url-safe so it survives headers and shells.
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    # Tokens carry 256 bits of entropy, so a fast hash is enough: there is
    # nothing to brute-force, and agents authenticate on every reconnect.
    return hashlib.sha256(token.encode()).hexdigest()


def text(value: bytes | str | Any) -> str:
    """A Redis reply as text (the client is not set to decode: chunks stay bytes elsewhere)."""
    return value.decode() if isinstance(value, bytes) else str(value)


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
    #: Operations the agent can run (``hello.capabilities``); routing reads them.
    capabilities: tuple[str, ...] = (OP_CHAT,)
    #: Image generation models (``hello.image_models``), for the ``images`` operation.
    image_models: tuple[str, ...] = ()
    #: Transcription models (``hello.transcribe_models``), for the ``transcribe`` operation.
    transcribe_models: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "node": self.node,
                "session": self.session,
                "max_concurrency": self.max_concurrency,
                "models": list(self.models),
                "connected_at": self.connected_at,
                "capabilities": list(self.capabilities),
                "image_models": list(self.image_models),
                "transcribe_models": list(self.transcribe_models),
                # Which bus envelope its node reads: a 0.1 node's entry has none,
                # and other nodes cannot reach its agents (see the pick script).
                "bus": ENVELOPE_VERSION,
            }
        )

    @classmethod
    def decode(cls, agent_id: str, raw: bytes | str) -> AgentEntry:
        obj = orjson.loads(raw)
        return cls(
            agent_id=agent_id,
            node=obj["node"],
            session=obj["session"],
            max_concurrency=int(obj["max_concurrency"]),
            models=tuple(obj["models"]),
            connected_at=float(obj["connected_at"]),
            capabilities=tuple(obj.get("capabilities") or (OP_CHAT,)),
            image_models=tuple(obj.get("image_models") or ()),
            transcribe_models=tuple(obj.get("transcribe_models") or ()),
        )

    def serves(self, op: str) -> tuple[str, ...]:
        """The models this agent offers for ``op`` (image models for ``images``, transcription models
        for ``transcribe``)."""
        if op == OP_IMAGES:
            return self.image_models
        if op == OP_TRANSCRIBE:
            return self.transcribe_models
        return self.models


# The agents of one instance whose node is alive, as {field, raw, decoded}.
# Entries of dead nodes are removed on the way (a dead node cannot clean up
# after itself), with their load counters.  Shared by the scripts below.
_LIVE_ENTRIES = """
local function live_entries(agents_key, load_key, node_prefix)
  local entries = redis.call('HGETALL', agents_key)
  local live = {}
  for i = 1, #entries, 2 do
    local entry = cjson.decode(entries[i + 1])
    if redis.call('EXISTS', node_prefix .. entry['node']) == 1 then
      table.insert(live, {entries[i], entries[i + 1], entry})
    else
      redis.call('HDEL', agents_key, entries[i])
      redis.call('HDEL', load_key, entry['session'])
    end
  end
  return live
end
"""

# KEYS: agents, load.  ARGV: node key prefix.  Flat {agent id, entry, ...}.
_LIVE_AGENTS = _LIVE_ENTRIES + """
local out = {}
for _, e in ipairs(live_entries(KEYS[1], KEYS[2], ARGV[1])) do
  table.insert(out, e[1])
  table.insert(out, e[2])
end
return out
"""

# Choose the agent for one request and count it, atomically, so that
# concurrent requests on different nodes never overfill the same agent.
# The least busy agent relative to its declared concurrency wins, among
# those that can run the operation (ARGV[3]; an entry without capabilities
# is a version-1 agent: chat only); agents at capacity, agents on nodes
# listed in ARGV[6..], and agents on other nodes that do not read this bus
# envelope (entries of 0.1 nodes, during a rolling upgrade; ARGV[4] is the
# calling node) are skipped.  Ties are broken by where the scan starts
# (ARGV[2], rotated by the caller): scanning from the top let the first
# agent win every tie, so a replica never got a request that arrived alone.
# ARGV[5], when not empty, is a model the agent must serve for that operation
# (its 'models', 'image_models' for images, 'transcribe_models' for transcribe): replicas may serve different
# models, and the global /v1 door names one.
# KEYS: agents, load, instance.
# Returns {'ok', agent_id, entry} | {'busy'} | {'incapable'} | {'no_model'} |
# {'offline'} | {'missing'}: incapable when no connected agent can run the
# operation at all, no_model when those that can do not serve the model,
# offline when those that can are out of reach.
# A Lua function, so that ``limits`` can take the stream lease in
# the same script (``StreamLeases.pick``); ``excluded`` is a set of nodes.
PICK_AGENT_FUNCTION = _LIVE_ENTRIES + """
local function pick_agent(agents_key, load_key, instance_key, node_prefix, tie, op, here, model, excluded)
  local live = live_entries(agents_key, load_key, node_prefix)
  if #live == 0 then
    if redis.call('EXISTS', instance_key) == 0 then return {'missing'} end
    return {'offline'}
  end
  local best, best_load = nil, nil
  local capable, has_model, reachable = false, false, false
  local count = #live
  local start = tonumber(tie) % count
  for k = 0, count - 1 do
    local e = live[((start + k) % count) + 1]
    local entry = e[3]
    local caps = entry['capabilities']
    local can = false
    if type(caps) == 'table' then
      for _, c in ipairs(caps) do
        if c == op then can = true end
      end
    else
      can = op == 'chat'
    end
    if can then
      capable = true
      if model ~= '' then
        local served_field = 'models'
        if op == 'images' then served_field = 'image_models'
        elseif op == 'transcribe' then served_field = 'transcribe_models' end
        local served = entry[served_field]
        can = false
        if type(served) == 'table' then
          for _, m in ipairs(served) do
            if m == model then can = true end
          end
        end
      end
    end
    if can then
      has_model = true
      local node = entry['node']
      if not excluded[node] and (node == here or entry['bus'] ~= nil) then
        reachable = true
        local inflight = tonumber(redis.call('HGET', load_key, entry['session']) or '0')
        if inflight < entry['max_concurrency'] then
          local load = inflight / entry['max_concurrency']
          if best_load == nil or load < best_load then
            best, best_load = e, load
          end
        end
      end
    end
  end
  if best == nil then
    if not capable then return {'incapable'} end
    if not has_model then return {'no_model'} end
    if not reachable then return {'offline'} end
    return {'busy'}
  end
  redis.call('HINCRBY', load_key, best[3]['session'], 1)
  return {'ok', best[1], best[2]}
end
"""

_PICK_AGENT = PICK_AGENT_FUNCTION + """
local excluded = {}
for i = 6, #ARGV do excluded[ARGV[i]] = true end
return pick_agent(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], excluded)
"""

# Remove an agent only if the entry still belongs to the session that is
# leaving: a reconnect may already have replaced it with a newer session.
# Give a slot back.  The agent's own node may have zeroed the counter already
# (it reconciles counters of agents it sees idle, see ``reset_load``), so the
# counter never goes below zero: a negative one would let a busy agent be
# picked past its concurrency.  KEYS: load.  ARGV: session.
#: Give an agent slot back: its counter down, the field gone at zero.  A Lua
#: function, so that a request's end (``limits._RELEASE``) gives it back the same way.
RELEASE_AGENT_FUNCTION = """
local function release_agent(load, session)
  if redis.call('HINCRBY', load, session, -1) <= 0 then redis.call('HDEL', load, session) end
end
"""

_RELEASE_AGENT = RELEASE_AGENT_FUNCTION + """
release_agent(KEYS[1], ARGV[1])
return 0
"""

_REMOVE_AGENT = """
redis.call('HDEL', KEYS[3], ARGV[2])
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw and cjson.decode(raw)['session'] == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HSET', KEYS[2], 'last_seen', ARGV[3])
  return 1
end
return 0
"""


# KEYS: instance hash.  ARGV: field, value.
_SET_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class InstanceRegistry:
    def __init__(self, redis: Redis, *, heartbeat_timeout: float, base_url: str):
        self.redis = redis
        self.heartbeat_timeout = heartbeat_timeout
        self.base_url = base_url.rstrip("/")
        self._live_agents = redis.register_script(_LIVE_AGENTS)
        self._remove_agent = redis.register_script(_REMOVE_AGENT)
        self._release_agent = redis.register_script(_RELEASE_AGENT)
        self._pick_agent = redis.register_script(_PICK_AGENT)
        self._set_if_exists = redis.register_script(_SET_IF_EXISTS)
        # Where each pick starts scanning the agents: rotates, so ties go round.
        self._tie_break = itertools.count(secrets.randbelow(1 << 20))

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

    async def add_agent(self, instance_id: str, entry: AgentEntry) -> AgentEntry | None:
        """Record a connected agent; return the entry it replaced (same agent id), if any."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(keys.agents(instance_id), entry.agent_id)
            pipe.hset(keys.agents(instance_id), entry.agent_id, entry.encode())
            pipe.hset(
                keys.instance(instance_id),
                mapping={"models": orjson.dumps(list(entry.models)), "last_seen": repr(time.time())},
            )
            previous, *_ = await pipe.execute()
        if previous is None:
            return None
        old = AgentEntry.decode(entry.agent_id, previous)
        return None if old.session == entry.session else old

    async def remove_agent(self, instance_id: str, agent_id: str, session: str) -> bool:
        removed = await self._remove_agent(
            keys=[keys.agents(instance_id), keys.instance(instance_id), keys.load(instance_id)],
            args=[agent_id, session, repr(time.time())],
        )
        return bool(removed)

    async def live_agents(self, instance_id: str) -> list[AgentEntry]:
        flat = await self._live_agents(
            keys=[keys.agents(instance_id), keys.load(instance_id)], args=[keys.NODE_PREFIX]
        )
        return [AgentEntry.decode(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2)]

    async def pick_agent(self, instance_id: str, op: str = OP_CHAT, exclude_nodes: tuple[str, ...] = (),
                         *, here: str = "", model: str = "") -> tuple[str, AgentEntry | None]:
        """Reserve a slot on the least busy agent that can run ``op``: ``("ok", entry)`` or ``(reason, None)``.

        ``model``, when given, must be one the agent serves for ``op``.

        Every "ok" must be paired with :meth:`release_agent` when the request ends.
        """
        pick_keys, pick_args = self.pick_request(instance_id, op, here=here, model=model)
        return self.picked(await self._pick_agent(keys=pick_keys, args=[*pick_args, *exclude_nodes]))

    def pick_request(self, instance_id: str, op: str, *, here: str, model: str) -> tuple[list[str], list[Any]]:
        """The keys and arguments of ``pick_agent`` (the Lua function), nodes to exclude aside."""
        return ([keys.agents(instance_id), keys.load(instance_id), keys.instance(instance_id)],
                [keys.NODE_PREFIX, next(self._tie_break), op, here, model])

    @staticmethod
    def picked(result: list[Any]) -> tuple[str, AgentEntry | None]:
        """A pick script's answer as ``(verdict, entry)``."""
        verdict = text(result[0])
        if verdict != "ok":
            return verdict, None
        return verdict, AgentEntry.decode(text(result[1]), result[2])

    async def release_agent(self, instance_id: str, session: str) -> None:
        await self._release_agent(keys=[keys.load(instance_id)], args=[session])

    async def refresh_node(self, node_id: str, entries: Sequence[tuple[str, AgentEntry]] = ()) -> bool:
        """Mark this node alive for one more heartbeat timeout.

        Returns False when the liveness key was missing: Redis restarted or lost
        data, or this node stalled past its TTL.  ``entries`` (instance id,
        agent) are re-asserted in the same pipeline.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            # SET ... GET (Redis >= 6.2) tells in the same command whether the key was there.
            pipe.set(keys.node(node_id), repr(time.time()), px=keys.node_ttl_ms(self.heartbeat_timeout), get=True)
            for instance_id, entry in entries:
                pipe.hset(keys.agents(instance_id), entry.agent_id, entry.encode())
            results = await pipe.execute()
        return results[0] is not None

    async def reset_load(self, sessions: list[tuple[str, str]]) -> None:
        """Zero the load counters of idle agents ``(instance id, session)``.

        The node that routed a request gives its slot back; if that node died
        first, the counter would stay high forever.  The agent's own node knows
        the truth, so it clears counters of agents that went idle.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            for instance_id, session in sessions:
                pipe.hdel(keys.load(instance_id), session)
            await pipe.execute()

    async def node_alive(self, node_id: str) -> bool:
        return bool(await self.redis.exists(keys.node(node_id)))

    async def drop_node(self, node_id: str) -> None:
        await self.redis.delete(keys.node(node_id))

    # -- views -------------------------------------------------------------

    def _view(self, instance_id: str, record: dict[str, str], live: list[AgentEntry]) -> dict[str, Any]:
        models: list[str] = []
        image_models: list[str] = []
        transcribe_models: list[str] = []
        for entry in live:
            models.extend(m for m in entry.models if m not in models)
            image_models.extend(m for m in entry.image_models if m not in image_models)
            transcribe_models.extend(m for m in entry.transcribe_models if m not in transcribe_models)
        if not models:
            models = orjson.loads(record.get("models") or "[]")
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
        async with self.redis.pipeline(transaction=False) as pipe:
            for iid in ids:
                pipe.hgetall(keys.instance(iid))
                pipe.hgetall(keys.agents(iid))
            results = await pipe.execute()
        agent_maps = [[AgentEntry.decode(text(k), v) for k, v in raw.items()] for raw in results[1::2]]
        # One liveness read per distinct node in the batch, not per agent.
        nodes = sorted({e.node for entries in agent_maps for e in entries})
        alive = dict(zip(nodes, await self.redis.mget([keys.node(n) for n in nodes]), strict=True)) if nodes else {}
        out: list[dict[str, Any] | None] = []
        for iid, record, entries in zip(ids, results[0::2], agent_maps, strict=True):
            if not record:
                out.append(None)  # never registered, or deleted between the two reads
                continue
            live = [e for e in entries if alive.get(e.node) is not None]
            out.append(self._view(iid, {text(k): text(v) for k, v in record.items()}, live))
        return out

    async def views(self, ids: list[str]) -> dict[str, dict[str, Any] | None]:
        """Current views of ``ids`` (private ones too: the id is what shows them), two round trips."""
        return dict(zip(ids, await self._read_views(ids), strict=True)) if ids else {}

    async def list(
        self, *, status: str | None = None, limit: int = 50, cursor: int = 0, query: str = "",
        scan_limit: int = 2000,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of instances in registration order.

        The cursor is the registration sequence of the last instance examined;
        with a filter (status, ``query``), pages are filled by reading further
        batches, so a page is short only at the end of the list, or when
        ``scan_limit`` instances were examined without filling it (a search
        that matches little must not read the whole registry in one request:
        the caller follows ``next_cursor``).

        ``query`` matches, ignoring case, a substring of the name, the
        description, the id or a model name.
        """
        needle = query.casefold()
        out: list[dict[str, Any]] = []
        position, examined = cursor, 0
        # A filtered page may need many instances read: in larger batches, fewer round trips
        # (what a batch reads past the page's last match is read again by the next page).
        batch_size = limit if status is None and not needle else max(limit, FILTERED_BATCH)
        while len(out) < limit and examined < scan_limit:
            batch = cast("list[tuple[bytes, float]]", await self.redis.zrangebyscore(
                keys.INSTANCES, f"({position}", "+inf", start=0, num=min(batch_size, scan_limit - examined),
                withscores=True,
            ))
            if not batch:
                return out, None
            found = await self._read_views([text(member) for member, _ in batch])
            for (_, score), view in zip(batch, found, strict=True):
                position = int(score)
                examined += 1
                if view is None or view["visibility"] != "public":
                    continue  # private instances are not advertised; their owners know the id
                if status is not None and view["status"] != status:
                    continue
                if needle and not _matches(view, needle):
                    continue
                out.append(view)
                if len(out) == limit:
                    break
        more = await self.redis.zcount(keys.INSTANCES, f"({position}", "+inf")
        return out, (str(position) if more else None)


#: Instances read per round trip while filling a filtered page (status, search).
FILTERED_BATCH = 200


def _matches(view: dict[str, Any], needle: str) -> bool:
    """Whether a directory search (casefolded) finds this instance."""
    fields = [view["name"], view["description"], view["instance_id"], *view["models"]]
    return any(needle in str(field).casefold() for field in fields)
