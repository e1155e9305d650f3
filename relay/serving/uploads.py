"""The bytes of uploads a node holds in memory, and each client address's share of them.

An upload (an audio form) is held whole in memory while it is read and sent
to the agent; ``UploadBudget`` bounds what all of them together may hold
(``RELAY_UPLOAD_MEMORY_BYTES``) and what one address may, and a
``Reservation`` is one request's part, grown as a chunked body arrives and
given back when the request ends.
"""

from __future__ import annotations

import logging

from relay.errors import RateLimited, ServiceNotReady

log = logging.getLogger("relay.audio")


class UploadBudget:
    """The bytes of uploads this node holds in memory, against ``limit`` (0: no limit).

    One client address may hold at most ``share`` of them (a quarter of the
    node's, but never less than one upload of the largest size): else a
    single address could keep every other caller's uploads at 503 by
    starting as many as its stream slots allow and sending them slowly.
    Past its share an address gets ``429 too_many_uploads``; past the
    node's budget anyone gets ``503 uploads_busy``.

    Reservations are plain counts on the event loop: taken and given back
    without awaiting, so nothing can interleave.
    """

    def __init__(self, limit: int, largest: int = 0):
        self.limit = limit
        self.share = max(limit // 4, largest) if limit else 0
        self.held = 0
        #: Bytes held per client address (an address holding none is not kept).
        self.by_address: dict[str, int] = {}
        self._warned = False

    def take(self, size: int, address: str = "") -> None:
        """Reserve ``size`` more bytes for ``address``; 429 past its share, 503 past the node's budget."""
        mine = self.by_address.get(address, 0)
        if self.share and mine + size > self.share:
            raise RateLimited(f"uploads from this address already hold {mine} bytes of this relay node's memory, "
                              f"the most one address may ({self.share}); retry when one has finished",
                              code="too_many_uploads", headers={"Retry-After": "2"})
        if self.limit and self.held + size > self.limit:
            if not self._warned:  # once per busy spell, not per refusal
                self._warned = True
                log.warning("upload memory budget full (%d of %d bytes held): uploads refused with 503",
                            self.held, self.limit)
            raise ServiceNotReady("this relay node holds as many uploads as it may at once; retry shortly",
                                  code="uploads_busy", headers={"Retry-After": "2"})
        self.held += size
        self.by_address[address] = mine + size

    def give_back(self, size: int, address: str = "") -> None:
        self.held -= size
        left = self.by_address.get(address, 0) - size
        if left > 0:
            self.by_address[address] = left
        else:
            self.by_address.pop(address, None)
        if self.held <= self.limit // 2:
            self._warned = False


class Reservation:
    """One request's part of the node's ``UploadBudget``, grown as a chunked body arrives."""

    def __init__(self, budget: UploadBudget, address: str):
        self.budget = budget
        self.address = address
        self.size = 0

    def grow_to(self, size: int) -> None:
        if size > self.size:
            self.budget.take(size - self.size, self.address)
            self.size = size

    def release(self) -> None:
        self.budget.give_back(self.size, self.address)
        self.size = 0
