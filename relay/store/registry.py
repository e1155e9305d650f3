"""Instances and their presence, stored in Redis.

``InstanceRegistry`` owns registration (ids, hashed agent tokens, paging) and
presence (which agents of an instance are connected, on which node);
``NodeLiveness`` which relay nodes are alive.  All key names come from
:mod:`relay.store.keys`.  A change to one instance's keys is a Lua script (one
slot, atomic on one server and on a cluster alike); a change that also
touches a key of its own (an index by hash, the directory) is made in the
order that keeps every reader right if it stops halfway: the instance's
record is the truth, and indexes only point at it.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import anyio
import orjson
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay.bodies.dify import AgentParameters
from relay.errors import Forbidden, NotFound, Unauthorized
from relay.store import connection, keys
from wire import OP_CHAT, OP_IMAGES, OP_TRANSCRIBE
from wire.bus import ENVELOPE_VERSION

log = logging.getLogger("relay.registry")

TOKEN_PREFIX = "ira_"

#: Instances read per round trip while filling a filtered page (status, search), and an unfiltered one.
FILTERED_BATCH = 200
LIST_BATCH = 100
#: Model names one view lists per kind, unless the registry is given another cap (the agents'
#: ``RELAY_AGENT_MAX_MODELS``).
VIEW_MAX_MODELS = 256
#: Model names one page of views may carry (``GET /api/instances``, ``/v1/models``, SwiftChat's
#: ``/api/models``): 1024 names of at most 256 characters, under a megabyte in any of them.
PAGE_MAX_NAMES = 1024


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
# ``alive`` is the set of live nodes, as the caller last read it (node
# liveness is in another slot); an entry of any other node, dead or never
# heard of, is skipped.  Skipped, not deleted: the caller's list may be up to
# a second old, and a node that was dead for a moment (Redis unreachable
# longer than its heartbeat timeout) has re-asserted its entries by then.  A
# node dead for good has them swept (``NodeLiveness.sweep``).  ``node_set``
# makes a set of ARGV[from..to].  Shared by the scripts below.
_LIVE_ENTRIES = """
local function node_set(from, to)
  local set = {}
  for i = from, to do set[ARGV[i]] = true end
  return set
end
local function live_entries(agents_key, load_key, alive)
  local entries = redis.call('HGETALL', agents_key)
  local live = {}
  for i = 1, #entries, 2 do
    local entry = cjson.decode(entries[i + 1])
    if alive[entry['node']] then table.insert(live, {entries[i], entries[i + 1], entry}) end
  end
  return live
