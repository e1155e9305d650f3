"""Every Redis key the relay uses, and every TTL.  Nothing else builds key names.

The layout is made for Redis Cluster as much as for one server: every key of
one instance carries the instance id as a hash tag (the braces below are
literal), so each script touches one slot, on one shard, whatever the
deployment.  Keys that are not an instance's (the directory, the indexes by
hash, node liveness) are each read or written on their own, never in a script
or transaction with another key.

Layout (prefix ``ir:``; ``<id>`` an instance id):

``ir:inst:{<id>}``          hash  name, description, token_hash, created_at, seq,
                                  last_seen, models (JSON list, last reported)
``ir:agents:{<id>}``        hash  agent id -> JSON {node, session, max_concurrency,
                                  models, connected_at}: agents of one instance,
                                  written on connect, removed on disconnect
``ir:load:{<id>}``          hash  agent session -> requests in flight (all nodes),
                                  incremented by the node that routes a request,
                                  decremented when it ends; drives least-busy picks
``ir:ckeys:{<id>}``         hash  caller key id -> JSON {name, created_at, key_hash},
                                  and ``h:<sha256>`` -> key id: the owner's API keys
                                  for callers (no secrets), found by hash in-slot
``ir:rate:instance:{<id>}`` str   GCRA "theoretical arrival time" (ms, Redis clock)
``ir:rate:caller:{<id>}:<who>``   of the instance's or one caller's rate limit
                                  (``<who>`` ``ip:<addr>`` or ``keyhash:<sha256>``);
                                  TTL = until the bucket is full
``ir:streams:instance:{<id>}``    zset stream lease id scored by expiry (ms, Redis
``ir:streams:caller:{<id>}:<who>`` clock): concurrent streams of the instance or of
                                  one caller of it; TTL = lease TTL, renewed while streaming

Not an instance's:

``ir:token:<sha256>``       str   instance id owning that agent-token hash
``ir:ckey:<sha256>``        str   "<instance id> <key id>" owning that caller-key hash
                                  (only for doors where the key names the instance;
                                  admission checks the instance's own ``ckeys``)
``ir:instances``            zset  instance id scored by registration sequence
                                  (cursor paging walks scores)
``ir:seq``                  str   registration sequence counter
``ir:nodes``                zset  relay node id scored by when its liveness ends
                                  (ms, Redis clock): refreshed every heartbeat
``ir:nodeinst:{<node>}``    set   instances a node has recorded agents of: where to
                                  clean up once that node is dead for good
``ir:sweep:{<node>}``       str   lock of the relay node sweeping a dead node's entries
``ir:rate:register:<addr>`` str   registration rate limit of one address
``ir:streams:upload:ip:<addr>`` zset uploads being read from one address
``ir:layout``               str   version of this layout (``LAYOUT``), see ``relay/store/migrate.py``

Dify-style conversations (see ``conversations/``).  The braces are literal: a
Redis Cluster hash tag, so every key of one instance's conversations hashes to
one slot and each script touches a single node.  ``<cid>``/``<mid>`` are uuid4
conversation and message ids; ``<scope>`` is the hex SHA-256 of the JSON pair
``[caller, user]`` (the user is free text: hashed, it cannot shape key names).

``ir:conv:{<id>}:c:<cid>``  hash  name, inputs (JSON), created_at, updated_at,
                                  caller, user, scope, seq (message counter), addr
                                  (anonymous: the address index it is in)
``ir:conv:{<id>}:m:<cid>``  hash  per message ``<mid>`` -> JSON {query, created_at};
                                  ``<mid>:s`` -> status; ``<mid>:r`` -> JSON {answer,
                                  updated_at, truncated?, usage?}; ``<mid>:f`` -> rating
``ir:conv:{<id>}:o:<cid>``  zset  message id scored by sequence (order of start)
``ir:conv:{<id>}:x:<mid>``  str   conversation id of a message (feedback by message id)
``ir:conv:{<id>}:s:<scope>`` zset conversation id scored by last activity (seconds):
                                  one caller's and user's conversations
``ir:conv:{<id>}:all``      zset  conversation id scored by last activity: every
                                  conversation of the instance (purge, its bound)
``ir:conv:{<id>}:b``        hash  conversation id -> bytes it stores; ``total`` -> their
                                  sum (the instance's bound); ``w:<cid>`` -> the caller
                                  whose share it counts against (``key:<key id>`` or
                                  ``addr:<addr>``), ``o:<caller>`` -> that caller's sum;
                                  a conversation's entries leave with its ``all`` entry
``ir:conv:{<id>}:a:<addr>`` zset  anonymous conversation id scored by creation: those
                                  started from one client address (``<addr>``: its
                                  hex SHA-256; the conversation's ``addr``); TTL =
                                  retention after the last one

All of them expire ``retention`` after the last activity they take part in
(every write but a streaming checkpoint refreshes what it touches, message
index entries included); index entries whose conversation has expired are
dropped lazily, when a list or a creation meets them.

Pub/sub channels: ``ir:events`` (registry events every node must see, e.g. an
instance deleted, an agent token rotated) and ``ir:inbox:<node>`` (one per node:
cross-node stream traffic, see ``relay/serving/crossnode.py``).  On Redis Cluster they are
shard channels (SPUBLISH/SSUBSCRIBE): each is carried by the shard owning its
slot alone, so node-to-node traffic grows with the shards.

Presence is derived, never a sticky flag: an instance is ``online`` when one of
its agents is registered on a node whose liveness has not ended.  A node
refreshes its one member of ``ir:nodes`` per heartbeat interval however many
agents it holds, and it drops an agent itself the moment that agent's own
heartbeats go stale.  A node that dies takes all its agents offline when its
liveness ends: every node reads the set of live nodes once a second
(``liveness.NodeLiveness``) and the scripts that read an instance's agents
skip the entries of every other node (dead, or never heard of).  Scripts cannot read the
liveness themselves: on a cluster it lives in another slot.
"""

