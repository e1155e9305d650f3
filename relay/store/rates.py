"""Requests per minute: per caller, per instance, per address for registration.

GCRA (the "generic cell rate algorithm" of ATM networks, a token bucket kept
as one timestamp) in a Lua script on the Redis clock (``scripts/gcra.lua``),
so every relay node draws from the same bucket and a request is charged to
all its buckets or to none.  429 with ``Retry-After``.  The admission script
(:meth:`relay.store.access.AccessControl.authorize_caller`) charges the same
way, with the access check.  A limit set to 0 is off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from redis.asyncio import Redis

from relay.errors import RateLimited
from relay.store.scripts import script


@dataclass(frozen=True, slots=True)
class Bucket:
    """One rate limit: ``per_minute`` requests sustained, bursts of as many."""

    key: str
    per_minute: int
    what: str  # for the error message, e.g. "this caller"


def retry_after_seconds(ms: float) -> str:
    return str(max(1, math.ceil(ms / 1000)))


def gcra_args(per_minute: int) -> tuple[float, float]:
    """A bucket's (emission interval, burst tolerance) in ms, as the scripts take them; (0, 0): off."""
    if per_minute <= 0:
        return 0.0, 0.0
    period = 60_000 / per_minute
    return period, period * (per_minute - 1)


def rate_limited(per_minute: int, what: str, wait_ms: float) -> RateLimited:
    """The 429 of a spent bucket of ``per_minute`` for ``what``, ``wait_ms`` before it has room."""
    return RateLimited(
        f"rate limit of {per_minute} requests per minute for {what} reached; "
        f"retry in {retry_after_seconds(wait_ms)} s",
        code="rate_limited",
        headers={"Retry-After": retry_after_seconds(wait_ms)},
    )


class RateLimiter:
    def __init__(self, redis: Redis):
        self._gcra = redis.register_script(script("rates_charge"))

    async def hit(self, buckets: list[Bucket]) -> None:
        """Charge one request to every bucket, or raise 429 without charging any."""
        active = [b for b in buckets if b.per_minute > 0]
        if not active:
            return
        args: list[float] = []
        for bucket in active:
            args += gcra_args(bucket.per_minute)
        index, wait_ms = await self._gcra(keys=[b.key for b in active], args=args)
        if index:
            bucket = active[int(index) - 1]
            raise rate_limited(bucket.per_minute, bucket.what, wait_ms)
