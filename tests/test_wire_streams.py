"""One stream's life, without I/O: the state machine and both sides of the credit window."""

from __future__ import annotations

import pytest

from wire import Cancel, Data, End, ProtocolError, SendWindow, StreamError, StreamState, StreamTracker

DATA, END, ERROR, CANCEL = Data(1, b"x"), End(1), StreamError(1, 500, "e"), Cancel(1)

TRANSITIONS = [
    (StreamState.OPEN, DATA, StreamState.STREAMING),
    (StreamState.OPEN, END, StreamState.ENDED),
    (StreamState.OPEN, ERROR, StreamState.FAILED),
    (StreamState.OPEN, CANCEL, StreamState.CANCELLED),
    (StreamState.STREAMING, DATA, StreamState.STREAMING),
    (StreamState.STREAMING, END, StreamState.ENDED),
    (StreamState.STREAMING, ERROR, StreamState.FAILED),
    (StreamState.STREAMING, CANCEL, StreamState.CANCELLED),
]
_ALLOWED = {(s, type(e)) for s, e, _ in TRANSITIONS}
ILLEGAL = [
    (state, event)
    for state in StreamState
    for event in (DATA, END, ERROR, CANCEL)
    if (state, type(event)) not in _ALLOWED
]


@pytest.mark.parametrize("state, event, expected", TRANSITIONS, ids=lambda x: getattr(x, "name", type(x).__name__))
def test_legal_transitions(state, event, expected):
    tracker = StreamTracker(1, window=100, state=state)
    assert tracker.receive(event) is expected
    assert tracker.state is expected


@pytest.mark.parametrize("state, event", ILLEGAL, ids=lambda x: getattr(x, "name", type(x).__name__))
def test_illegal_transitions_raise(state, event):
    assert state.finished  # only finished streams refuse events
    tracker = StreamTracker(1, window=100, state=state)
    with pytest.raises(ProtocolError):
        tracker.receive(event)
    assert tracker.state is state


def test_finished_states():
    assert {s for s in StreamState if s.finished} == {StreamState.ENDED, StreamState.FAILED, StreamState.CANCELLED}


def test_window_overshoot_by_more_than_one_frame_is_a_protocol_error():
    tracker = StreamTracker(1, window=10)
    tracker.receive(Data(1, b"x" * 8))  # 8 of 10
    tracker.receive(Data(1, b"x" * 8))  # credit was left: may overshoot by one frame (16)
    assert tracker.unacked == 16
    with pytest.raises(ProtocolError):
        tracker.receive(Data(1, b"x"))  # no credit left at all


def test_consumed_bytes_reopen_the_window():
    tracker = StreamTracker(1, window=10)
    tracker.receive(Data(1, b"x" * 10))
    with pytest.raises(ProtocolError):
        tracker.receive(Data(1, b"x"))
    tracker = StreamTracker(1, window=10)
    tracker.receive(Data(1, b"x" * 10))
    tracker.consumed(4)
    assert tracker.unacked == 6
    tracker.receive(Data(1, b"x" * 4))
    assert tracker.unacked == 10


def test_a_single_frame_larger_than_the_window_is_allowed():
    tracker = StreamTracker(1, window=10)
    tracker.receive(Data(1, b"x" * 1000))
    assert tracker.state is StreamState.STREAMING


def test_credit_is_granted_in_batches_of_half_a_window():
    tracker = StreamTracker(1, window=100)
    tracker.receive(Data(1, b"x" * 100))
    assert [tracker.consumed(10) for _ in range(4)] == [0, 0, 0, 0]
    assert tracker.consumed(10) == 50  # 50 consumed: half a window, grant it all
    assert tracker.consumed(49) == 0
    assert tracker.consumed(1) == 50
    assert tracker.unacked == 0


def test_no_credit_is_granted_to_a_finished_stream():
    tracker = StreamTracker(1, window=100)
    tracker.receive(Data(1, b"x" * 100))
    tracker.receive(End(1))
    assert tracker.consumed(100) == 0


def test_send_window_tracks_credit():
    window = SendWindow(10)
    assert window.can_send
    window.sent(15)  # one frame may overshoot
    assert not window.can_send
    window.grant(5)
    assert not window.can_send
    window.grant(1)
    assert window.can_send and window.credit == 1


def test_the_relay_ends_a_stream_through_the_same_table():
    tracker = StreamTracker(1, window=100)
    tracker.receive(Data(1, b"x"))
    assert tracker.end_here(StreamError(1, 502, "agent lost")) is True
    assert tracker.state is StreamState.FAILED
    # Once finished, later endings change nothing (and are not errors).
    assert tracker.end_here(Cancel(1, "client left")) is False
    assert tracker.end_here(StreamError(1, 502, "again")) is False
    assert tracker.state is StreamState.FAILED


def test_cancel_of_an_open_stream():
    tracker = StreamTracker(1)
    assert tracker.end_here(Cancel(1)) is True
    assert tracker.state is StreamState.CANCELLED
    with pytest.raises(ProtocolError):
        tracker.receive(Data(1, b"late"))  # the session drops late frames before they get here
