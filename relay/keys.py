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
``ir:ckeys:{id}``           hash  caller key id -> JSON {name, created_at, key_hash}:
                                  the owner's API keys for callers (no secrets)
``ir:ckey:{sha256}``        str   "{instance id} {key id}" owning that caller-key hash
``ir:rate:{scope}:{who}``   str   GCRA "theoretical arrival time" (ms, Redis clock)
                                  of one rate limit; TTL = until the bucket is full
``ir:streams:{scope}:{who}`` zset stream lease id scored by expiry (ms, Redis
                                  clock): concurrent streams of one instance or
                                  caller; TTL = lease TTL, renewed while streaming

Dify-style conversations (see ``conversations.py``).  The braces are literal: a
Redis Cluster hash tag, so every key of one instance's conversations hashes to
one slot and each script touches a single node.  ``<cid>``/``<mid>`` are uuid4
conversation and message ids; ``<scope>`` is the hex SHA-256 of the JSON pair
``[caller, user]`` (the user is free text: hashed, it cannot shape key names).

``ir:conv:{<id>}:c:<cid>``  hash  name, inputs (JSON), created_at, updated_at,
                                  caller, user, scope, seq (message counter)
``ir:conv:{<id>}:m:<cid>``  hash  per message ``<mid>`` -> JSON {query, created_at};
                                  ``<mid>:s`` -> status; ``<mid>:r`` -> JSON {answer,
                                  updated_at, truncated?, usage?}; ``<mid>:f`` -> rating
``ir:conv:{<id>}:o:<cid>``  zset  message id scored by sequence (order of start)
``ir:conv:{<id>}:x:<mid>``  str   conversation id of a message (feedback by message id)
``ir:conv:{<id>}:s:<scope>`` zset conversation id scored by last activity (seconds):
                                  one caller's and user's conversations
``ir:conv:{<id>}:all``      zset  conversation id scored by last activity: every
                                  conversation of the instance (purge)

All of them expire ``retention`` after the last activity they take part in
(every write but a streaming checkpoint refreshes what it touches, message
index entries included); index entries whose conversation has expired are
dropped lazily, when a list or a creation meets them.

Pub/sub channels: ``ir:events`` (registry events every node must see, e.g. an
instance deleted, an agent token rotated) and ``ir:inbox:{node}`` (one per node: cross-node stream
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


# -- access: caller keys (see access.py) ---------------------------------------


def caller_keys(instance_id: str) -> str:
    return f"{PREFIX}ckeys:{instance_id}"


def caller_key(key_hash: str) -> str:
    return f"{PREFIX}ckey:{key_hash}"


# -- limits (see limits.py) ------------------------------------------------------


def rate(scope: str, who: str) -> str:
    """One rate-limit bucket; ``scope`` is e.g. ``caller``, ``instance``, ``register``."""
    return f"{PREFIX}rate:{scope}:{who}"


def streams(scope: str, who: str) -> str:
    """Concurrent-stream leases of one instance or caller."""
    return f"{PREFIX}streams:{scope}:{who}"


def stream_lease_ttl_ms(heartbeat_interval: float, heartbeat_timeout: float) -> int:
    """A stream lease outlives its node by at most this; renewed every heartbeat interval.

    Leases of a node that died without releasing them expire on their own, so a
    crash never leaves an instance or a caller permanently "at its limit".
    """
    return max(1000, int(max(3 * heartbeat_interval, heartbeat_timeout) * 1000))


# -- conversations (see conversations.py) ------------------------------------------


def conversations_prefix(instance_id: str) -> str:
    """The start of every conversation key of an instance: its hash tag keeps them in one slot."""
    return f"{PREFIX}conv:{{{instance_id}}}:"


def conversation(instance_id: str, conversation_id: str) -> str:
    return f"{conversations_prefix(instance_id)}c:{conversation_id}"


def conversation_messages(instance_id: str, conversation_id: str) -> str:
    return f"{conversations_prefix(instance_id)}m:{conversation_id}"


def conversation_order(instance_id: str, conversation_id: str) -> str:
    return f"{conversations_prefix(instance_id)}o:{conversation_id}"


def message_conversation(instance_id: str, message_id: str) -> str:
    return f"{conversations_prefix(instance_id)}x:{message_id}"


def scope_conversations(instance_id: str, scope_digest: str) -> str:
    return f"{conversations_prefix(instance_id)}s:{scope_digest}"


def instance_conversations(instance_id: str) -> str:
    return f"{conversations_prefix(instance_id)}all"
