"""Hostile or buggy agents: every kind of bad frame is refused, and nobody else notices.

A raw agent speaks the protocol by hand (``websockets`` + ``wire``)
and misbehaves in one way per connection, while a real agent of another
instance streams answers to several callers at the same time.  Each bad
agent must be closed with the right code, its own caller must get a clean
OpenAI-shaped error, and the other instance's streams must arrive complete
and in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

import wire
from relay.serving.sessions import AgentSession
from tests.helpers import (
    FakeUpstream,
    keep_alive,
    online,
    openai_backend,
    running_agent,
    running_relay,
    running_upstream,
    sse_lines,
    wait_until,
)

pytestmark = pytest.mark.anyio

MAX_FRAME = 64 * 1024
FRAMES_PER_SECOND = 200


class RawAgent:
    """An agent driven by hand, one frame at a time."""

    def __init__(self, ws):
        self.ws = ws
        self.welcome: wire.Welcome | None = None

    async def send(self, message: str | bytes) -> None:
        await self.ws.send(message)

    async def next_event(self, kind: type, timeout: float = 5.0) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                event = wire.decode(await self.ws.recv())
                if type(event) is kind:
                    return event

    async def close_code(self, timeout: float = 5.0) -> int | None:
        """Read until the relay closes the connection; its close code."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.ws.recv()
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None


@contextlib.asynccontextmanager
async def raw_agent(relay_url: str, token: str, *, hello: bool = True, agent_id: str = "raw",
                    hello_event: wire.Hello | None = None) -> AsyncIterator[RawAgent]:
    url = relay_url.replace("http://", "ws://") + "/api/agent/connect"
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                                  max_size=None, ping_interval=None, close_timeout=1) as ws:
        agent = RawAgent(ws)
        if not hello:
            yield agent
            return
        await ws.send(wire.encode(hello_event or wire.Hello(wire.PROTOCOL_VERSION, "raw", agent_id, ("raw-model",), 4)))
        welcome = wire.decode(await ws.recv())
        assert type(welcome) is wire.Welcome
        agent.welcome = welcome
        # The relay sends the welcome, then records the agent (gateway.py): wait for the record.
        await wait_until(lambda: online(relay_url, welcome.instance_id), what="the raw agent recorded")
        heartbeat = asyncio.create_task(keep_alive(ws))
        try:
            yield agent
        finally:
            heartbeat.cancel()




def chunk(text: str) -> bytes:
    return wire.sse_event(orjson.dumps({
        "id": "x", "object": "chat.completion.chunk", "created": 0, "model": "raw-model",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }))


# Frames that break the protocol on their own, no stream needed: (name, message, expected close code).
BAD_FRAMES: list[tuple[str, str | bytes, int]] = [
    ("binary too short", b"\x01", 1002),
    ("binary unknown kind", struct.pack("!BI", 9, 1) + b"x", 1002),
    ("binary stream id 0", struct.pack("!BI", 1, 0) + b"x", 1002),
    ("text not JSON", "{nope", 1002),
    ("JSON not an object", "[1, 2]", 1002),
    ("unknown type", '{"type": "bogus"}', 1002),
    ("missing fields", '{"type": "end"}', 1002),
    ("wrong field type", '{"type": "end", "id": "1"}', 1002),
    ("bool as id", '{"type": "end", "id": true}', 1002),
    ("id out of range", '{"type": "end", "id": 4294967296}', 1002),
    ("error with a 200 status", '{"type": "error", "id": 1, "status": 200, "message": "ok"}', 1002),
    ("relay-only frame: request", wire.encode(wire.Request(1, {"model": "m"}, True)), 1002),
    ("relay-only frame: credit", wire.encode_credit(1, 100), 1002),
    ("relay-only frame: cancel", wire.encode(wire.Cancel(1)), 1002),
    ("relay-only frame: goaway", wire.encode(wire.GoAway()), 1002),
    ("relay-only frame: welcome", wire.encode(wire.Welcome(1, "i", "n", 1.0)), 1002),
    ("second hello", wire.encode(wire.Hello(1, "raw", "raw", ("m",), 1)), 1002),
    ("data for a stream never opened", wire.encode_data(1, chunk("stolen")), 1002),
    ("end for a stream never opened", wire.encode(wire.End(7)), 1002),
    ("error for a stream never opened", wire.encode(wire.StreamError(3, 500, "x")), 1002),
    ("frame larger than RELAY_MAX_FRAME_BYTES", b"\x01\x00\x00\x00\x01" + b"x" * (MAX_FRAME + 1), 1009),
]

