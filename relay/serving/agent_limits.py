"""What one agent may send and declare, enforced by the gateway (``relay.serving.gateway``).

* :class:`FrameBudget` — frames and bytes per second one agent may send over
  its websocket, and pings on their own small budget (token buckets, local:
  an agent talks to one node).  Close 1008.
* :class:`HelloLimits` — how much one agent may declare in its hello (model
  names and their length): the handshake is refused with 1008 naming the cap.

A limit set to 0 is off.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import wire
from relay.settings import RelaySettings


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
