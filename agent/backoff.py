"""When to reconnect, and how long to wait first.  Pure functions, no sleeping."""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff_delays(base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> Iterator[float]:
    """Exponential backoff with full jitter (AWS architecture blog, 2015).

    Attempt n waits a uniform random time in [0, min(cap, base * 2**n)]: agents
    cut off by one relay restart do not all come back in the same instant.
    Create a fresh iterator after a healthy connection to reset it.
    """
    rand = rng or random.Random()
    attempt = 0
    while True:
        yield rand.uniform(0, min(cap, base * 2**attempt))
        attempt = min(attempt + 1, 32)  # keep 2**attempt finite


class FatalAgentError(Exception):
    """Retrying cannot help (bad token, incompatible relay): stop and say why."""


def is_retryable(status: int | None = None, close_code: int | None = None) -> bool:
    """Whether a failed connection is worth retrying.

    HTTP 401/403 at the handshake and the close codes for "unsupported
    version" and "unauthorized" are final; everything else (relay down,
    restarting, overloaded, network trouble) is temporary.
    """
    return status not in (401, 403) and close_code not in (4001, 4003)
