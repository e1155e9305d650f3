"""Every Redis key the relay uses, and every TTL.  Nothing else builds key names.

Layout (prefix ``ir:``):

``ir:inst:{id}``            hash  name, description, token_hash, created_at, seq,
                                  last_seen, models (JSON list, last reported)
``ir:token:{sha256}``       str   instance id owning that agent-token hash
``ir:instances``            zset  instance id scored by registration sequence
                                  (cursor paging walks scores)
``ir:seq``                  str   registration sequence counter
``ir:agents:{id}``          hash  agent id -> JSON {node, session, max_concurrency,
                                  models, connected_at}: agents of one instance,
                                  written on connect, removed on disconnect
``ir:load:{id}``            hash  agent session -> requests in flight (all nodes),
                                  incremented by the node that routes a request,
                                  decremented when it ends; drives least-busy picks
``ir:node:{node}``          str   node liveness, TTL = heartbeat timeout

Pub/sub channels: ``ir:events`` (registry events every node must see, e.g. an
instance deleted) and ``ir:inbox:{node}`` (one per node: cross-node stream
traffic, see ``crossnode.py``).

Presence is derived, never a sticky flag: an instance is ``online`` when one of
its agents is registered on a node whose liveness key still exists.  The node
refreshes one key per heartbeat interval however many agents it holds, and it
drops an agent itself the moment that agent's own heartbeats go stale.  A node
that dies takes all its agents offline when its key expires.
"""

from __future__ import annotations

PREFIX = "ir:"

INSTANCES = PREFIX + "instances"
SEQUENCE = PREFIX + "seq"
EVENTS_CHANNEL = PREFIX + "events"


def instance(instance_id: str) -> str:
    return f"{PREFIX}inst:{instance_id}"


def token(token_hash: str) -> str:
    return f"{PREFIX}token:{token_hash}"


def agents(instance_id: str) -> str:
    return f"{PREFIX}agents:{instance_id}"


def load(instance_id: str) -> str:
    return f"{PREFIX}load:{instance_id}"


def node(node_id: str) -> str:
    return f"{PREFIX}node:{node_id}"


NODE_PREFIX = PREFIX + "node:"


def inbox(node_id: str) -> str:
    return f"{PREFIX}inbox:{node_id}"


def node_ttl_ms(heartbeat_timeout: float) -> int:
    """A node key lives exactly one heartbeat timeout past its last refresh."""
    return max(1, int(heartbeat_timeout * 1000))
