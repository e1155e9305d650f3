"""The node's parts, as one typed object built once by the composition root.

``app.create_app`` builds every part of the node and holds the long-lived
ones here; the route table binds it to every handler, which receives it as
its ``services`` argument.  So a handler's collaborators are checked by mypy
like any other argument, and there is no ``request.app.state`` to fish in.
The process around the app (the server's drain, the CLI, the demo) reads
the same object, as ``app.state.services``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from relay.node import NodeState
from relay.serving.admission import Admission
from relay.serving.crossnode import CrossNode
from relay.serving.gateway import AgentGateway
from relay.serving.overload import LoadMonitor
from relay.serving.presence import Presence
from relay.serving.router import StreamRouter
from relay.serving.sessions import SessionManager
from relay.serving.uploads import UploadBudget
from relay.settings import RelaySettings
from relay.store.access import AccessControl
from relay.store.conversations import ConversationStore
from relay.store.leases import StreamLeases
from relay.store.rates import RateLimiter
from relay.store.registry import InstanceRegistry
from relay.telemetry.metrics import RelayMetrics
from relay.web.live import StatusWatch


@dataclass(frozen=True, slots=True, kw_only=True)
class Services:
    settings: RelaySettings
    node: NodeState
    redis: Redis
    registry: InstanceRegistry
    access: AccessControl
    rate_limiter: RateLimiter
    stream_leases: StreamLeases
    conversations: ConversationStore
    admission: Admission
    router: StreamRouter
    sessions: SessionManager
    bus: CrossNode
    gateway: AgentGateway
    presence: Presence
    overload: LoadMonitor
    upload_budget: UploadBudget
    watch: StatusWatch
    metrics: RelayMetrics
    #: The OpenAPI document, built once.
    openapi: dict[str, Any]
