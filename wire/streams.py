"""One stream's life: a state machine and a credit window, with no I/O.

The relay keeps a :class:`StreamTracker` per stream, whichever transport
carries it (an agent's websocket, or the bus to the node holding the agent):
every frame of the stream and every ending the relay decides itself (the
caller left, the agent was lost) goes through :meth:`StreamTracker.receive`,
and only the transitions in the table below are legal.

Flow control is per stream and counted in payload bytes.  The relay opens a
stream with a window (``request.window``); the sender may send a DATA frame
whenever its credit is positive and subtracts the payload size afterwards
(so a chunk larger than the window cannot deadlock).  The relay grants
credit back as the HTTP client consumes the bytes, in batches of half a
window, so it buffers at most ``window + one frame`` per stream.
:class:`SendWindow` is the sender's side of the same account.

Uploads (``request.upload`` bytes after the request) run the other way, and
strictly: the relay never sends more than it was granted, nor more than
``upload`` in all, so no frame overshoots and the agent's buffer is exactly
the declared size.  The relay starts with ``min(window, upload)`` of credit;
the agent grants more as it stores what arrived (half a window at a time,
never past ``upload``).  The relay's tracker counts both its own UPLOAD
frames and the agent's CREDIT frames, in state ``UPLOADING``:

* the answer cannot start while the upload runs (DATA/END there are the
  agent's protocol violations); the agent may fail the stream (ERROR) at
  any time, which ends the upload; a cancel ends it too;
* a CREDIT is legal only in ``UPLOADING``, and only up to ``upload``: since
  the agent never grants past the declared size, the last credit it sends
  always arrives before the relay can have sent the last byte, so a credit
  after that (state ``OPEN`` or later) is a violation, not a race;
* the last byte sent moves the stream to ``OPEN``: now the agent answers.

:class:`UploadReceiver` is the agent's side of that account.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .frames import DEFAULT_WINDOW, Cancel, Credit, Data, End, ProtocolError, StreamError, Upload


class StreamState(enum.Enum):
    UPLOADING = "uploading"  # request sent, its upload still going to the agent
    OPEN = "open"  # request (and upload) sent, nothing received yet
    STREAMING = "streaming"  # at least one DATA frame received
    ENDED = "ended"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({StreamState.ENDED, StreamState.FAILED, StreamState.CANCELLED})

#: What a stream's machine receives: the sender's frames, the relay's Cancel,
#: and for an upload the relay's UPLOAD frames and the agent's CREDIT.
StreamEvent = Data | End | StreamError | Cancel | Upload | Credit

# (state, event type) -> next state.  Anything not listed is illegal.
TRANSITIONS: dict[tuple[StreamState, type], StreamState] = {
    # (UPLOADING, Upload) becomes OPEN instead once the last byte is sent.
    (StreamState.UPLOADING, Upload): StreamState.UPLOADING,
    (StreamState.UPLOADING, Credit): StreamState.UPLOADING,
    (StreamState.UPLOADING, StreamError): StreamState.FAILED,
    (StreamState.UPLOADING, Cancel): StreamState.CANCELLED,
    (StreamState.OPEN, Data): StreamState.STREAMING,
    (StreamState.OPEN, End): StreamState.ENDED,
    (StreamState.OPEN, StreamError): StreamState.FAILED,
    (StreamState.OPEN, Cancel): StreamState.CANCELLED,
    (StreamState.STREAMING, Data): StreamState.STREAMING,
    (StreamState.STREAMING, End): StreamState.ENDED,
    (StreamState.STREAMING, StreamError): StreamState.FAILED,
    (StreamState.STREAMING, Cancel): StreamState.CANCELLED,
}


@dataclass(slots=True)
class StreamTracker:
    """The receiving side of one stream: its state and its flow-control window.

    ``unacked`` counts payload bytes received that the HTTP client has not
    consumed yet.  The sender may overshoot the window by at most one frame;
    anything beyond is a protocol violation.

    ``upload`` is the request's upload size: a stream with one starts in
    ``UPLOADING``.  ``upload_sent`` counts what the relay sent of it and
    ``upload_allowed`` what it may send in all (its first window plus the
    agent's credit).
    """

    id: int
    window: int = DEFAULT_WINDOW
    state: StreamState = StreamState.OPEN
    unacked: int = 0
    upload: int = 0
    upload_sent: int = 0
    upload_allowed: int = 0
    _consumed_since_grant: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.upload > 0 and self.state is StreamState.OPEN and self.upload_sent < self.upload:
            self.state = StreamState.UPLOADING
            self.upload_allowed = max(self.upload_allowed, min(self.window, self.upload))

    @property
    def finished(self) -> bool:
        return self.state in _FINISHED

    @property
    def uploading(self) -> bool:
        return self.state is StreamState.UPLOADING

    @property
    def upload_room(self) -> int:
        """Upload bytes the relay may send now (0 when it must wait for credit, or is done)."""
        return self.upload_allowed - self.upload_sent if self.state is StreamState.UPLOADING else 0

    @property
    def upload_granted(self) -> int:
        """The agent's upload credit so far (what node B passes on to node A)."""
        return max(self.upload_allowed - min(self.window, self.upload), 0)

    def receive(self, event: StreamEvent) -> StreamState:
        """Apply an event and return the new state; ProtocolError if it is illegal now."""
        nxt = TRANSITIONS.get((self.state, type(event)))
        if nxt is None:
            if type(event) is Credit:
                raise ProtocolError(f"stream {self.id}: credit with no upload in progress")
            if type(event) in (Data, End) and self.state is StreamState.UPLOADING:
                raise ProtocolError(f"stream {self.id}: answer before its upload was complete")
            raise ProtocolError(f"stream {self.id}: {type(event).__name__} not allowed in state {self.state.value}")
        if type(event) is Data:
            # Credit is checked before the frame is counted: the sender may send
            # while it has any credit left, so overshoot is bounded by one frame.
            if self.unacked >= self.window:
                raise ProtocolError(f"stream {self.id}: sender exceeded its flow-control window")
            self.unacked += len(event.payload)
        elif type(event) is Upload:
            size = len(event.payload)
            if self.upload_sent + size > self.upload_allowed:
                raise ProtocolError(f"stream {self.id}: upload frame beyond the credit granted")
            self.upload_sent += size
            if self.upload_sent == self.upload:
                nxt = StreamState.OPEN
        elif type(event) is Credit:
            if self.upload_allowed + event.amount > self.upload:
                raise ProtocolError(f"stream {self.id}: upload credit past the declared upload size")
            self.upload_allowed += event.amount
        self.state = nxt
        return nxt

    def end_here(self, event: StreamError | Cancel) -> bool:
        """End the stream from the relay's side; False if it had already finished.

        The same table applies: a finished stream stays as it ended.
        """
        if self.finished:
            return False
        self.receive(event)
        return True

    def consumed(self, nbytes: int) -> int:
        """Record bytes delivered to the client; return credit to grant now (0 = none)."""
        self.unacked -= nbytes
        self._consumed_since_grant += nbytes
        if self._consumed_since_grant >= self.window // 2 and not self.finished:
            grant, self._consumed_since_grant = self._consumed_since_grant, 0
            return grant
        return 0


@dataclass(slots=True)
class SendWindow:
    """The sending side's view of one stream's credit."""

    credit: int = DEFAULT_WINDOW

    @property
    def can_send(self) -> bool:
        return self.credit > 0

    def sent(self, nbytes: int) -> None:
        self.credit -= nbytes

    def grant(self, amount: int) -> None:
        self.credit += amount


@dataclass(slots=True)
class UploadReceiver:
    """The agent's side of one request's upload: what it may be sent, and the credit it owes.

    ``receive`` is called with each UPLOAD frame's size as the bytes are
    stored, and returns the credit to grant now (0 = none).  The relay may
    never send more than the agent allowed, nor more than ``total``; either
    is a :class:`ProtocolError`.  Credit is granted in batches of half a
    window and never past ``total``, so the relay can always finish and the
    agent never holds more than the declared size.
    """

    id: int
    total: int
    window: int = DEFAULT_WINDOW
    received: int = 0
    allowed: int = 0
    _since_grant: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.allowed = max(self.allowed, min(self.window, self.total))

    @property
    def complete(self) -> bool:
        return self.received >= self.total

    @property
    def granted(self) -> int:
        """Credit granted so far (beyond the first window)."""
        return self.allowed - min(self.window, self.total)

    def receive(self, nbytes: int) -> int:
        if self.received + nbytes > self.total:
            raise ProtocolError(f"stream {self.id}: more upload than the {self.total} bytes declared")
        if self.received + nbytes > self.allowed:
            raise ProtocolError(f"stream {self.id}: upload beyond the credit granted")
        self.received += nbytes
        self._since_grant += nbytes
        if self._since_grant < max(self.window // 2, 1) or self.allowed >= self.total:
            return 0
        grant = min(self._since_grant, self.total - self.allowed)
        self._since_grant = 0
        self.allowed += grant
        return grant