end
"""

# KEYS: agents, load.  ARGV: the live nodes.  Flat {entries skipped, agent id, entry, ...}.
_LIVE_AGENTS = _LIVE_ENTRIES + """
local live = live_entries(KEYS[1], KEYS[2], node_set(1, #ARGV))
local out = {redis.call('HLEN', KEYS[1]) - #live}
for _, e in ipairs(live) do
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
local function pick_agent(agents_key, load_key, instance_key, alive, tie, op, here, model, excluded)
  local live = live_entries(agents_key, load_key, alive)
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

# KEYS: agents, load, instance.  ARGV: tie, op, here, model, number of live
# nodes, the live nodes, then the nodes to exclude.
_PICK_AGENT = PICK_AGENT_FUNCTION + """
local alive_to = 5 + tonumber(ARGV[5])
return pick_agent(KEYS[1], KEYS[2], KEYS[3], node_set(6, alive_to), ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                  node_set(alive_to + 1, #ARGV))
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

# KEYS: agents, instance, load.  ARGV: agent id, session, now.
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

# Record a connected agent; its models become the instance's last reported.
# KEYS: agents, instance.  ARGV: agent id, entry, models (JSON), now.
# Returns the entry it replaced, or nil.
_ADD_AGENT = """
local previous = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], 'models', ARGV[3], 'last_seen', ARGV[4])
return previous
"""

# Delete an instance's own keys; 0 when there was no such instance.
# KEYS: instance, agents, load.
_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
"""

# Drop an instance's entries of one dead node.  KEYS: agents, load.  ARGV: node.
_DROP_NODE_ENTRIES = """
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local entry = cjson.decode(entries[i + 1])
  if entry['node'] == ARGV[1] then
    redis.call('HDEL', KEYS[1], entries[i])
    redis.call('HDEL', KEYS[2], entry['session'])
  end
end
return 0
"""

# Node liveness, on the Redis clock (KEYS: the nodes zset).
# A heartbeat: ARGV node, TTL ms.  Returns 1 when the node was alive until now.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0')
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if until_ms > now then return 1 end
return 0
"""

# Every node and when its liveness ends: flat {now, node, ends at, ...}.
_NODES = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {tostring(now)}
for _, v in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')) do table.insert(out, v) end
return out
"""

# Whether one node is alive.  ARGV: node.
_NODE_ALIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0') > now then return 1 end
return 0
"""

# After a sweep: forget a node dead for longer than ARGV[2] ms (1).  If it came
# back meanwhile (2), end its liveness now: its next heartbeat then finds it
# ended and re-asserts all its agents, some of which the sweep may have deleted.
# ARGV: node, ms.
_FORGET_NODE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not until_ms then return 0 end
if tonumber(until_ms) < now - tonumber(ARGV[2]) then return redis.call('ZREM', KEYS[1], ARGV[1]) end
if tonumber(until_ms) > now then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
  return 2
end
return 0
"""

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
        self._nodes = redis.register_script(_NODES)
        self._forget = redis.register_script(_FORGET_NODE)
        self._drop_entries = redis.register_script(_DROP_NODE_ENTRIES)
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


class InstanceRegistry:
    def __init__(self, redis: Redis, *, heartbeat_timeout: float, base_url: str,
                 liveness: NodeLiveness | None = None, max_models: int = VIEW_MAX_MODELS):
        self.redis = redis
        self.heartbeat_timeout = heartbeat_timeout
        self.base_url = base_url.rstrip("/")
        #: Names a view lists per kind (the union of its agents' lists, first come): each agent is
        #: held to ``RELAY_AGENT_MAX_MODELS``, but replicas may each declare different ones.
        self.max_models = max_models or VIEW_MAX_MODELS
        self.liveness = liveness or NodeLiveness(redis, heartbeat_timeout=heartbeat_timeout)
        self._publish = connection.publisher(redis)
        self._live_agents = redis.register_script(_LIVE_AGENTS)
        self._add_agent = redis.register_script(_ADD_AGENT)
        self._delete = redis.register_script(_DELETE)
        self._beat = redis.register_script(_BEAT)
        self._node_alive = redis.register_script(_NODE_ALIVE)
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

    async def check_owner(self, instance_id: str, token: str | None) -> None:
        """Raise unless ``token`` is the agent token of ``instance_id``."""
        record = await self._record(instance_id)
        if not token:
            raise Unauthorized("owner token required: Authorization: Bearer <agent_token>")
        if not hmac.compare_digest(record["token_hash"], hash_token(token)):
            raise Forbidden("this token does not own the instance")

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

    # -- presence ----------------------------------------------------------

    async def add_agent(self, instance_id: str, entry: AgentEntry) -> AgentEntry | None:
        """Record a connected agent; return the entry it replaced (same agent id), if any."""
        # Listed under its node first, so that whatever happens next a sweep finds it.
        await self.redis.sadd(keys.node_instances(entry.node), instance_id)
        previous = await self._add_agent(
            keys=[keys.agents(instance_id), keys.instance(instance_id)],
            args=[entry.agent_id, entry.encode(), orjson.dumps(list(entry.models)), repr(time.time())])
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
        # Skipped: an entry of a node not in the set (dead, or younger than the last read of it).
        _skipped, *flat = await self.liveness.read_again_if(
            lambda: self._live_agents(keys=[keys.agents(instance_id), keys.load(instance_id)],
                                      args=list(self.liveness.alive)),
            lambda reply: bool(reply[0]))
        return [AgentEntry.decode(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2)]

    async def pick_agent(self, instance_id: str, op: str = OP_CHAT, exclude_nodes: tuple[str, ...] = (),
                         *, here: str = "", model: str = "") -> tuple[str, AgentEntry | None]:
        """Reserve a slot on the least busy agent that can run ``op``: ``("ok", entry)`` or ``(reason, None)``.

        ``model``, when given, must be one the agent serves for ``op``.

        Every "ok" must be paired with :meth:`release_agent` when the request ends.
        """
        pick_keys, pick_args = self.pick_request(instance_id, op, here=here, model=model)

        async def pick() -> tuple[str, AgentEntry | None]:
            alive = self.liveness.alive
            return self.picked(await self._pick_agent(keys=pick_keys,
                                                      args=[*pick_args, len(alive), *alive, *exclude_nodes]))

        return await self.liveness.read_again_if(pick, lambda picked: picked[0] == "offline")

    def pick_request(self, instance_id: str, op: str, *, here: str, model: str) -> tuple[list[str], list[Any]]:
        """The keys and first arguments of ``pick_agent`` (the Lua function): tie, op, here, model."""
        return ([keys.agents(instance_id), keys.load(instance_id), keys.instance(instance_id)],
                [next(self._tie_break), op, here, model])

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

        Returns False when its liveness had ended or was missing: Redis
        restarted or lost data, or this node stalled past its TTL.  ``entries``
        (instance id, agent) are re-asserted after it, in one pipeline.
        """
        alive = await self._beat(keys=[keys.NODES], args=[node_id, keys.node_ttl_ms(self.heartbeat_timeout)])
        self.liveness.saw(node_id, True)
        if entries:
            async with self.redis.pipeline(transaction=False) as pipe:
                for instance_id, entry in entries:
                    pipe.sadd(keys.node_instances(node_id), instance_id)
                    pipe.hset(keys.agents(instance_id), entry.agent_id, entry.encode())
                await pipe.execute()
        return bool(alive)

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
        return bool(await self._node_alive(keys=[keys.NODES], args=[node_id]))

    async def drop_node(self, node_id: str) -> None:
        """This node leaves: its liveness ends now (swept and forgotten within a second or two)."""
        await self.redis.zadd(keys.NODES, {node_id: 0})
        self.liveness.saw(node_id, False)

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
