"""One stream's life, without I/O: the state machine and both sides of the credit window."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wire import (
    Cancel,
    Credit,
    Data,
    End,
    ProtocolError,
    SendWindow,
    StreamError,
    StreamState,
    StreamTracker,
    Upload,
    UploadReceiver,
)

DATA, END, ERROR, CANCEL = Data(1, b"x"), End(1), StreamError(1, 500, "e"), Cancel(1)
UPLOAD, CREDIT = Upload(1, b"u"), Credit(1, 1)
EVENTS = (DATA, END, ERROR, CANCEL, UPLOAD, CREDIT)

TRANSITIONS = [
    (StreamState.UPLOADING, UPLOAD, StreamState.UPLOADING),
    (StreamState.UPLOADING, CREDIT, StreamState.UPLOADING),
    (StreamState.UPLOADING, ERROR, StreamState.FAILED),
    (StreamState.UPLOADING, CANCEL, StreamState.CANCELLED),
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
    for event in EVENTS
    if (state, type(event)) not in _ALLOWED
]


def tracker_in(state: StreamState) -> StreamTracker:
    """A tracker in ``state``; one that is uploading has 1000 bytes to send and a window of 100."""
    if state is StreamState.UPLOADING:
        return StreamTracker(1, window=100, upload=1000)
    return StreamTracker(1, window=100, state=state)


@pytest.mark.parametrize("state, event, expected", TRANSITIONS, ids=lambda x: getattr(x, "name", type(x).__name__))
def test_legal_transitions(state, event, expected):
    tracker = tracker_in(state)
    assert tracker.receive(event) is expected
    assert tracker.state is expected


@pytest.mark.parametrize("state, event", ILLEGAL, ids=lambda x: getattr(x, "name", type(x).__name__))
def test_illegal_transitions_raise(state, event):
    # Finished streams refuse everything; a running one refuses the answer
    # while it uploads, and upload frames and credit once it no longer does.
    assert state.finished or (state is StreamState.UPLOADING and type(event) in (Data, End)) \
        or type(event) in (Upload, Credit)
    tracker = tracker_in(state)
    with pytest.raises(ProtocolError):
        tracker.receive(event)
    assert tracker.state is state


def test_the_messages_name_the_upload_rules():
    with pytest.raises(ProtocolError, match="before its upload was complete"):
        tracker_in(StreamState.UPLOADING).receive(DATA)
    with pytest.raises(ProtocolError, match="no upload in progress"):
        tracker_in(StreamState.OPEN).receive(CREDIT)
    with pytest.raises(ProtocolError, match="no upload in progress"):
        tracker_in(StreamState.STREAMING).receive(CREDIT)


def test_finished_states():
    assert {s for s in StreamState if s.finished} == {StreamState.ENDED, StreamState.FAILED, StreamState.CANCELLED}
    assert not StreamState.UPLOADING.finished


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


# -- uploads: the relay's side (the tracker) ---------------------------------------


def test_a_stream_with_an_upload_starts_uploading_with_one_window_of_credit():
    tracker = StreamTracker(1, window=100, upload=250)
    assert tracker.state is StreamState.UPLOADING and tracker.uploading
    assert (tracker.upload_allowed, tracker.upload_room, tracker.upload_granted) == (100, 100, 0)
    assert StreamTracker(1, window=100).state is StreamState.OPEN  # no upload: as before
    small = StreamTracker(1, window=100, upload=30)
    assert small.upload_room == 30  # never more than declared, even before any credit


def test_the_relay_never_sends_more_than_granted():
    tracker = StreamTracker(1, window=100, upload=250)
    tracker.receive(Upload(1, b"x" * 60))
    tracker.receive(Upload(1, b"x" * 40))  # exactly the window: no overshoot, unlike DATA
    assert tracker.upload_room == 0
    with pytest.raises(ProtocolError, match="beyond the credit"):
        tracker.receive(Upload(1, b"x"))
    assert tracker.upload_sent == 100
    tracker.receive(Credit(1, 50))
    assert (tracker.upload_room, tracker.upload_granted) == (50, 50)
    with pytest.raises(ProtocolError, match="beyond the credit"):
        tracker.receive(Upload(1, b"x" * 51))


def test_the_last_byte_opens_the_stream_for_the_answer():
    tracker = StreamTracker(1, window=100, upload=150)
    tracker.receive(Upload(1, b"x" * 100))
    with pytest.raises(ProtocolError, match="before its upload was complete"):
        tracker.receive(End(1))
    tracker.receive(Credit(1, 50))
    assert tracker.receive(Upload(1, b"x" * 50)) is StreamState.OPEN
    assert not tracker.uploading and tracker.upload_room == 0
    # The agent granted exactly what was declared: any credit now is a violation, not a race.
    with pytest.raises(ProtocolError, match="no upload in progress"):
        tracker.receive(Credit(1, 1))
    assert tracker.receive(Data(1, b'{"text": "hi"}')) is StreamState.STREAMING
    assert tracker.receive(End(1)) is StreamState.ENDED


def test_credit_past_the_declared_size_is_a_protocol_error():
    tracker = StreamTracker(1, window=100, upload=150)
    with pytest.raises(ProtocolError, match="past the declared upload size"):
        tracker.receive(Credit(1, 51))
    tracker.receive(Credit(1, 50))
    with pytest.raises(ProtocolError, match="past the declared upload size"):
        tracker.receive(Credit(1, 1))


def test_an_early_error_or_a_cancel_ends_the_upload():
    failed = StreamTracker(1, window=100, upload=1000)
    failed.receive(Upload(1, b"x" * 100))
    assert failed.receive(StreamError(1, 413, "too large")) is StreamState.FAILED
    assert failed.upload_room == 0 and not failed.uploading
    with pytest.raises(ProtocolError):
        failed.receive(Upload(1, b"x"))
    cancelled = StreamTracker(1, window=100, upload=1000)
    assert cancelled.end_here(Cancel(1, "client disconnected")) is True
    assert cancelled.state is StreamState.CANCELLED and cancelled.upload_room == 0
    lost = StreamTracker(1, window=100, upload=1000)
    assert lost.end_here(StreamError(1, 502, "agent lost")) is True
    assert lost.state is StreamState.FAILED


# -- uploads: the agent's side (the receiver) ----------------------------------------


def test_the_receiver_grants_half_windows_and_never_past_the_total():
    receiver = UploadReceiver(1, total=250, window=100)
    assert receiver.allowed == 100 and not receiver.complete
    assert receiver.receive(30) == 0
    assert receiver.receive(30) == 60  # half a window stored: all of it granted back
    assert receiver.allowed == 160
    assert receiver.receive(40) == 0
    assert receiver.receive(60) == 90  # 100 since the last grant, but only 90 remain to be allowed
    assert receiver.allowed == 250 and receiver.granted == 150
    assert receiver.receive(90) == 0
    assert receiver.complete and receiver.received == 250


def test_the_receiver_refuses_more_than_granted_or_declared():
    receiver = UploadReceiver(1, total=1000, window=100)
    receiver.receive(40)
    with pytest.raises(ProtocolError, match="beyond the credit"):
        receiver.receive(61)
    assert receiver.received == 40
    small = UploadReceiver(1, total=10, window=100)
    assert small.allowed == 10
    with pytest.raises(ProtocolError, match="10 bytes declared"):
        small.receive(11)
    small.receive(10)
    assert small.complete
    with pytest.raises(ProtocolError, match="declared"):
        small.receive(1)


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 5000), window=st.integers(1, 700), sizes=st.lists(st.integers(1, 800), min_size=1,
                                                                              max_size=20))
def test_a_relay_that_follows_the_credit_always_finishes(total, window, sizes):
    """Both sides' accounts, driven together: no deadlock, no violation, never more than a window outstanding."""
    tracker, receiver = StreamTracker(1, window=window, upload=total), UploadReceiver(1, total, window)
    frames = 0
    while tracker.uploading:
        room = tracker.upload_room
        assert room > 0, "the relay is out of credit while the agent owes none: deadlock"
        size = min(room, sizes[frames % len(sizes)], window)
        tracker.receive(Upload(1, b"x" * size))
        assert tracker.upload_sent - tracker.upload_granted <= window
        grant = receiver.receive(size)
        if grant:
            assert tracker.uploading  # every credit arrives while the relay still sends
            tracker.receive(Credit(1, grant))
        frames += 1
    assert tracker.state is StreamState.OPEN
    assert receiver.complete and receiver.received == tracker.upload_sent == total
    assert tracker.upload_allowed == receiver.allowed == total
