"""An instance's connected agents in Redis: their entries, the pick, their slots.

Each connected agent is one field of the instance's agents hash (an
:class:`AgentEntry`, under its agent id); the instance's load hash counts the
requests each agent session is serving.  :class:`ConnectedAgents` records and
removes entries, reads the live ones (those of a node in
:class:`~relay.store.liveness.NodeLiveness`'s set), picks the agent for a
request (a Lua script, also taken with a stream lease by
:class:`~relay.store.leases.StreamLeases`) and gives its slot back; and it
writes this node's heartbeat, re-asserting its agents.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from relay.store import keys
from relay.store.liveness import NodeLiveness
from relay.store.scripts import script
from relay.store.tokens import text
from wire import OP_CHAT, OP_IMAGES, OP_TRANSCRIBE
from wire.bus import ENVELOPE_VERSION


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


class ConnectedAgents:
    """The agents of every instance, as the nodes they are connected to record them.

    Reads of agents pass the live nodes (``liveness``) to their script, and
    read again once when they missed an agent of a node younger than that set.
    """

    def __init__(self, redis: Redis, *, heartbeat_timeout: float, liveness: NodeLiveness):
        self.redis = redis
        self.heartbeat_timeout = heartbeat_timeout
        self.liveness = liveness
        self._live_agents = redis.register_script(script("agents_live"))
        self._add_agent = redis.register_script(script("agent_add"))
        self._remove_agent = redis.register_script(script("agent_remove"))
        self._release_agent = redis.register_script(script("agent_release"))
        self._pick_agent = redis.register_script(script("agent_pick"))
        # Where each pick starts scanning the agents: rotates, so ties go round.
        self._tie_break = itertools.count(secrets.randbelow(1 << 20))

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
        """The keys and first arguments of ``pick_agent`` (the Lua function, ``scripts/pick_agent.lua``):
        tie, op, here, model."""
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

    # -- this node's heartbeat (the presence loop), and whether another's runs ---------

    async def refresh_node(self, node_id: str, entries: Sequence[tuple[str, AgentEntry]] = ()) -> bool:
        """Mark this node alive for one more heartbeat timeout.

        Returns False when its liveness had ended or was missing: Redis
        restarted or lost data, or this node stalled past its TTL.  ``entries``
        (instance id, agent) are re-asserted after it, in one pipeline.
        """
        alive = await self.liveness.beat(node_id, keys.node_ttl_ms(self.heartbeat_timeout))
        if entries:
            async with self.redis.pipeline(transaction=False) as pipe:
                for instance_id, entry in entries:
                    pipe.sadd(keys.node_instances(node_id), instance_id)
                    pipe.hset(keys.agents(instance_id), entry.agent_id, entry.encode())
                await pipe.execute()
        return alive

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
        return await self.liveness.node_alive(node_id)

    async def drop_node(self, node_id: str) -> None:
        """This node leaves: its liveness ends now (swept and forgotten within a second or two)."""
        await self.liveness.end(node_id)
