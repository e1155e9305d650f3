"""Limits: what one request may contain, what one agent may send, and the hand-off of a stream lease.

* :func:`check_chat_request` — shape limits of one validated chat request
  (number of messages, total content size, ``max_tokens``): 422, no Redis.
* :class:`Releases` — a request's stream lease (``relay.store.leases``) and
  the agent slots given back with it, handed from admission to the router.
* :class:`FrameBudget` — frames and bytes per second one agent may send over
  its websocket, and pings on their own small budget (token buckets, local:
  an agent talks to one node).  Close 1008.
* :class:`HelloLimits` — how much one agent may declare in its hello (model
  names and their length): the handshake is refused with 1008 naming the cap.

A limit set to 0 is off.  Rates (``relay.store.rates``) and stream leases
(``relay.store.leases``) are kept in Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

import wire
from relay.bodies.openai import ChatRequest
from relay.errors import ValidationFailed
from relay.settings import RelaySettings
from relay.store.leases import PendingLease

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


# -- streams at once ----------------------------------------------------------------------


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
