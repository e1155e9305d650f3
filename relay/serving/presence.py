"""This node's agents as Redis knows them: recorded, refreshed, removed.

``Presence.run`` is the node's housekeeping loop: one liveness write per
heartbeat interval however many agents are connected, agents whose own
heartbeats went stale dropped, load counters of idle agents reconciled, and
every agent re-asserted after Redis lost them (a restart, a failover).  The
agent gateway calls :meth:`Presence.connected` and
:meth:`Presence.disconnected` around each agent's connection.
"""

from __future__ import annotations

import logging

import anyio
from redis.exceptions import RedisError

import wire
from relay.node import NodeState
from relay.serving.sessions import AgentSession, SessionManager
from relay.store.agents import AgentEntry
from relay.store.registry import InstanceRegistry

log = logging.getLogger("relay.presence")


class Presence:
    def __init__(self, node: NodeState, registry: InstanceRegistry, sessions: SessionManager, *,
                 heartbeat_interval: float, heartbeat_timeout: float):
        self.node = node
        self.registry = registry
        self.sessions = sessions
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.redis_ok = True
        #: Agent removals that failed (Redis trouble), retried every heartbeat.
        self.pending_removals: list[tuple[str, str, str]] = []

    def entry(self, session: AgentSession) -> AgentEntry:
        return AgentEntry(
            agent_id=session.agent_id,
            node=self.node.node_id,
            session=session.session_id,
            max_concurrency=session.max_concurrency,
            models=session.models,
            connected_at=session.connected_at,
            capabilities=session.capabilities,
            image_models=session.image_models,
            transcribe_models=session.transcribe_models,
        )

    async def connected(self, session: AgentSession) -> AgentEntry | None:
        """Record a connected agent; return the entry of its previous session elsewhere, if any."""
        try:
            return await self.registry.add_agent(session.instance_id, self.entry(session))
        except (RedisError, OSError) as exc:
            # Serve anyway: local requests still reach this agent, and the
            # next heartbeat re-asserts it once Redis answers again.
            log.warning("could not record agent %s in redis (%s)", session.agent_id, exc)
            self.redis_ok = False
            return None

    async def disconnected(self, session: AgentSession) -> None:
        key = (session.instance_id, session.agent_id, session.session_id)
        try:
            await self.registry.remove_agent(*key)
        except (RedisError, OSError) as exc:
            # This node is alive, so nothing would expire the entry: keep it
            # and retry on the next heartbeat, or the instance would stay
            # "online" with no agent.
            log.warning("could not remove agent %s from redis (%s); retrying", session.agent_id, exc)
            self.pending_removals.append(key)

    async def run(self) -> None:
        """Refresh this node's liveness and drop silent agents, forever."""
        while True:
            await self.tick()
            await anyio.sleep(self.heartbeat_interval)

    async def tick(self) -> None:
        for session in self.sessions.stale(self.heartbeat_timeout):
            log.warning("agent %s of instance %s missed heartbeats for %.0fs; dropping it",
                        session.agent_id, session.instance_id, self.heartbeat_timeout)
            await session.close(wire.CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
        try:
            while self.pending_removals:
                await self.registry.remove_agent(*self.pending_removals[-1])
                self.pending_removals.pop()
            existed = await self.registry.refresh_node(self.node.node_id)
            idle = [s for s in self.sessions.all() if s.load_dirty and not s.streams]
            if idle:
                await self.registry.reset_load([(s.instance_id, s.session_id) for s in idle])
                for s in idle:
                    s.load_dirty = False
            if not existed or not self.redis_ok:
                # Redis restarted, failed over or was unreachable: it may have
                # lost this node's agents.  Re-assert all of them in one pipeline.
                entries = [(s.instance_id, self.entry(s)) for s in self.sessions.all()]
                await self.registry.refresh_node(self.node.node_id, entries)
                if not self.redis_ok or entries:
                    log.info("presence re-asserted for %d agents", len(entries))
        except (RedisError, OSError) as exc:
            if self.redis_ok:
                log.error("redis unreachable (%s); presence will be re-asserted when it is back", exc)
            self.redis_ok = False
        else:
            self.redis_ok = True

    async def leave(self) -> None:
        """End this node's liveness: its remaining entries go offline within a second, everywhere."""
        try:
            await self.registry.drop_node(self.node.node_id)
        except (RedisError, OSError):
            pass  # the key expires on its own
