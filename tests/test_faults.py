"""Faults, reproduced for real, and what each looks like to a caller.

Agents killed (-9) or frozen (SIGSTOP: TCP stays open, heartbeats stop), a
relay node killed, Redis killed and restarted or frozen, a model that never
answers or stops mid-answer, a client that stops reading, a node asked to
stop (SIGTERM).  Each test asserts the outcome an operator needs and prints the
time to recovery it measured (``pytest -s``).

Timeouts are shortened through settings (``RELAY_*``); bounds on elapsed time
are generous liveness checks ("not a hang"), never performance targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import socket
import time

import httpx
import orjson
import pytest

from relay.embedded_redis import EmbeddedRedis
from tests.cluster import Cluster, Stopwatch, chat_body, register, status, wait_ready
from tests.helpers import (
    FakeUpstream,
    openai_backend,
    running_agent,
    running_relay,
    running_upstream,
    sse_lines,
    wait_until,
)

pytestmark = pytest.mark.anyio


async def _online(url: str, instance_id: str) -> bool:
    return (await status(url, instance_id))["status"] == "online"


async def _offline(url: str, instance_id: str) -> bool:
    return (await status(url, instance_id))["status"] == "offline"


# -- capacity ---------------------------------------------------------------------


async def test_all_agents_at_capacity_is_503_and_freed_slots_serve_again(redis_url):
    async with running_upstream(FakeUpstream(chunks=200, delay=0.05)) as upstream, \
            running_relay(redis_url) as relay:
        instance_id, token = await relay.register()
        async with running_agent(relay.url, token, openai_backend(upstream), max_concurrency=1), \
                running_agent(relay.url, token, openai_backend(upstream), max_concurrency=1), \
                relay.client() as client:
            held = []
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(2):  # one request per agent, both still streaming
                    response = await stack.enter_async_context(
                        client.stream("POST", f"/api/chat/{instance_id}", json=chat_body()))
                    assert response.status_code == 200
                    held.append(response)
                response = await client.post(f"/api/chat/{instance_id}", json=chat_body())
                assert response.status_code == 503
                assert response.json()["error"]["code"] == "instance_at_capacity"
                assert "capacity" in response.json()["error"]["message"]
                assert response.headers["retry-after"] == "1"
                assert len(upstream.requests) == 2  # the refused request never reached a model
            # Both callers hung up: their slots are free again, at once.
            await wait_until(lambda: _async(upstream.disconnects == 2), 5, what="upstream requests aborted")
            upstream.delay = 0
            response = await client.post(f"/api/chat/{instance_id}", json=chat_body(stream=False))
            assert response.status_code == 200, response.text


async def _async(value):
    return value


# -- the model goes silent ----------------------------------------------------------


class StallingUpstream(FakeUpstream):
    """Sends ``chunks`` chunks, then nothing more, holding the connection open."""

    async def _chat(self, request):
        from starlette.responses import StreamingResponse

        self.requests.append(await request.json())

        async def events():
            try:
                for i in range(self.chunks):
                    yield b"data: " + self._chunk(i, {"content": f"w{i} "}) + b"\n\n"
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.disconnects += 1
                raise

        return StreamingResponse(events(), media_type="text/event-stream")


class HangingUpstream(FakeUpstream):
    """Accepts requests and never answers; counts callers that hang up."""

    async def _chat(self, request):
        self.requests.append(await request.json())
        while not await request.is_disconnected():
            await asyncio.sleep(0.02)
        self.disconnects += 1
        from starlette.responses import Response

        return Response(status_code=499)


async def test_model_silent_before_first_chunk_is_504(redis_url):
    async with running_upstream(HangingUpstream()) as upstream, \
            running_relay(redis_url, first_chunk_timeout=0.5) as relay:
        instance_id, token = await relay.register()
        async with running_agent(relay.url, token, openai_backend(upstream)), relay.client() as client:
            for stream in (True, False):
                started = time.monotonic()
                response = await client.post(f"/api/chat/{instance_id}", json=chat_body(stream=stream))
                elapsed = time.monotonic() - started
                print(f"\n[recovery] silent model (stream={stream}): 504 after {elapsed:.2f}s")
                assert response.status_code == 504
                assert response.json()["error"]["code"] == "model_timeout"
                assert 0.4 < elapsed < 3
            # The agent was told: it aborted both upstream requests.
            await wait_until(lambda: _async(upstream.disconnects == 2), 2, what="upstream requests aborted")


async def test_model_silent_mid_stream_ends_with_error_event(redis_url):
    async with running_upstream(StallingUpstream(chunks=1)) as upstream, \
            running_relay(redis_url, idle_timeout=0.5) as relay:
        instance_id, token = await relay.register()
        async with running_agent(relay.url, token, openai_backend(upstream)), relay.client() as client:
            started = time.monotonic()
            async with client.stream("POST", f"/api/chat/{instance_id}", json=chat_body()) as response:
                assert response.status_code == 200
                events = await sse_lines(response)
            elapsed = time.monotonic() - started
            print(f"\n[recovery] model silent mid-stream: error event after {elapsed:.2f}s")
            assert 0.4 < elapsed < 3
            assert events[-1] == "[DONE]"
            assert orjson.loads(events[0])["choices"][0]["delta"]["content"] == "w0 "
            error = orjson.loads(events[-2])["error"]
            assert error["code"] == "model_timeout"
            await wait_until(lambda: _async(upstream.disconnects == 1), 2, what="upstream request aborted")


# -- a client that stops reading ------------------------------------------------------


class BigUpstream:
    """A model server streaming ``max_tokens`` chunks of about 1 KiB, as fast as the caller reads.

    Raw asyncio HTTP/1.1 rather than Starlette: uvicorn silently drops writes
    to a caller that hung up, so a Starlette fake cannot tell a finished
    stream from an abandoned one.  Here a caller that closes its connection
    makes the next write fail, and ``disconnects`` counts it.
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.disconnects = 0
        self.completed = 0
        self.url = ""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            body = orjson.loads(await reader.readexactly(length))
            self.requests.append(body)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
            filler = "x" * 1000
            for i in range(body["max_tokens"]):
                chunk = {"id": "chatcmpl-big", "object": "chat.completion.chunk", "created": 0, "model": "big",
                         "choices": [{"index": 0, "delta": {"content": f"{filler}{i} "}, "finish_reason": None}]}
                writer.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                await writer.drain()
            writer.write(b"data: [DONE]\n\n")
            await writer.drain()
            self.completed += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            self.disconnects += 1
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self):
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        try:
            yield self
        finally:
            server.close()


