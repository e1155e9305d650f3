"""Prometheus metrics of one relay node, served at ``GET /metrics``.

Each app gets its own :class:`CollectorRegistry` (built in the composition
root), so several relays in one process never share or collide on metrics.

What costs what:

- Counters and histograms touched once per *request* (requests, rejections,
  time to first chunk, stream duration, active streams) are updated by the
  request middleware (``requests.py``) and the error handlers.
- Per-*chunk* traffic is never counted through prometheus-client on the hot
  path: sessions add to two plain integers (:class:`sessions.Traffic`), and
  cross-node forwards are plain integers on the bus; :class:`_NodeCollector`
  reads them, and the node's in-memory tables, only when Prometheus scrapes.

Exposed (all per node; sum over nodes for the cluster):

========================================  =========  ==================================
``relay_connected_agents``                gauge      agent websockets open on this node
``relay_online_instances``                gauge      instances with >= 1 agent on this node
``relay_requests_total{endpoint,status}`` counter    HTTP requests by endpoint and status
``relay_active_streams``                  gauge      chat requests being answered now
``relay_time_to_first_chunk_seconds``     histogram  request arrival -> first SSE bytes out
``relay_stream_duration_seconds``         histogram  request arrival -> ``[DONE]`` sent
``relay_relayed_chunks_total``            counter    DATA frames received from agents here
``relay_relayed_bytes_total``             counter    payload bytes of those frames
``relay_crossnode_forwards_total{dir}``   counter    streams sent to (out) / served for (in)
                                                     another node
``relay_rejections_total{reason}``        counter    requests refused, by error code
``relay_shed_requests_total{reason}``     counter    new requests refused because the node is
                                                     overloaded (``lag``, ``inflight``)
``relay_event_loop_lag_seconds``          gauge      how late the node's event loop runs
                                                     (smoothed; ``serving/overload.py``)
``relay_node_info{node_id,version}``      gauge      1, to join node ids to scrape targets
========================================  =========  ==================================

``relay_online_instances`` is computed at scrape time from the node's session
table (one ``len()``, no Redis): an instance whose agents sit on two nodes
counts on both, so ``sum()`` over nodes is exact only when each instance's
agents share a node; ``GET /api/instances?status=online`` is the exact,
cluster-wide answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from starlette.requests import Request
from starlette.responses import Response

from relay import __version__

#: LLM answers take from milliseconds (cached, tiny) to minutes (long, slow).
TTFC_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

#: The text exposition format every Prometheus version reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Handler = Callable[[Request, Exception], Awaitable[Response]]


class RelayMetrics:
    """Every metric of one node, in a registry of its own."""

    def __init__(self, node_id: str, sessions: Any, bus: Any):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("relay_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.rejections = Counter("relay_rejections", "Requests refused, by error code", ["reason"], registry=r)
        self.active_streams = Gauge("relay_active_streams", "Chat requests being answered by this node",
                                    registry=r)
        self.time_to_first_chunk = Histogram(
            "relay_time_to_first_chunk_seconds",
            "Seconds from a streaming chat request's arrival to its first bytes of answer",
            buckets=TTFC_BUCKETS, registry=r)
        self.stream_duration = Histogram(
            "relay_stream_duration_seconds",
            "Seconds from a streaming chat request's arrival to the end of its answer",
            buckets=DURATION_BUCKETS, registry=r)
        self.shed_requests = Counter(
            "relay_shed_requests", "New requests refused with 503 node_overloaded, by the limit they hit "
            "(lag: RELAY_SHED_LAG, inflight: RELAY_MAX_INFLIGHT)", ["reason"], registry=r)
        self.event_loop_lag = Gauge("relay_event_loop_lag_seconds",
                                    "How late this node's event loop runs its timers, smoothed", registry=r)
        self.redis_round_trips = Counter(
            "relay_redis_round_trips", "Requests this node sent to Redis and waited for: a command, a script, "
            "or a whole pipeline", registry=r)
        r.register(_NodeCollector(node_id, sessions, bus))
        ProcessCollector(registry=r)

    def watch_load(self, lag: Callable[[], float]) -> None:
        """Read the event loop's lag from ``lag()`` at scrape time."""
        self.event_loop_lag.set_function(lag)

    def count_shed(self, reason: str) -> None:
        self.shed_requests.labels(reason).inc()

    def count_round_trips(self, connection_class: type) -> type:
        """``connection_class`` counting each send it makes (redis-py sends a pipeline in one)."""
        counter = self.redis_round_trips

        class Counted(connection_class):
            async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
                counter.inc()
                await super().send_packed_command(command, check_health)

        Counted.__name__ = f"Counted{connection_class.__name__}"
        return Counted

    def counting(self, handler: Handler, reason: str | None = None) -> Handler:
        """Wrap an exception handler so each error it turns into a response is counted."""

        async def counted(request: Request, exc: Exception) -> Response:
            self.rejections.labels(reason or getattr(exc, "code", None) or type(exc).__name__).inc()
            return await handler(request, exc)

        return counted

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _NodeCollector:
    """Values read at scrape time from the node's own state (no Redis, no locks)."""

    def __init__(self, node_id: str, sessions: Any, bus: Any):
        self.node_id = node_id
        self.sessions = sessions
        self.bus = bus

    def describe(self) -> list:
        return []  # dynamic: describing would mean collecting

    def collect(self):
        sessions, traffic = self.sessions, self.sessions.traffic
        yield GaugeMetricFamily("relay_connected_agents", "Agent websockets open on this node",
                                value=len(sessions))
        yield GaugeMetricFamily("relay_online_instances", "Instances with at least one agent on this node",
                                value=sessions.instance_count())
        yield CounterMetricFamily("relay_relayed_chunks", "DATA frames received from agents on this node",
                                  value=traffic.frames)
        yield CounterMetricFamily("relay_relayed_bytes", "Payload bytes of DATA frames from agents on this node",
                                  value=traffic.bytes)
        forwards = CounterMetricFamily("relay_crossnode_forwards",
                                       "Streams sent to another node's agent (out) or served for another node (in)",
                                       labels=["direction"])
        forwards.add_metric(["out"], self.bus.forwarded_out)
        forwards.add_metric(["in"], self.bus.forwarded_in)
        yield forwards
        info = GaugeMetricFamily("relay_node_info", "This relay node", labels=["node_id", "version"])
        info.add_metric([self.node_id, __version__], 1)
        yield info