from __future__ import annotations

PREFIX = "ir:"

INSTANCES = PREFIX + "instances"
SEQUENCE = PREFIX + "seq"
NODES = PREFIX + "nodes"
LAYOUT_KEY = PREFIX + "layout"
EVENTS_CHANNEL = PREFIX + "events"

#: The key layout this code reads and writes; older data is moved by ``relay.store.migrate``.
#: 1: keys named by instance id without a hash tag; 2: this layout.
LAYOUT = 2


def tag(instance_id: str) -> str:
    """The hash tag of an instance: its keys' slot on a Redis Cluster."""
    return "{" + instance_id + "}"


def instance(instance_id: str) -> str:
    return f"{PREFIX}inst:{tag(instance_id)}"


def token(token_hash: str) -> str:
    return f"{PREFIX}token:{token_hash}"


def agents(instance_id: str) -> str:
    return f"{PREFIX}agents:{tag(instance_id)}"


def load(instance_id: str) -> str:
    return f"{PREFIX}load:{tag(instance_id)}"


def node_instances(node_id: str) -> str:
    return f"{PREFIX}nodeinst:{{{node_id}}}"


def sweep_lock(node_id: str) -> str:
    """Held by the one relay node sweeping a dead node's leftovers."""
    return f"{PREFIX}sweep:{{{node_id}}}"


def inbox(node_id: str) -> str:
    return f"{PREFIX}inbox:{node_id}"


def node_ttl_ms(heartbeat_timeout: float) -> int:
    """A node's liveness ends exactly one heartbeat timeout past its last refresh."""
    return max(1, int(heartbeat_timeout * 1000))


def dead_node_memory_ms(heartbeat_timeout: float) -> int:
    """How long a dead node is listed before its leftovers are swept and it is forgotten.

    Long enough that a node cut off for a while is still known when it comes
    back; its entries are skipped meanwhile, and deleted by the sweep.
    """
    return max(60_000, int(10 * heartbeat_timeout * 1000))


# -- access: caller keys (see access.py) ---------------------------------------


def caller_keys(instance_id: str) -> str:
    return f"{PREFIX}ckeys:{tag(instance_id)}"


def caller_key_field(key_hash: str) -> str:
    """The field of ``caller_keys`` that finds a key id by its hash."""
    return "h:" + key_hash


def caller_key_index(key_hash: str) -> str:
    """Which instance and key id a caller key (by its hash) belongs to: ``"<instance id> <key id>"``."""
    return f"{PREFIX}ckey:{key_hash}"


# -- limits (see rates.py and leases.py) -----------------------------------------


def rate(scope: str, who: str) -> str:
    """A rate-limit bucket that belongs to no instance (``register`` per address)."""
    return f"{PREFIX}rate:{scope}:{who}"


def instance_rate(instance_id: str) -> str:
    return f"{PREFIX}rate:instance:{tag(instance_id)}"


def caller_rate(instance_id: str, who: str) -> str:
    """One caller's bucket on one instance; ``who`` is ``ip:<addr>`` or ``keyhash:<sha256>``."""
    return f"{PREFIX}rate:caller:{tag(instance_id)}:{who}"


def streams(scope: str, who: str) -> str:
    """Concurrent leases that belong to no instance (``upload`` per address)."""
    return f"{PREFIX}streams:{scope}:{who}"


def instance_streams(instance_id: str) -> str:
    return f"{PREFIX}streams:instance:{tag(instance_id)}"


def caller_streams(instance_id: str, who: str) -> str:
    """Concurrent streams of one caller (``key:<id>`` or ``ip:<addr>``) on one instance."""
    return f"{PREFIX}streams:caller:{tag(instance_id)}:{who}"


def stream_lease_ttl_ms(heartbeat_interval: float, heartbeat_timeout: float) -> int:
    """A stream lease outlives its node by at most this; renewed every heartbeat interval.

    Leases of a node that died without releasing them expire on their own, so a
    crash never leaves an instance or a caller permanently "at its limit".
    """
    return max(1000, int(max(3 * heartbeat_interval, heartbeat_timeout) * 1000))


# -- conversations (see conversations/) --------------------------------------------


def conversations_prefix(instance_id: str) -> str:
    """The start of every conversation key of an instance: its hash tag keeps them in one slot."""
    return f"{PREFIX}conv:{tag(instance_id)}:"


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


def conversation_sizes(instance_id: str) -> str:
    return f"{conversations_prefix(instance_id)}b"


def address_conversations(instance_id: str, address_digest: str) -> str:
    return f"{conversations_prefix(instance_id)}a:{address_digest}"
