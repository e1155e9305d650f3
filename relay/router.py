"""Which agent answers a request, wherever it is connected.

``StreamRouter.open`` reserves a slot on the least busy agent of the
instance (one atomic Redis script across all nodes, see ``registry.py``),
then opens the stream on this node's session for that agent or, when the
agent sits on another node, through the cross-node bus.  The slot is given
back when the stream closes.  Without Redis there is no routing: access
rules, limits and slot counts all live there, so a chat request fails closed
with 503 (``api.redis_error_handler``) rather than serving unchecked.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError

from .crossnode import CrossNode, NodeGone
from .errors import InstanceUnavailable, NotFound
from .models import ChatRequest
from .registry import InstanceRegistry
from .sessions import SessionManager, resolve_model

log = logging.getLogger("relay.router")

#: Picks retried when the chosen agent vanished between pick and open.
MAX_ATTEMPTS = 3


class StreamRouter:
    def __init__(self, node_id: str, sessions: SessionManager, registry: InstanceRegistry, bus: CrossNode):
        self.node_id = node_id
        self.sessions = sessions
        self.registry = registry
        self.bus = bus
        self.draining = False

    async def open(self, instance_id: str, request: ChatRequest) -> Any:
        if self.draining:
            raise InstanceUnavailable("this relay node is shutting down; retry", code="node_draining",
                                      headers={"Retry-After": "1"})
        excluded: tuple[str, ...] = ()
        for _ in range(MAX_ATTEMPTS):
            verdict, entry = await self.registry.pick_agent(instance_id, excluded)
            if entry is None:
                raise self._no_agent(instance_id, verdict)

            async def release(session: str = entry.session) -> None:
                try:
                    await self.registry.release_agent(instance_id, session)
                except (RedisError, OSError):
                    pass  # the slot counter dies with the session's entry

            try:
                body = request.upstream_body(resolve_model(entry.models, request.model))
                if entry.node == self.node_id:
                    session = self.sessions.get(instance_id, entry.agent_id)
                    if session is None or session.session_id != entry.session or session.closed:
                        await release()  # it just left; its entry is being removed
                        continue
                    stream = await session.open_stream(body, stream=request.stream)
                else:
                    stream = await self.bus.open(entry, instance_id, body, request.stream)
            except NodeGone:
                await release()
                excluded += (entry.node,)
                continue
            except BaseException:
                await release()
                raise
            stream.on_close = release
            return stream
        raise InstanceUnavailable(f"instance {instance_id!r} has no reachable agent right now; retry")

    @staticmethod
    def _no_agent(instance_id: str, verdict: str) -> Exception:
        if verdict == "missing":
            return NotFound(f"instance {instance_id!r} not found", param="instance_id")
        if verdict == "busy":
            return InstanceUnavailable(
                f"every agent of instance {instance_id!r} is at capacity; retry shortly",
                code="instance_at_capacity", headers={"Retry-After": "1"},
            )
        return InstanceUnavailable(f"instance {instance_id!r} is offline: no agent is connected")