BAD_HANDSHAKES: list[tuple[str, str | bytes, int]] = [
    ("ping instead of hello", wire.encode(wire.Ping(1.0)), 1002),
    ("garbage instead of hello", b"\xff\xfe", 1002),
    ("protocol too new for this relay", wire.encode(wire.Hello(99, "raw", "raw", ("m",), 1, min_protocol=99)), 4001),
    ("protocol too old for this relay", wire.encode(wire.Hello(0, "raw", "raw", ("m",), 1, min_protocol=0)), 4001),
    ("hello without models", '{"type": "hello", "protocol": 1, "agent_version": "x", "agent_id": "a", '
                             '"models": [], "max_concurrency": 1}', 1002),
    ("hello with concurrency 0", '{"type": "hello", "protocol": 1, "agent_version": "x", "agent_id": "a", '
                                 '"models": ["m"], "max_concurrency": 0}', 1002),
    ("hello with a huge agent id", wire.encode(wire.Hello(1, "raw", "a" * 500, ("m",), 1)), 1002),
]


async def good_stream(client: httpx.AsyncClient, instance_id: str, n: int) -> str:
    body = {"messages": [{"role": "user", "content": f"caller{n}"}]}
    async with client.stream("POST", f"/api/chat/{instance_id}", json=body) as response:
        assert response.status_code == 200
        events = await sse_lines(response)
    assert events[-1] == "[DONE]"
    return "".join(orjson.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])


@pytest.mark.slow
async def test_hostile_agents_are_closed_and_other_streams_complete_intact(redis_url):
    upstream = FakeUpstream(chunks=100, delay=0.03, echo=True)  # ~3 s per good stream
    settings = dict(max_frame_bytes=MAX_FRAME, stream_window=MAX_FRAME // 2, agent_frames_per_second=FRAMES_PER_SECOND,
                    rate_per_caller=0, rate_per_instance=0)
    outcomes: dict[str, Any] = {}
    async with running_upstream(upstream), running_relay(redis_url, **settings) as relay, relay.client() as client:
        good_id, good_token = await relay.register("good")
        bad_id, bad_token = await relay.register("bad")
        async with running_agent(relay.url, good_token, openai_backend(upstream)):
            good = [asyncio.create_task(good_stream(client, good_id, n)) for n in range(4)]
            await wait_until(lambda: upstream.inflight == 4, what="the good streams running")

            for name, frame, _code in BAD_FRAMES:
                async with raw_agent(relay.url, bad_token) as agent:
                    await agent.send(frame)
                    outcomes[name] = await agent.close_code()
            for name, frame, _code in BAD_HANDSHAKES:
                async with raw_agent(relay.url, bad_token, hello=False) as agent:
                    await agent.send(frame)
                    outcomes[name] = await agent.close_code()

            # Flood: far more frames than the budget allows, as fast as possible.
            async with raw_agent(relay.url, bad_token) as agent:
                with contextlib.suppress(ConnectionClosed):
                    for _ in range(5 * FRAMES_PER_SECOND):
                        await agent.send(wire.encode(wire.Ping(0.0)))
                outcomes["flood of pings"] = await agent.close_code()

            outcomes.update(await callers_of_a_bad_agent_get_clean_errors(relay, client, bad_id, bad_token))
            still_running = sum(not task.done() for task in good)

            answers = await asyncio.gather(*good)

    expected = {name: code for name, _, code in BAD_FRAMES + BAD_HANDSHAKES}
    expected.update({"flood of pings": 1008, "garbage before any data": 1002, "garbage mid-stream": 1002,
                     "data after end": 1002, "late frames of a cancelled stream": "still connected"})
    assert outcomes == expected
    assert still_running > 0, "the good streams should overlap the hostile agents"
    for n, text in enumerate(answers):
        assert text == "".join(f"caller{n}-w{i} " for i in range(100))  # complete, in order, not mixed up
    assert upstream.completed == 4 and upstream.disconnects == 0


