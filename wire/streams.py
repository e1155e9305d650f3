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
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .frames import DEFAULT_WINDOW, Cancel, Data, End, ProtocolError, StreamError


class StreamState(enum.Enum):
    OPEN = "open"  # request sent, nothing received yet
    STREAMING = "streaming"  # at least one DATA frame received
    ENDED = "ended"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({StreamState.ENDED, StreamState.FAILED, StreamState.CANCELLED})

#: What a stream's machine receives: the sender's frames, and the relay's Cancel.
StreamEvent = Data | End | StreamError | Cancel

# (state, event type) -> next state.  Anything not listed is illegal.
TRANSITIONS: dict[tuple[StreamState, type], StreamState] = {
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
    """

    id: int
    window: int = DEFAULT_WINDOW
    state: StreamState = StreamState.OPEN
    unacked: int = 0
    _consumed_since_grant: int = field(default=0, repr=False)

    @property
    def finished(self) -> bool:
        return self.state in _FINISHED

    def receive(self, event: StreamEvent) -> StreamState:
        """Apply an event and return the new state; ProtocolError if it is illegal now."""
        nxt = TRANSITIONS.get((self.state, type(event)))
        if nxt is None:
            raise ProtocolError(f"stream {self.id}: {type(event).__name__} not allowed in state {self.state.value}")
        if type(event) is Data:
            # Credit is checked before the frame is counted: the sender may send
            # while it has any credit left, so overshoot is bounded by one frame.
            if self.unacked >= self.window:
                raise ProtocolError(f"stream {self.id}: sender exceeded its flow-control window")
            self.unacked += len(event.payload)
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
