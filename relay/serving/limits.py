"""Limits: what one request may contain, how often and how much at once.

* :func:`check_chat_request` — shape limits of one validated chat request
  (number of messages, total content size, ``max_tokens``): 422, no Redis.
* :class:`RateLimiter` — requests per minute per caller, per instance, per IP
  for registration.  GCRA (the "generic cell rate algorithm" of ATM networks,
  a token bucket kept as one timestamp) in a Lua script on the Redis clock, so
  every relay node draws from the same bucket and a request is charged to all
  its buckets or to none.  429 with ``Retry-After``.
* :class:`StreamLeases` — concurrent streams per instance and per caller.  A
  stream holds a lease (a member of a sorted set scored by its expiry) for its
  whole life; the node renews its leases every heartbeat interval in one
  pipeline and releases them when streams end.  Leases of a node that died
  expire by themselves.  429 with ``Retry-After``.
* :class:`FrameBudget` — frames and bytes per second one agent may send over
  its websocket, and pings on their own small budget (token buckets, local:
  an agent talks to one node).  Close 1008.
* :class:`HelloLimits` — how much one agent may declare in its hello (model
  names and their length): the handshake is refused with 1008 naming the cap.

A limit set to 0 is off.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError

import wire
from relay.bodies.openai import ChatRequest
from relay.errors import RateLimited, ValidationFailed
from relay.settings import RelaySettings
from relay.store import connection
from relay.store.registry import PICK_AGENT_FUNCTION, RELEASE_AGENT_FUNCTION, AgentEntry, InstanceRegistry

log = logging.getLogger("relay.limits")


# -- shape of one request --------------------------------------------------------------


def content_chars(chat: ChatRequest) -> int:
    """Characters of text the caller sent: string contents and every string inside parts."""
    total = 0
    for message in chat.messages:
        content = message.content
        if isinstance(content, str):
            total += len(content)
        elif content is not None:
            for part in content:
                total += len(part.text or "") + _strings_size(part.model_extra)
    return total


def _strings_size(value: object) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_strings_size(v) for v in value.values())
    if isinstance(value, list):
        return sum(_strings_size(v) for v in value)
    return 0


def check_chat_request(chat: ChatRequest, settings: RelaySettings) -> None:
    """Raise 422 when a valid request is larger than this relay accepts.

    A ``max_tokens`` the caller did not send (the relay's default of 2000) is
    lowered to the cap rather than refused: the caller made no choice to refuse.
    """
    if settings.max_messages and len(chat.messages) > settings.max_messages:
        raise ValidationFailed(
            f"too many messages: {len(chat.messages)} > {settings.max_messages}",
            param="messages", code="too_many_messages",
        )
    if settings.max_content_chars:
        size = content_chars(chat)
        if size > settings.max_content_chars:
            raise ValidationFailed(
                f"messages carry {size} characters of content; the limit is {settings.max_content_chars}",
                param="messages", code="content_too_large",
            )
    cap = settings.max_tokens_cap
    if cap and "max_tokens" not in chat.model_fields_set and chat.max_tokens > cap:
        chat.max_tokens = cap  # our default, not the caller's choice: lower it
    extra = chat.model_extra or {}
    # The schema promises both are positive integers, with or without a cap.
    asked = (("max_tokens", chat.max_tokens), ("max_completion_tokens", extra.get("max_completion_tokens")))
    for name, value in asked:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValidationFailed(f"{name} must be a positive integer", param=name)
        if cap and value > cap:
            raise ValidationFailed(f"{name} {value} exceeds this relay's cap of {cap}",
                                   param=name, code="max_tokens_too_large")


# -- requests per minute ---------------------------------------------------------------

# GCRA over several buckets at once.  Each key holds the bucket's "theoretical
# arrival time" (TAT, ms on the Redis clock).  ARGV: emission interval T and
# burst tolerance tau (ms) per key.  A request is allowed when now >= TAT - tau
# in every bucket; then each TAT advances by T.  Returns {0, 0} when allowed,
# else {index of the first full bucket, ms until it has room}.
#: GCRA over several buckets, as a Lua function other scripts include: charge one
#: request to every bucket of ``buckets`` (key names) whose ``periods[i]`` (emission
#: interval, ms) is above 0, with ``taus[i]`` (burst tolerance, ms), or charge none.
#: Returns 0, 0 when charged, else the index of the first spent bucket and the ms to wait.
GCRA_FUNCTION = """
local function gcra(buckets, periods, taus)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local tats = {}
  for i = 1, #buckets do
    if periods[i] > 0 then
      local tat = tonumber(redis.call('GET', buckets[i]) or now)
      if tat < now then tat = now end
      if now < tat - taus[i] then return i, math.ceil(tat - taus[i] - now) end
      tats[i] = tat + periods[i]
    end
  end
  for i = 1, #buckets do
    if tats[i] then
      redis.call('SET', buckets[i], tostring(tats[i]), 'PX', math.max(1, math.ceil(tats[i] - now)))
    end
  end
  return 0, 0
end
"""

# KEYS: the buckets; ARGV: (interval, tolerance) ms per bucket.
_GCRA = GCRA_FUNCTION + """
local periods, taus = {}, {}
for i = 1, #KEYS do periods[i], taus[i] = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i]) end
local index, wait = gcra(KEYS, periods, taus)
return {index, wait}
"""


@dataclass(frozen=True, slots=True)
class Bucket:
    """One rate limit: ``per_minute`` requests sustained, bursts of as many."""

    key: str
    per_minute: int
    what: str  # for the error message, e.g. "this caller"


def retry_after_seconds(ms: float) -> str:
    return str(max(1, math.ceil(ms / 1000)))


class RateLimiter:
    def __init__(self, redis: Redis):
        self._gcra = redis.register_script(_GCRA)

    async def hit(self, buckets: list[Bucket]) -> None:
        """Charge one request to every bucket, or raise 429 without charging any."""
        active = [b for b in buckets if b.per_minute > 0]
        if not active:
            return
        args: list[float] = []
        for bucket in active:
            period = 60_000 / bucket.per_minute
            args += [period, period * (bucket.per_minute - 1)]
        index, wait_ms = await self._gcra(keys=[b.key for b in active], args=args)
        if index:
            bucket = active[int(index) - 1]
            raise RateLimited(
                f"rate limit of {bucket.per_minute} requests per minute for {bucket.what} reached; "
                f"retry in {retry_after_seconds(wait_ms)} s",
                code="rate_limited",
                headers={"Retry-After": retry_after_seconds(wait_ms)},
            )


# -- streams at once ----------------------------------------------------------------------

# Take a lease in every set, or in none.  Expired leases (their node died
# without releasing them) are swept first.  ``lease_full`` returns 0, or the
# index of the first set that is full; ``lease_take`` adds the lease.  Lua
# functions, so that the pick can take the lease in the same script.
LEASE_FUNCTIONS = """
local function lease_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function lease_full(sets, limits, now)
  for i, set in ipairs(sets) do
    redis.call('ZREMRANGEBYSCORE', set, '-inf', now)
    if redis.call('ZCARD', set) >= tonumber(limits[i]) then return i end
  end
  return 0
end
local function lease_take(sets, id, ttl, now)
  for _, set in ipairs(sets) do
    redis.call('ZADD', set, now + ttl, id)
    redis.call('PEXPIRE', set, ttl)
  end
end
"""

# KEYS: the sets.  ARGV: lease id, TTL ms, then one limit per set.
_ACQUIRE = LEASE_FUNCTIONS + """
local now = lease_now()
local full = lease_full(KEYS, {unpack(ARGV, 3)}, now)
if full == 0 then lease_take(KEYS, ARGV[1], tonumber(ARGV[2]), now) end
return full
"""

# A request's first pick and its stream lease, in one script: the lease is
# checked first (as when it was taken on its own, before the pick), and taken
# only when an agent was picked, so a request that finds no agent holds none.
# KEYS: agents, load, instance (the pick's), then the lease's sets.  ARGV:
# tie break, op, here, model (the pick's), lease id, TTL ms, one limit per
# set, then the live nodes.  Returns the pick's answer, or {'full', index}.
_LEASE_AND_PICK = PICK_AGENT_FUNCTION + LEASE_FUNCTIONS + """
local sets = {unpack(KEYS, 4)}
local limits_to = 6 + #sets
local now = lease_now()
local full = lease_full(sets, {unpack(ARGV, 7, limits_to)}, now)
if full > 0 then return {'full', full} end
local picked = pick_agent(KEYS[1], KEYS[2], KEYS[3], node_set(limits_to + 1, #ARGV), ARGV[1], ARGV[2], ARGV[3],
                          ARGV[4], {})
if picked[1] == 'ok' then lease_take(sets, ARGV[5], tonumber(ARGV[6]), now) end
return picked
"""

# Push the expiry of live leases forward.  KEYS: sets (of one slot); ARGV: TTL
# ms, then the lease id in each set.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  local id = ARGV[i + 1]
  if redis.call('ZSCORE', KEYS[i], id) then
    redis.call('ZADD', KEYS[i], now + ttl, id)
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return 0
"""


# A request's end: its lease out of every set, and each agent slot it took
# given back.  KEYS: the lease's sets, then the agents' load hashes; ARGV:
# lease id, how many sets, then the agents' sessions.
_RELEASE = RELEASE_AGENT_FUNCTION + """
local sets = tonumber(ARGV[2])
for i = 1, sets do redis.call('ZREM', KEYS[i], ARGV[1]) end
for i = sets + 1, #KEYS do release_agent(KEYS[i], ARGV[i - sets + 2]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class Slot:
    """One concurrency limit: at most ``limit`` leases in the set ``key``."""

    key: str
    limit: int
    what: str


@dataclass(slots=True)
class Lease:
    id: str
    keys: list[str] = field(default_factory=list)


@dataclass(slots=True)
class PendingLease:
    """A lease not taken yet, and the limits it must fit (only those that are on)."""

    lease: Lease
    slots: list[Slot]


@dataclass(slots=True)
class Releases:
    """A request's stream lease and the agent slots it gives back with it, in the same round trip to Redis."""

    agents: list[tuple[str, str]] = field(default_factory=list)  # (instance id, agent session)
    flushed: bool = False
    #: The lease while nobody has taken it: the router's first pick takes it (``StreamLeases.pick``).
    pending: PendingLease | None = None


#: The request's pending releases, set by ``gate.leased`` for the request it admits.
PENDING_RELEASES: ContextVar[Releases | None] = ContextVar("pending_releases", default=None)


def take_pending_lease() -> PendingLease | None:
    """The request's lease still to take, handed to one taker only (the first pick)."""
    releases = PENDING_RELEASES.get()
    if releases is None or releases.pending is None:
        return None
    pending, releases.pending = releases.pending, None
    return pending


def defer_agent_release(instance_id: str, session: str) -> bool:
    """Queue an agent slot's release with the request's lease; False when there is none to join."""
    releases = PENDING_RELEASES.get()
    if releases is None or releases.flushed:
        return False
    releases.agents.append((instance_id, session))
    return True


class StreamLeases:
    def __init__(self, redis: Redis, *, ttl_ms: int):
        self.redis = redis
        self.ttl_ms = ttl_ms
        self.held: dict[str, Lease] = {}
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._lease_and_pick = redis.register_script(_LEASE_AND_PICK)

    def prepare(self, slots: list[Slot]) -> PendingLease:
        """A lease for ``slots``, not taken yet (no round trip): :meth:`take` or :meth:`pick` takes it."""
        active = [s for s in slots if s.limit > 0]
        return PendingLease(Lease(secrets.token_hex(8), [s.key for s in active]), active)

    async def acquire(self, slots: list[Slot]) -> Lease:
        """Take a lease in every one of ``slots`` now (429 when one is full)."""
        pending = self.prepare(slots)
        await self.take(pending)
        return pending.lease

    async def take(self, pending: PendingLease) -> None:
        lease = pending.lease
        if not pending.slots:
            return
        full = await self._acquire(keys=lease.keys, args=[lease.id, self.ttl_ms, *(s.limit for s in pending.slots)])
        self._taken(pending, int(full))

    async def pick(self, pending: PendingLease, registry: InstanceRegistry, instance_id: str, op: str, *,
                   here: str, model: str) -> tuple[str, AgentEntry | None]:
        """``registry.pick_agent`` and :meth:`take` in one script: the lease is taken if an agent was picked."""
        if not pending.slots:
            return await registry.pick_agent(instance_id, op, here=here, model=model)
        lease = pending.lease
        pick_keys, pick_args = registry.pick_request(instance_id, op, here=here, model=model)

        async def lease_and_pick() -> tuple[str, AgentEntry | None]:
            result = await self._lease_and_pick(keys=[*pick_keys, *lease.keys],
                                                args=[*pick_args, lease.id, self.ttl_ms,
                                                      *(s.limit for s in pending.slots), *registry.liveness.alive])
            if result[0] == b"full":
                self._taken(pending, int(result[1]))
            return registry.picked(result)

        # Offline: nothing taken; the agent may be on a node too new for the set of live ones.
        verdict, entry = await registry.liveness.read_again_if(lease_and_pick, lambda picked: picked[0] == "offline")
        if entry is not None:
            self.held[lease.id] = lease
        return verdict, entry

    def _taken(self, pending: PendingLease, full: int) -> None:
        """After a script took the lease (``full`` 0) or found slot ``full`` (1-based) full: 429."""
        if full:
            slot = pending.slots[full - 1]
            raise RateLimited(
                f"{slot.what} already has {slot.limit} streams running; retry when one ends",
                code="too_many_streams", headers={"Retry-After": "1"},
            )
        self.held[pending.lease.id] = pending.lease

    async def release(self, lease: Lease, agents: Sequence[tuple[str, str]] = ()) -> None:
        """Give the lease back, and the agent slots ``agents`` (load hash key, session) with it: one script."""
        held = self.held.pop(lease.id, None) is not None
        sets = lease.keys if held else []
        if not sets and not agents:
            return
        try:
            await self._release(keys=[*sets, *(key for key, _ in agents)],
                                args=[lease.id, len(sets), *(session for _, session in agents)])
        except (RedisError, OSError) as exc:
            log.debug("could not release stream lease (%s); it expires on its own", exc)

    async def renew_all(self) -> None:
        """Renew every lease this node holds: one script per slot (an instance's), all in one go."""
        by_slot: dict[str, tuple[list[str], list[str]]] = {}
        for lease in list(self.held.values()):
            for key in lease.keys:
                sets, ids = by_slot.setdefault(connection.hash_tag(key), ([], []))
                sets.append(key)
                ids.append(lease.id)
        await connection.run_scripts(self.redis, self._renew,
                                  [(sets, [self.ttl_ms, *ids]) for sets, ids in by_slot.values()])

    async def run(self, interval: float) -> None:
        """Renew leases forever (started by the composition root)."""
        while True:
            await anyio.sleep(interval)
            try:
                await self.renew_all()
            except (RedisError, OSError) as exc:
                log.debug("could not renew stream leases (%s)", exc)


# -- agent frames ---------------------------------------------------------------------------


class TokenBucket:
    """``rate`` per second sustained, up to ``burst`` at once; ``rate`` 0 = unlimited."""

    __slots__ = ("rate", "burst", "level", "stamp", "clock")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.level = burst
        self.stamp = clock()

    def take(self, amount: float) -> bool:
        if not self.rate:
            return True
        now = self.clock()
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level < amount and self.level < self.burst:
            # A single message larger than the whole burst passes only on a full
            # bucket (the frame size limit bounds it), so it cannot wedge the agent.
            return False
        self.level -= amount
        return True


#: Pings (and pongs) one agent may send per second, sustained: an agent pings once per heartbeat
#: interval, so this is room for ten times the fastest heartbeat an operator is likely to set.
#: A control frame costs the node an answer (a pong): it gets its own budget, far below the frames'.
PINGS_PER_SECOND = 10


class FrameBudget:
    """Frames and bytes per second one agent may send, and pings; bursts of twice the rate."""

    __slots__ = ("frames", "bytes", "pings", "pings_per_second")

    def __init__(self, frames_per_second: int, bytes_per_second: int, clock: Callable[[], float] = time.monotonic,
                 *, pings_per_second: float = PINGS_PER_SECOND):
        self.frames = TokenBucket(frames_per_second, 2 * frames_per_second, clock)
        self.bytes = TokenBucket(bytes_per_second, 2 * bytes_per_second, clock)
        self.pings_per_second = pings_per_second
        self.pings = TokenBucket(pings_per_second, 2 * pings_per_second, clock)

    def allow(self, nbytes: int) -> bool:
        return self.frames.take(1) and self.bytes.take(nbytes)

    def allow_ping(self) -> bool:
        return self.pings.take(1)

    @classmethod
    def from_settings(cls, settings: RelaySettings) -> FrameBudget:
        # Never below four pings per heartbeat interval, however short the operator makes it.
        pings = max(PINGS_PER_SECOND, 4 / settings.heartbeat_interval) if settings.heartbeat_interval > 0 \
            else PINGS_PER_SECOND
        return cls(settings.agent_frames_per_second, settings.agent_bytes_per_second, pings_per_second=pings)


@dataclass(frozen=True, slots=True)
class HelloLimits:
    """What one agent may declare in its hello; 0 turns a cap off (the protocol's own bounds remain).

    Its model names are kept with its session, in its Redis entry (read by
    every pick and view of its instance) and as its instance's "last
    reported" models, and listed by every model list: they are bounded
    before any of that happens.  Capabilities need no cap here: the session
    keeps only the operations this relay knows.
    """

    max_models: int = 256
    max_name_chars: int = 256

    def check(self, hello: wire.Hello) -> None:
        """ProtocolError (1008, naming the cap) if ``hello`` declares more than this relay takes."""
        names = (*hello.models, *hello.image_models, *hello.transcribe_models)
        if self.max_models and len(names) > self.max_models:
            raise wire.ProtocolError(f"hello declares {len(names)} models; this relay takes at most "
                                     f"{self.max_models}", wire.CloseCode.POLICY_VIOLATION)
        longest = max(map(len, names), default=0)
        if self.max_name_chars and longest > self.max_name_chars:
            raise wire.ProtocolError(f"hello declares a model name of {longest} characters; this relay takes "
                                     f"at most {self.max_name_chars}", wire.CloseCode.POLICY_VIOLATION)

    @classmethod
    def from_settings(cls, settings: RelaySettings) -> HelloLimits:
        return cls(settings.agent_max_models, settings.agent_max_name_chars)
