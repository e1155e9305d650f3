"""The relay's Stream and its SSE response, over a link that can break.

``relay.serving.inflight.Stream`` is the one stream machine for local and cross-node
streams; these tests drive it (and ``operations.EventStreamResponse``) through its
public interface with a link whose sends can be made to fail, and read what
the caller would get on the wire.  The rule under test: whatever breaks, the
caller gets an error event and ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

import wire
from relay.serving.inflight import LinkLost, Stream
from relay.serving.operations import EventStreamResponse

pytestmark = pytest.mark.anyio


class Link:
    """A StreamLink that records what it was asked to send; ``broken`` makes sends fail."""

    def __init__(self, broken: str = "", alive: bool = True):
        self.broken = broken
        self.is_alive = alive
        self.credits: list[int] = []
        self.cancels: list[str] = []
        self.forgotten: list[int] = []

    async def send_credit(self, stream_id: int, amount: int) -> None:
        if self.broken:
            raise LinkLost(self.broken)
        self.credits.append(amount)

    async def send_cancel(self, stream_id: int, reason: str) -> None:
        if self.broken:
            raise LinkLost(self.broken)
        self.cancels.append(reason)

    def forget(self, stream_id: int) -> None:
        self.forgotten.append(stream_id)

    async def alive(self) -> bool:
        return self.is_alive


async def respond(stream: Stream, first: list, *, client_leaves: asyncio.Event | None = None) -> bytes:
    """Run the SSE response as uvicorn would; return every byte the client received."""
    body = bytearray()
    complete = asyncio.Event()

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            body.extend(message["body"])
            if not message.get("more_body"):
                complete.set()

    async def receive() -> dict:
        await (client_leaves or asyncio.Event()).wait()
        return {"type": "http.disconnect"}

    await EventStreamResponse(stream, first, idle_timeout=5, stall_timeout=5)({"type": "http"}, receive, send)
    assert complete.is_set() or client_leaves is not None, "the response never ended"
    return bytes(body)


def events(body: bytes) -> list[str]:
    return [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]


async def test_a_credit_the_link_cannot_deliver_ends_the_stream_with_an_error_and_done():
    # Bug: a credit frame that timed out (jammed agent) or could not be
    # published (node gone) made the SSE stream just stop, with no error
    # event and no [DONE].
    link = Link()
    stream = Stream(link, 1, window=100)
    stream.feed(wire.Data(1, b'data: {"n":1}\n\n' * 4))  # 60 bytes: consuming them is due a credit
    link.broken = "agent not reading"
    first = await stream.next(1)
    body = await respond(stream, first)
    got = events(body)
    assert got[0] == '{"n":1}' and got[-1] == "[DONE]"
    error = orjson.loads(got[-2])["error"]
    assert error["code"] == "agent_disconnected" and "agent not reading" in error["message"]
    assert stream.finished and link.forgotten == [1]


async def test_credit_is_granted_in_half_windows_and_the_stream_ends_with_done():
    link = Link()
    stream = Stream(link, 1, window=40)
    for _ in range(3):
        stream.feed(wire.Data(1, b"data: {}\n\n"))  # 10 bytes each
    stream.feed(wire.End(1))
    body = await respond(stream, await stream.next(1))
    assert events(body) == ["{}", "{}", "{}", "[DONE]"]
    assert link.credits == []  # the whole answer was queued already: a finished stream gets no credit
    assert link.cancels == []  # it ended normally: nothing to cancel


async def test_an_agent_error_mid_stream_becomes_an_error_event_with_its_status():
    stream = Stream(Link(), 1, window=1000)
    stream.feed(wire.Data(1, b"data: {}\n\n"))
    stream.feed(wire.StreamError(1, 504, "model stalled", "model_timeout"))
    got = events(await respond(stream, await stream.next(1)))
    assert got[-1] == "[DONE]"
    assert orjson.loads(got[-2])["error"] == {"message": "model stalled", "type": "timeout_error", "param": None,
                                               "code": "model_timeout"}


async def test_a_relay_side_failure_is_delivered_once():
    stream = Stream(Link(), 1, window=1000)
    stream.fail(502, "agent lost", "agent_disconnected")
    stream.fail(502, "again", "agent_disconnected")  # idempotent: one error only
    items = await stream.next(1)
    assert len(items) == 1 and items[0].message == "agent lost"
    # The sender has not heard yet: what it still sends is late, not a violation...
    stream.feed(wire.Data(1, b"late"))
    stream.feed(wire.End(1))
    assert not stream._items
    # ... but once it has ended the stream itself, one frame more is.
    with pytest.raises(wire.ProtocolError):
        stream.feed(wire.Data(1, b"after its own end"))


async def test_a_stream_the_relay_failed_is_still_cancelled_at_the_sender():
    # The relay failed it (say a credit could not be sent); the sender never
    # ended it, so closing the stream must tell the sender to stop.
    link = Link()
    stream = Stream(link, 1, window=1000)
    stream.feed(wire.Data(1, b"x"))
    stream.fail(502, "lost the bus", "relay_unavailable")
    await stream.close("client disconnected")
    assert link.cancels == ["client disconnected"] and link.forgotten == [1]


async def test_a_stream_the_sender_ended_is_not_cancelled():
    link = Link()
    stream = Stream(link, 1, window=1000)
    stream.feed(wire.StreamError(1, 502, "model failed"))
    await stream.close()
    assert link.cancels == []


async def test_close_forgets_and_releases_even_when_cancelled():
    class SlowLink(Link):
        async def send_cancel(self, stream_id: int, reason: str) -> None:
            await asyncio.sleep(3600)

    link, released = SlowLink(), []
    stream = Stream(link, 1, window=1000)

    async def release() -> None:
        released.append(True)

    stream.on_close = release
    task = asyncio.create_task(stream.close())
    await asyncio.sleep(0)
    assert link.forgotten == [1]  # before the cancel is even on its way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert released == [True]


async def test_a_silent_link_that_died_fails_the_stream():
    link = Link(alive=False)
    stream = Stream(link, 1, window=1000, check_every=0.01)
    (item,) = await stream.next(5)
    assert type(item) is wire.StreamError and item.code == "agent_disconnected"


async def test_close_cancels_a_running_stream_once_even_when_the_link_is_gone():
    link = Link()
    released = []
    stream = Stream(link, 1, window=1000)

    async def release() -> None:
        released.append(True)

    stream.on_close = release
    stream.feed(wire.Data(1, b"x"))
    await stream.close("client disconnected")
    await stream.close("again")
    assert link.cancels == ["client disconnected"] and released == [True]
    assert stream.tracker.state is wire.StreamState.CANCELLED

    gone = Link(broken="node gone")
    other = Stream(gone, 2, window=1000)
    await other.close()  # no exception: nothing left to cancel
    assert gone.forgotten == [2]


async def test_the_caller_leaving_cancels_the_stream_at_the_agent():
    link = Link()
    stream = Stream(link, 1, window=1000)
    stream.feed(wire.Data(1, b"data: {}\n\n"))
    leaves = asyncio.Event()
    task = asyncio.create_task(respond(stream, await stream.next(1), client_leaves=leaves))
    await asyncio.sleep(0)
    leaves.set()
    await asyncio.wait_for(task, 5)
    assert link.cancels == ["client disconnected"]


# -- the backlog's lazy timer ------------------------------------------------------------


async def test_backlog_wait_times_out_and_a_flowing_stream_never_does():
    from relay.serving.inflight import Backlog

    backlog = Backlog()
    with pytest.raises(TimeoutError):
        await backlog.wait(0.01)
    # Items arriving within the timeout, again and again: each wait returns, none times out,
    # although an earlier wait's timer fires in the middle of later ones (and re-arms).
    loop = asyncio.get_running_loop()
    for n in range(20):
        loop.call_later(0.002, backlog.push, n)
        await backlog.wait(0.02)
        assert backlog.take() == [n]
    backlog.discard()


async def test_backlog_wait_without_timeout_outlives_an_earlier_timer():
    from relay.serving.inflight import Backlog

    backlog = Backlog()
    loop = asyncio.get_running_loop()
    loop.call_later(0.001, backlog.push, "x")
    await backlog.wait(0.05)  # arms a timer 50 ms out
    backlog.take()
    untimed = asyncio.ensure_future(backlog.wait(None))
    await asyncio.sleep(0)
    armed = backlog._deadline._timer
    assert armed is not None  # still armed from the first wait
    expired = loop.create_future()
    # Scheduled after the old timer: the loop runs timers in order, so it has fired by then.
    loop.call_at(armed.when(), expired.set_result, None)
    await expired
    assert not untimed.done()  # the old timer did not end it
    backlog.push("y")
    await untimed
    backlog.discard()


async def test_backlog_shorter_timeout_after_a_longer_one_is_honoured():
    from relay.serving.inflight import Backlog

    backlog = Backlog()
    loop = asyncio.get_running_loop()
    loop.call_later(0.001, backlog.push, "x")
    await backlog.wait(600)  # arms a timer ten minutes out
    backlog.take()
    short = asyncio.ensure_future(backlog.wait(0.01))
    done, _ = await asyncio.wait({short}, timeout=30)  # a deadline for the behaviour, not a bound
    assert done and isinstance(short.exception(), TimeoutError)
    backlog.discard()


async def test_stall_guard_cuts_only_a_send_that_waits_past_its_timeout():
    from relay.serving.operations import StallGuard

    guard = StallGuard(0.02)
    loop = asyncio.get_running_loop()

    async def send(blocked: asyncio.Future) -> str:
        guard.start()
        try:
            await blocked
            return "sent"
        except asyncio.CancelledError:
            if not guard.stalled():
                raise
            return "stalled"
        finally:
            guard.stop()

    # Sends that finish quickly, many timeouts' worth of them: none is cut.
    for _ in range(10):
        done = loop.create_future()
        loop.call_later(0.005, done.set_result, None)
        assert await send(done) == "sent"
    # One that never finishes is cut once the timeout has passed since it began.
    assert await asyncio.wait_for(send(loop.create_future()), 30) == "stalled"
    # A cancellation that is not the guard's goes through.
    task = asyncio.ensure_future(send(loop.create_future()))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    guard.discard()