def _stalled_client(port: int, instance_id: str) -> socket.socket:
    """Send a streaming chat request over a raw socket, and never read the answer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # keep kernel buffering small
    sock.connect(("127.0.0.1", port))
    body = orjson.dumps(chat_body(max_tokens=32_000))
    sock.sendall(
        f"POST /api/chat/{instance_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    return sock


async def test_slow_reader_is_bounded_does_not_stall_others_and_is_cut_off(redis_url, caplog):
    window = 64 * 1024
    caplog.set_level(logging.WARNING, logger="relay.chat")
    async with BigUpstream().running() as upstream, \
            running_relay(redis_url, stream_window=window, stall_timeout=1.5) as relay:
        instance_id, token = await relay.register()
        async with running_agent(relay.url, token, openai_backend(upstream), models=["big"],
                                 max_concurrency=4) as agent_client:
            sessions = relay.app.state.sessions
            largest_frame = 0
            send_data = agent_client._send_data

            async def measured_send_data(sid, send_window, payload):
                nonlocal largest_frame
                largest_frame = max(largest_frame, len(payload))
                await send_data(sid, send_window, payload)

            agent_client._send_data = measured_send_data
            started = time.monotonic()
            sock = _stalled_client(relay.settings.port, instance_id)
            try:
                stalled = await wait_until(lambda: _async(next(iter(sessions.all()[0].streams.values()), None)),
                                           5, what="the stalled stream to open")
                peak = 0

                async def watch() -> None:
                    nonlocal peak
                    while True:
                        peak = max(peak, stalled.tracker.unacked)
                        await asyncio.sleep(0.005)

                watcher = asyncio.create_task(watch())
                # Let the stream fill every buffer between the agent and the socket.
                await asyncio.sleep(0.3)

                # Meanwhile, another stream of the same agent runs to completion.
                async with relay.client() as client:
                    async with client.stream("POST", f"/api/chat/{instance_id}",
                                             json=chat_body(max_tokens=300)) as response:
                        assert response.status_code == 200
                        events = await sse_lines(response)
                assert events[-1] == "[DONE]" and len(events) == 301
                assert not stalled.finished, "the stalled stream ended before the other one completed"

                # The stalled reader is cut off after the stall limit, with a logged reason.
                await wait_until(lambda: _async(stalled.id not in sessions.all()[0].streams), 5,
                                 what="the stalled stream to be cut off")
                elapsed = time.monotonic() - started
                print(f"\n[recovery] stalled reader cut off {elapsed:.2f}s after its request (stall limit 1.5 s)")
                watcher.cancel()
                # Relay memory for that stream: never more than the window plus one frame
                # (the agent sends what one upstream read brought as one frame).
                print(f"[recovery] stalled stream: peak bytes buffered in the relay {peak} "
                      f"(window {window}, largest frame {largest_frame})")
                assert window // 2 <= peak <= window + largest_frame
                assert 1.5 <= elapsed < 5
                assert any("read nothing for" in r.getMessage() for r in caplog.records), caplog.text
                # ... and the agent was told to stop: the model's request is aborted.
                await wait_until(lambda: _async(upstream.disconnects == 1), 5, what="upstream request aborted")
                assert upstream.completed == 1
            finally:
                sock.close()


# -- an agent dies or loses its network ---------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill -9", "network cut (SIGSTOP)"])
async def test_agent_lost_turns_offline_and_ends_its_streams(redis_url, sig):
    """SIGKILL closes the agent's TCP connection; SIGSTOP keeps it open but silences
    the agent, like a cut network: only missing heartbeats can tell."""
    async with running_relay(redis_url) as relay, Cluster(redis_url) as cluster:
        instance_id, token = await relay.register()
        agent = cluster.agent(relay.url, token, "--backend", "demo", "--demo-rate", "5")
        await agent.wait_for_line("connected to")
        await wait_until(lambda: _online(relay.url, instance_id), 5, what="online")
        async with relay.client() as client:
            async with client.stream("POST", f"/api/chat/{instance_id}", json=chat_body()) as response:
                assert response.status_code == 200
                events = []
                lines = response.aiter_lines()
                async for line in lines:
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 2:
                            break
                agent.signal(sig)
                clock = Stopwatch(f"agent {signal.Signals(sig).name}")
                async with asyncio.timeout(10):  # a hang fails here
                    async for line in lines:
                        if line.startswith("data: "):
                            events.append(line[6:])
                ended = clock.lap("in-flight stream ended with an error event")
            assert events[-1] == "[DONE]"
            error = orjson.loads(events[-2])["error"]
            assert error["code"] == "agent_disconnected"
            assert all("choices" in orjson.loads(e) for e in events[:-2])

            await wait_until(lambda: _offline(relay.url, instance_id), 5, what="instance offline")
            offline = clock.lap("status offline")
            # Heartbeat timeout 1 s: offline within it, plus a generous margin.
            assert offline < 1 + 2 and ended < 1 + 2

            started = time.monotonic()
            response = await client.post(f"/api/chat/{instance_id}", json=chat_body())
            assert response.status_code == 503 and response.json()["error"]["code"] == "instance_offline"
            assert time.monotonic() - started < 1

            if sig == signal.SIGSTOP:
                # The network comes back: the agent notices its dead connection and reconnects.
                agent.signal(signal.SIGCONT)
                clock = Stopwatch("agent resumed after a network cut")
                await wait_until(lambda: _online(relay.url, instance_id), 10, what="online again")
                clock.lap("status online again")
                response = await client.post(f"/api/chat/{instance_id}", json=chat_body(max_tokens=3))
                assert response.status_code == 200
                assert response.text.endswith("data: [DONE]\n\n")
                assert agent.count("connected to") == 2


# -- a relay node dies ---------------------------------------------------------------------


async def test_relay_node_killed_agent_moves_to_the_other_node(redis_url):
    """kill -9 of the node an agent is on: streams through it end with an error, requests
    at the other node get a quick 503 while the agent is away, then it serves from there."""
    async with Cluster(redis_url) as cluster:
        node_a, node_b = cluster.relay("node-a"), cluster.relay("node-b")
        await wait_ready(node_a, node_b)
        instance_id, token = await register(node_a.url)
        # Demo at 20 words/s: a stream lasts about two seconds.
        agent = cluster.agent(f"{node_a.url},{node_b.url}", token, "--backend", "demo", "--demo-rate", "20")
        assert node_a.url in (await agent.wait_for_line("connected to")).string
        await wait_until(lambda: _online(node_b.url, instance_id), 5, what="online at B")

        async with httpx.AsyncClient(base_url=node_b.url, timeout=10) as client:
            # A stream at B, served by the agent on A, is in flight when A dies.
            async with client.stream("POST", f"/api/chat/{instance_id}", json=chat_body()) as response:
                assert response.status_code == 200
                events = []
                lines = response.aiter_lines()
                async for line in lines:
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 2:
                            break
                # Freeze the agent first, so that it cannot come back before we
                # have seen what callers get while it is away.
                agent.signal(signal.SIGSTOP)
                node_a.kill()
                clock = Stopwatch("relay node killed (SIGKILL)")
                async with asyncio.timeout(10):
                    async for line in lines:
                        if line.startswith("data: "):
                            events.append(line[6:])
                clock.lap("stream crossing to the dead node ended with an error event")
            assert events[-1] == "[DONE]" and "error" in orjson.loads(events[-2])

            async def ask() -> httpx.Response:
                started = time.monotonic()
                response = await client.post(f"/api/chat/{instance_id}", json=chat_body(max_tokens=3))
                took = time.monotonic() - started
                if response.status_code != 200:
                    assert response.status_code == 503, response.text
                    assert took < 1.5, f"a 503 took {took:.2f}s"
                return response

            # While the agent is away, requests at B are refused at once.
            refused, slowest = 0, 0.0
            while time.monotonic() - clock.start < 1.5:
                started = time.monotonic()
                assert (await ask()).status_code == 503
                slowest = max(slowest, time.monotonic() - started)
                refused += 1
                await asyncio.sleep(0.05)
            print(f"[recovery] {refused} requests at node B refused with 503 meanwhile, slowest in {slowest:.3f}s")
            assert (await status(node_b.url, instance_id))["status"] == "offline"

            agent.signal(signal.SIGCONT)
            clock = Stopwatch("agent free to reconnect after its relay node died")
            while (await ask()).status_code != 200:
                assert time.monotonic() - clock.start < 10, "the agent never came back"
                await asyncio.sleep(0.05)
            clock.lap("first request served again at node B")
        assert agent.count("connected to " + re.escape(node_b.url)) == 1, agent.output
        view = await status(node_b.url, instance_id)
        assert view["status"] == "online" and view["agents"] == 1


# -- Redis goes away ---------------------------------------------------------------------


async def _ready(url: str) -> int:
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(url + "/readyz")).status_code


@pytest.mark.parametrize("outage", ["kill -9 and restart", "frozen (SIGSTOP)"])
async def test_redis_outage_nodes_and_agents_ride_it_out(tmp_path, outage):
    """Redis killed and restarted on the same socket, or frozen like a cut network.

    Nodes and agents keep running, ``/readyz`` says not ready while Redis is
    gone, a node whose own agent can answer still serves it, and once Redis is
    back presence is re-asserted by the nodes (the agent never reconnects) and
    requests cross nodes again.
    """
    redis = EmbeddedRedis(tmp_path / "redis", persist=True).start()
    try:
        async with Cluster(redis.url) as cluster:
            # Model timeouts far above the bounds below: streams and requests must
            # recover because the relay notices, not because a timeout expires.
            slow_model = {"RELAY_FIRST_CHUNK_TIMEOUT": "30", "RELAY_IDLE_TIMEOUT": "30"}
            node_a, node_b = cluster.relay("node-a", **slow_model), cluster.relay("node-b", **slow_model)
            await wait_ready(node_a, node_b)
            instance_id, token = await register(node_a.url)
            agent = cluster.agent(node_b.url, token, "--backend", "demo", "--demo-rate", "10")
            await agent.wait_for_line("connected to")
            await wait_until(lambda: _online(node_a.url, instance_id), 5, what="online")
            # A persistent Redis: no warning.
            assert node_a.count("persists nothing") == 0 and node_b.count("persists nothing") == 0

            async with httpx.AsyncClient(timeout=10) as client:

                async def chat(node_url: str) -> httpx.Response:
                    return await client.post(f"{node_url}/api/chat/{instance_id}",
                                             json=chat_body(stream=False, max_tokens=3))

                assert (await chat(node_a.url)).status_code == 200  # across nodes

                if outage.startswith("kill"):
                    # A stream across nodes (caller at A, agent at B, ~4 s long) is in flight.
                    async with client.stream("POST", f"{node_a.url}/api/chat/{instance_id}",
                                             json=chat_body()) as response:
                        assert response.status_code == 200
                        events = []
                        lines = response.aiter_lines()
                        async for line in lines:
                            if line.startswith("data: "):
                                events.append(line[6:])
                                if len(events) == 2:
                                    break
                        redis.kill()
                        clock = Stopwatch(f"redis {outage}")
                        async with asyncio.timeout(10):
                            async for line in lines:
                                if line.startswith("data: "):
                                    events.append(line[6:])
                        clock.lap("cross-node stream in flight ended with an error event")
                    # Its chunks may have been lost with the bus: an error, never a silent gap.
                    assert events[-1] == "[DONE]" and "error" in orjson.loads(events[-2]), events[-3:]
                else:
                    redis.process.send_signal(signal.SIGSTOP)
                    clock = Stopwatch(f"redis {outage}")
                await asyncio.gather(*(wait_until(lambda node=node: _async_ready_is(node.url, 503), 5,
                                                  what=f"{node.name} not ready") for node in (node_a, node_b)))
                clock.lap("/readyz 503 on both nodes")

                # Callers get an answer, not a hang: node A cannot route without
                # Redis (503); node B holds the agent and may serve it locally
                # (200) unless its caller checks need Redis (503).
                async def chat_while_down(node, allowed: set[int]) -> None:
                    started = time.monotonic()
                    response = await chat(node.url)
                    took = time.monotonic() - started
                    print(f"[recovery] redis down: chat at {node.name} answered {response.status_code} in {took:.2f}s")
                    assert response.status_code in allowed and took < 3, response.text

                await asyncio.gather(chat_while_down(node_a, {503}), chat_while_down(node_b, {200, 503}))

                await asyncio.sleep(1.5)  # past the heartbeat timeout: node keys expire meanwhile
                if outage.startswith("kill"):
                    redis.start()
                else:
                    redis.process.send_signal(signal.SIGCONT)
                clock = Stopwatch(f"redis back after {outage}")
                await asyncio.gather(*(wait_until(lambda node=node: _async_ready_is(node.url, 200), 8,
                                                  what=f"{node.name} ready again") for node in (node_a, node_b)))
                clock.lap("/readyz 200 on both nodes")
                await wait_until(lambda: _online(node_a.url, instance_id), 8, what="online again")
                clock.lap("instance online again (presence re-asserted)")

                async def served() -> bool:
                    async with asyncio.timeout(10):  # a request lost between nodes fails here
                        return (await chat(node_a.url)).status_code == 200

                await wait_until(served, 10, what="a request at node A served by the agent on node B")
                clock.lap("request across nodes served again")

            assert agent.count("connected to") == 1, "the agent had to reconnect:\n" + agent.output
            assert all(proc.popen.poll() is None for proc in cluster.procs)
            assert node_b.count("presence re-asserted") >= 1
    finally:
        if redis.process is not None:
            redis.process.send_signal(signal.SIGCONT)  # a frozen server cannot act on SIGTERM
        redis.stop()


async def _async_ready_is(url: str, code: int) -> bool:
    try:
        return await _ready(url) == code
    except httpx.HTTPError:
        return False


# -- a node asked to stop -------------------------------------------------------------------


async def test_sigterm_drains_streams_then_sends_agents_elsewhere(redis_url):
    async with Cluster(redis_url) as cluster:
        node_a, node_b = cluster.relay("node-a"), cluster.relay("node-b")
        await wait_ready(node_a, node_b)
        instance_id, token = await register(node_a.url)
        # Demo at 25 words/s: a stream lasts about two seconds.
        agent = cluster.agent(f"{node_a.url},{node_b.url}", token, "--backend", "demo", "--demo-rate", "25")
        assert node_a.url in (await agent.wait_for_line("connected to")).string
        await wait_until(lambda: _online(node_b.url, instance_id), 5, what="online")

        async with httpx.AsyncClient(base_url=node_a.url, timeout=10) as client, \
                httpx.AsyncClient(base_url=node_a.url, timeout=10) as probe:
            # A kept-alive connection: the draining node accepts no new ones.
            assert (await probe.get("/readyz")).status_code == 200
            async with client.stream("POST", f"/api/chat/{instance_id}", json=chat_body()) as response:
                assert response.status_code == 200
                events = []
                lines = response.aiter_lines()
                async for line in lines:
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 2:
                            break
                node_a.signal(signal.SIGTERM)
                clock = Stopwatch("SIGTERM to a node with a stream in flight")

                # During the drain: not ready, and new chat requests are turned away.
                await wait_until(lambda: _probe_is(probe, 503), 2, what="/readyz 503 while draining")
                clock.lap("/readyz 503 (draining)")
                refused = await probe.post(f"/api/chat/{instance_id}", json=chat_body())
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "node_draining"

                async with asyncio.timeout(10):
                    async for line in lines:
                        if line.startswith("data: "):
                            events.append(line[6:])
                clock.lap("in-flight stream completed")
        assert events[-1] == "[DONE]"
        chunks = [orjson.loads(e) for e in events[:-1]]
        assert all("choices" in c for c in chunks), events[-3:]
        assert "You said: hi" in "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)

        assert await node_a.wait_exit(10) == 0, node_a.output
        clock.lap("node exited")
        assert node_a.count("draining") >= 1
        # Told to go away, the agent went to the other URL it was given.
        await agent.wait_for_line("connected to " + re.escape(node_b.url), 5)
        await wait_until(lambda: _online(node_b.url, instance_id), 5, what="online via node B")
        clock.lap("agent online again through node B")
        async with httpx.AsyncClient(base_url=node_b.url, timeout=10) as client:
            response = await client.post(f"/api/chat/{instance_id}", json=chat_body(max_tokens=3))
            assert response.status_code == 200


async def _probe_is(probe: httpx.AsyncClient, code: int) -> bool:
    return (await probe.get("/readyz")).status_code == code


async def test_relay_node_restarted_agent_comes_back_to_the_same_url(redis_url):
    async with Cluster(redis_url) as cluster:
        node = cluster.relay("node")
        await wait_ready(node)
        instance_id, token = await register(node.url)
        agent = cluster.agent(node.url, token, "--backend", "demo", "--demo-rate", "0")
        await agent.wait_for_line("connected to")
        await wait_until(lambda: _online(node.url, instance_id), 5, what="online")

        node.kill()
        clock = Stopwatch("only relay node killed (SIGKILL) and restarted")
        port = int(node.url.rsplit(":", 1)[1])
        await asyncio.sleep(1.5)  # down for longer than the heartbeat timeout
        restarted = cluster.relay("node-restarted", port=port)
        await wait_ready(restarted)
        clock.lap("node ready again")
        # The dead node's entry expired with its liveness key: offline until the agent is back.
        await wait_until(lambda: _online(restarted.url, instance_id), 10, what="online again")
        clock.lap("agent reconnected to the same URL, instance online")
        assert agent.count("connected to") == 2
        async with httpx.AsyncClient(base_url=restarted.url, timeout=10) as client:
            response = await client.post(f"/api/chat/{instance_id}", json=chat_body(max_tokens=3))
            assert response.status_code == 200, response.text
            assert (await status(restarted.url, instance_id))["agents"] == 1
