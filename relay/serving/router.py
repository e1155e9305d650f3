"""Which agent answers a request, wherever it is connected.

``StreamRouter.open`` reserves a slot on the least busy agent of the
instance that can run the operation (one atomic Redis script across all
nodes, see ``store/agents.py``; the request's first pick takes its stream lease
in the same script, ``leases.StreamLeases.pick``), then opens the stream on this node's session of
that agent or, when the agent sits on another node, over the bus.  The slot
is given back when the stream closes.  Without Redis there is no routing:
access rules, limits and slot counts all live there, so a chat request fails
closed with 503 rather than being served unchecked.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError

from relay.errors import InstanceUnavailable, ModelNotFound, NotFound, OperationUnsupported
from relay.node import NodeState
from relay.serving.claims import Claim
from relay.serving.crossnode import CrossNode, NodeGone
from relay.serving.inflight import LinkLost, Stream
from relay.serving.sessions import SessionManager
from relay.store.leases import StreamLeases
from relay.store.registry import InstanceRegistry
from relay.telemetry import logs

log = logging.getLogger("relay.router")

#: Picks retried when the chosen agent vanished between pick and open.
MAX_ATTEMPTS = 3


class StreamRouter:
    def __init__(self, node: NodeState, sessions: SessionManager, registry: InstanceRegistry, bus: CrossNode,
                 leases: StreamLeases):
        self.node = node
        self.leases = leases
        self.sessions = sessions
        self.registry = registry
        self.bus = bus

    async def open(self, instance_id: str, op: str, build_body: Any, *, stream: bool, claim: Claim | None,
                   model: str = "", upload: int = 0) -> Stream:
        """Open a stream for ``op`` on an agent of the instance.

        ``build_body(models)`` makes the agent's request body once the agent
        (and so the models it serves for ``op``) is known.  ``model``, when
        given, restricts the choice to agents serving it (404 otherwise).
        ``upload`` bytes of request body are to follow the request
        (``Stream.send_upload``).  ``claim``, when the request holds one
        (``admission.leased``): its first pick takes the stream lease, and
        the agent slot goes back with the lease.
        """
        if self.node.draining:
            raise InstanceUnavailable("this relay node is shutting down; retry", code="node_draining",
                                      headers={"Retry-After": "1"})
        excluded: tuple[str, ...] = ()
        for _ in range(MAX_ATTEMPTS):
            pending = claim.take_pending() if claim is not None else None
            if pending is not None:  # the request's first pick takes its stream lease too
                verdict, entry = await self.leases.pick(pending, self.registry, instance_id, op,
                                                        here=self.node.node_id, model=model)
            else:
                verdict, entry = await self.registry.pick_agent(instance_id, op, excluded, here=self.node.node_id,
                                                                model=model)
            if entry is None:
                raise no_agent(instance_id, op, verdict, model)
            chosen = entry

            async def release(session: str = chosen.session) -> None:
                if claim is not None and claim.defer_agent_release(instance_id, session):
                    return  # given back with the request's stream lease, in one round trip
                try:
                    await self.registry.release_agent(instance_id, session)
                except (RedisError, OSError):
                    pass  # the slot counter dies with the session's entry

            try:
                body = build_body(chosen.serves(op))
                if chosen.node == self.node.node_id:
                    session = self.sessions.by_session(chosen.session)
                    if session is None or session.closed:
                        await release()  # it just left; its entry is being removed
                        continue
                    opened = await session.open_stream(op, body, stream=stream,
                                                       request_id=logs.request_id.get() or "", upload=upload)
                else:
                    opened = await self.bus.open(chosen, op, body, stream, upload)
            except NodeGone:
                await release()
                excluded += (chosen.node,)
                continue
            except LinkLost:
                await release()  # the local agent went away as we sent: pick again
                continue
            except BaseException:
                await release()
                raise
            opened.on_close = release
            return opened
        raise InstanceUnavailable(f"instance {instance_id!r} has no reachable agent right now; retry")


def no_agent(instance_id: str, op: str, verdict: str, model: str = "") -> Exception:
    """The error for a pick that found no agent, by the script's verdict."""
    if verdict == "missing":
        return NotFound(f"instance {instance_id!r} not found", param="instance_id")
    if verdict == "no_model":
        return ModelNotFound(f"instance {instance_id!r} serves no model {model!r} for {op!r}; "
                             "GET /v1/models lists what it serves", param="model")
    if verdict == "busy":
        return InstanceUnavailable(
            f"every agent of instance {instance_id!r} is at capacity; retry shortly",
            code="instance_at_capacity", headers={"Retry-After": "1"},
        )
    if verdict == "incapable":
        return OperationUnsupported(f"no connected agent of instance {instance_id!r} can run {op!r}; "
                                    "its agents must be upgraded or configured for it")
    return InstanceUnavailable(f"instance {instance_id!r} is offline: no agent is connected")