async def callers_of_a_bad_agent_get_clean_errors(relay, client, instance_id: str, token: str) -> dict[str, Any]:
    outcomes: dict[str, Any] = {}
    body = {"messages": [{"role": "user", "content": "hi"}]}
    url = f"/api/chat/{instance_id}"

    # Before any data: the caller gets an HTTP error, OpenAI-shaped.
    async with raw_agent(relay.url, token) as agent:
        caller = asyncio.create_task(client.post(url, json=body))
        await agent.next_event(wire.Request)
        await agent.send("{garbage")
        outcomes["garbage before any data"] = await agent.close_code()
        response = await caller
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "agent_disconnected"

    # Mid-stream: the caller gets an SSE error event, then [DONE].
    async with raw_agent(relay.url, token) as agent:
        async def read_stream() -> list[str]:
            async with client.stream("POST", url, json=body) as response:
                assert response.status_code == 200
                return await sse_lines(response)

        caller = asyncio.create_task(read_stream())
        request = await agent.next_event(wire.Request)
        await agent.send(wire.encode_data(request.id, chunk("partial")))
        # Frames are handled in order: "partial" is queued for the caller before the garbage closes the agent.
        await agent.send(wire.encode_data(request.id + 100, chunk("not yours")))
        outcomes["garbage mid-stream"] = await agent.close_code()
        events = await caller
        assert orjson.loads(events[0])["choices"][0]["delta"]["content"] == "partial"
        assert orjson.loads(events[1])["error"]["code"] == "agent_disconnected"
        assert events[2:] == ["[DONE]"]

    # After the end: the caller already has its whole answer; the agent is closed.
    async with raw_agent(relay.url, token) as agent:
        caller = asyncio.create_task(client.post(url, json={**body, "stream": False}))
        request = await agent.next_event(wire.Request)
        answer = orjson.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "raw-model",
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": "done"},
                                            "finish_reason": "stop"}]})
        await agent.send(wire.encode_data(request.id, answer))
        await agent.send(wire.encode(wire.End(request.id)))
        response = await caller
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "done"
        await agent.send(wire.encode_data(request.id, b"more"))
        outcomes["data after end"] = await agent.close_code()

    # Frames still in flight for a stream the relay cancelled are expected: dropped, no close.
    async with raw_agent(relay.url, token) as agent:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.settings.port)
        payload = orjson.dumps(body)
        writer.write(f"POST {url} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        request = await agent.next_event(wire.Request)
        await agent.send(wire.encode_data(request.id, chunk("first")))
        await reader.readuntil(b"data: ")
        writer.close()  # the caller hangs up mid-stream
        await agent.next_event(wire.Cancel)
        await agent.send(wire.encode_data(request.id, chunk("late")))
        await agent.send(wire.encode(wire.End(request.id)))
        await agent.send(wire.encode(wire.Ping(42.0)))
        pong = await agent.next_event(wire.Pong)
        outcomes["late frames of a cancelled stream"] = "still connected" if pong.ts == 42.0 else "closed"
    return outcomes


async def test_an_agent_cannot_answer_for_another_instance(redis_url):
    """Stream ids are per connection: a stream of instance A is invisible to an agent of B."""
    async with running_relay(redis_url, rate_per_caller=0) as relay, relay.client() as client:
        a_id, a_token = await relay.register("a")
        _, b_token = await relay.register("b")
        async with raw_agent(relay.url, a_token, agent_id="a") as agent_a, \
                raw_agent(relay.url, b_token, agent_id="b") as agent_b:
            caller = asyncio.create_task(client.post(f"/api/chat/{a_id}",
                                                     json={"messages": [{"role": "user", "content": "hi"}]}))
            request = await agent_a.next_event(wire.Request)
            await agent_b.send(wire.encode_data(request.id, chunk("forged answer")))
            assert await agent_b.close_code() == 1002
            await agent_a.send(wire.encode_data(request.id, chunk("real answer")))
            await agent_a.send(wire.encode(wire.End(request.id)))
            response = await caller
            assert response.status_code == 200
            assert "real answer" in response.text and "forged" not in response.text


async def test_window_overrun_is_a_protocol_error():
    sent: list[str | bytes] = []

    async def send(message):
        sent.append(message)

    async def close(code, reason):
        pass

    session = AgentSession(instance_id="i", hello=wire.Hello(1, "v", "a", ("m",), 1), protocol=1, send_text=send,
                           send_bytes=send, close=close, window=1000)
    stream = await session.open_stream(wire.OP_CHAT, {"model": "m"}, stream=True)
    await session.receive(wire.encode_data(stream.id, b"x" * 1000))  # the whole window, no credit yet
    with pytest.raises(wire.ProtocolError, match="window"):
        await session.receive(wire.encode_data(stream.id, b"x"))
