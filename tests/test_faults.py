"""Faults, reproduced for real, and what each looks like to a caller.

Agents stopped, killed (-9) or frozen (SIGSTOP: TCP stays open, heartbeats
stop), a relay node killed, Redis killed and restarted or frozen, a model that
never answers or stops mid-answer, a client that stops reading, a node asked
to stop (SIGTERM).  Each test asserts the outcome an operator needs and prints
the time to recovery it measured (``pytest -s``).

Timeouts are shortened through settings (``RELAY_*``).  No test asserts how
long anything took: each waits for the behaviour, under a generous deadline
that fails it only if the behaviour never comes.  A stream that must be in
flight when something breaks is held by the model (``FakeUpstream.hold_after``)
rather than made long enough, and the idle timeouts of such tests are far
above anything they wait for.
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

from relay.store import keys
from relay.store.embedded import EmbeddedRedis
from relay.store.registry import InstanceRegistry
from tests.cluster import FAST_RELAY_ENV, Cluster, chat_body, register, wait_ready
from tests.helpers import (
    FakeUpstream,
    Stopwatch,
    assert_openai_error,
    frozen,
    instance_view,
    offline,
    online,
    openai_backend,
    running_agent,
    running_relay,
    running_upstream,
    sse_lines,
    stream_in_flight,
    wait_until,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

HEARTBEAT_TIMEOUT = float(FAST_RELAY_ENV["RELAY_HEARTBEAT_TIMEOUT"])


# -- capacity ---------------------------------------------------------------------


@pytest.mark.parametrize("agents", [1, 2], ids=["one agent", "two agents"])
async def test_agents_at_capacity_is_503_and_freed_slots_serve_again(redis_url, agents):
    """Every agent of the instance busy (one slot each): the next request is refused,
    without reaching a model; once the callers hang up, their slots serve again."""
    upstream = FakeUpstream(chunks=5, hold_after=1)  # every stream held after its first word
    async with running_upstream(upstream), running_relay(redis_url, idle_timeout=120) as relay:
        instance_id, token = await relay.register()
        url = f"/api/chat/{instance_id}"
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(agents):
                await stack.enter_async_context(
                    running_agent(relay.url, token, openai_backend(upstream), max_concurrency=1))
            client = await stack.enter_async_context(relay.client())
            async with contextlib.AsyncExitStack() as held:
                for _ in range(agents):  # one stream per agent, all running
                    await held.enter_async_context(stream_in_flight(client, url, chat_body(), after=1))
                response = await client.post(url, json=chat_body())
                error = assert_openai_error(response, 503, code="instance_at_capacity")
                assert "capacity" in error["message"]
                assert response.headers["retry-after"] == "1"
                assert len(upstream.requests) == agents  # the refused request never reached a model
            # Every caller hung up: the agents aborted their requests, and the slots come back.
            await wait_until(lambda: upstream.disconnects == agents, 15, what="upstream requests aborted")
            upstream.release()

            async def served() -> bool:
                response = await client.post(url, json=chat_body(stream=False))
                if response.status_code != 200:  # the slot not given back yet
                    assert_openai_error(response, 503, code="instance_at_capacity")
                return response.status_code == 200

            await wait_until(served, 15, what="a freed slot to serve again")


# -- the model goes silent ----------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no stream"])
async def test_model_silent_before_first_chunk_is_504(redis_url, stream):
    upstream = FakeUpstream(hang=True)
    async with running_upstream(upstream), running_relay(redis_url, first_chunk_timeout=0.5) as relay:
        instance_id, token = await relay.register()
        async with running_agent(relay.url, token, openai_backend(upstream)), relay.client() as client:
            started = time.monotonic()
            response = await client.post(f"/api/chat/{instance_id}", json=chat_body(stream=stream))
            elapsed = time.monotonic() - started
            print(f"\n[recovery] silent model (stream={stream}): 504 after {elapsed:.2f}s")
            assert_openai_error(response, 504, code="model_timeout")
            assert elapsed > 0.4  # it did wait for the model (a lower bound only: slow is fine)
            # The relay gave up, so the agent must too: it aborted the upstream request.
            await wait_until(lambda: upstream.disconnects == 1, 15, what="upstream request aborted")


async def test_model_silent_mid_stream_ends_with_error_event(redis_url):
    upstream = FakeUpstream(chunks=2, hold_after=1)  # one word, then silence, the connection open
    async with running_upstream(upstream), running_relay(redis_url, idle_timeout=0.5) as relay:
        instance_id, token = await relay.register()
        async with running_agent(relay.url, token, openai_backend(upstream)), relay.client() as client:
            started = time.monotonic()
            async with client.stream("POST", f"/api/chat/{instance_id}", json=chat_body()) as response:
                assert response.status_code == 200
                events = await sse_lines(response)
            elapsed = time.monotonic() - started
            print(f"\n[recovery] model silent mid-stream: error event after {elapsed:.2f}s")
            assert elapsed > 0.4  # the idle timeout, not an immediate end (a lower bound only)
            assert events[-1] == "[DONE]"
            assert orjson.loads(events[0])["choices"][0]["delta"]["content"] == "w0 "
            error = orjson.loads(events[-2])["error"]
            assert error["code"] == "model_timeout"
            await wait_until(lambda: upstream.disconnects == 1, 15, what="upstream request aborted")


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
    # The stall limit is far above what the other stream below needs, so that
    # one surely completes while the stalled one is still held; the idle
    # timeout is above the stall limit, so the stall limit is what cuts it off.
    stall_limit = 5.0
    caplog.set_level(logging.WARNING, logger="relay.chat")
    async with BigUpstream().running() as upstream, \
            running_relay(redis_url, stream_window=window, stall_timeout=stall_limit, idle_timeout=120) as relay:
        instance_id, token = await relay.register()
        async with running_agent(relay.url, token, openai_backend(upstream), models=["big"],
                                 max_concurrency=4) as agent_client:
            sessions = relay.services.sessions
            largest_frame = 0
            send_data = agent_client._send_data

            async def measured_send_data(sid, send_window, payload):
                nonlocal largest_frame
                largest_frame = max(largest_frame, len(payload))
                await send_data(sid, send_window, payload)

            agent_client._send_data = measured_send_data
            started = time.monotonic()
            sock = _stalled_client(relay.settings.port, instance_id)
            watcher = None
            try:
                stalled = await wait_until(lambda: next(iter(sessions.all()[0].streams.values()), None),
                                           15, what="the stalled stream to open")
                peak = 0

                async def watch() -> None:
                    nonlocal peak
                    while True:
                        peak = max(peak, stalled.tracker.unacked)
                        await asyncio.sleep(0.005)

                watcher = asyncio.create_task(watch())
                # The stream fills every buffer between the agent and the socket.
                await wait_until(lambda: peak >= window // 2, 15, interval=0.01,
                                 what="the relay to hold half a window for the stalled reader")

                # Meanwhile, another stream of the same agent runs to completion.
                async with relay.client() as client, \
                        client.stream("POST", f"/api/chat/{instance_id}", json=chat_body(max_tokens=300)) as response:
                    assert response.status_code == 200
                    events = await sse_lines(response)
                assert events[-1] == "[DONE]" and len(events) == 301
                assert not stalled.finished, "the stalled stream ended before the other one completed"

                # The stalled reader is cut off after the stall limit, with a logged reason.
                await wait_until(lambda: stalled.id not in sessions.all()[0].streams, stall_limit + 30,
                                 what="the stalled stream to be cut off")
                elapsed = time.monotonic() - started
                print(f"\n[recovery] stalled reader cut off {elapsed:.2f}s after its request "
                      f"(stall limit {stall_limit} s)")
                watcher.cancel()
                # Relay memory for that stream: never more than the window plus one frame
                # (the agent sends what one upstream read brought as one frame).
                print(f"[recovery] stalled stream: peak bytes buffered in the relay {peak} "
                      f"(window {window}, largest frame {largest_frame})")
                assert window // 2 <= peak <= window + largest_frame
                assert elapsed >= stall_limit  # not before the limit (a lower bound only)
                assert any("read nothing for" in r.getMessage() for r in caplog.records), caplog.text
                # ... and the agent was told to stop: the model's request is aborted.
                await wait_until(lambda: upstream.disconnects == 1, 15, what="upstream request aborted")
                assert upstream.completed == 1
            finally:
                if watcher is not None:
                    watcher.cancel()
                sock.close()


# -- an agent stops, dies or loses its network ------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP],
                         ids=["agent stopped (SIGTERM)", "kill -9", "network cut (SIGSTOP)"])
async def test_agent_lost_turns_offline_and_ends_its_streams(redis_url, sig):
    """SIGTERM: the agent closes its connection as it stops; SIGKILL: the kernel
    closes its TCP connection; SIGSTOP keeps it open but silences the agent, like
    a cut network: only missing heartbeats can tell.  Either way, the stream in
    flight ends with an error event, the instance turns offline, callers get 503."""
    upstream = FakeUpstream(chunks=5, hold_after=2)
    async with running_upstream(upstream), running_relay(redis_url, idle_timeout=120) as relay, \
            Cluster(redis_url) as cluster:
        instance_id, token = await relay.register()
        agent = cluster.agent(relay.url, token, "--backend", "openai", "--upstream-url", upstream.url)
        await agent.wait_for_line("connected to")
        await wait_until(lambda: online(relay, instance_id), 15, what="online")
        async with relay.client() as client:
            with contextlib.ExitStack() as agent_away:
                async with stream_in_flight(client, f"/api/chat/{instance_id}", chat_body()) as stream:
                    if sig == signal.SIGSTOP:
                        agent_away.enter_context(frozen(agent))
                    else:
                        agent.signal(sig)
                    clock = Stopwatch(f"agent {signal.Signals(sig).name}")
                    events = await stream.rest()
                    clock.lap("in-flight stream ended with an error event")
                assert events[-1] == "[DONE]"
                error = orjson.loads(events[-2])["error"]
                assert error["code"] == "agent_disconnected"
                assert all("choices" in orjson.loads(e) for e in events[:-2])

                await wait_until(lambda: offline(relay, instance_id), 15, what="instance offline")
                clock.lap("status offline")
                response = await client.post(f"/api/chat/{instance_id}", json=chat_body())
                assert_openai_error(response, 503, code="instance_offline")
            # (A frozen agent is resumed here.)

            if sig == signal.SIGSTOP:
                # The network comes back: the agent notices its dead connection and reconnects.
                upstream.release()
                clock = Stopwatch("agent resumed after a network cut")
                await wait_until(lambda: online(relay, instance_id), 30, what="online again")
                clock.lap("status online again")
                response = await client.post(f"/api/chat/{instance_id}", json=chat_body(max_tokens=3))
                assert response.status_code == 200
                assert response.text.endswith("data: [DONE]\n\n")
                await agent.wait_for_count("connected to", 2)
                assert agent.count("connected to") == 2


# -- a relay node dies ---------------------------------------------------------------------


async def test_relay_node_killed_agent_moves_to_the_other_node(redis_url):
    """kill -9 of the node an agent is on: streams through it end with an error, requests
    at the other node are refused with 503 while the agent is away (not held until a model
    timeout), then it serves from there."""
    upstream = FakeUpstream(chunks=5, hold_after=2)
    async with running_upstream(upstream), Cluster(redis_url) as cluster:
        node_a, node_b = await cluster.nodes("node-a", "node-b")
        instance_id, token = await register(node_a.url)
        agent = cluster.agent(f"{node_a.url},{node_b.url}", token, "--backend", "openai",
                              "--upstream-url", upstream.url)
        assert node_a.url in (await agent.wait_for_line("connected to")).string
        await wait_until(lambda: online(node_b, instance_id), 15, what="online at B")
        url = f"/api/chat/{instance_id}"

        async with httpx.AsyncClient(base_url=node_b.url, timeout=30) as client:
            # Freeze the agent first, so that it cannot come back before we
            # have seen what callers get while it is away.
            with contextlib.ExitStack() as agent_away:
                # A stream at B, served by the agent on A, is in flight when A dies.
                async with stream_in_flight(client, url, chat_body()) as stream:
                    agent_away.enter_context(frozen(agent))
                    node_a.kill()
                    clock = Stopwatch("relay node killed (SIGKILL)")
                    events = await stream.rest()
                    clock.lap("stream crossing to the dead node ended with an error event")
                assert events[-1] == "[DONE]" and "error" in orjson.loads(events[-2])

                # While the agent is away, requests at B are refused, before B sees
                # node A's liveness key expire and after.
                refused = 0

                async def refused_until_offline() -> bool:
                    nonlocal refused
                    assert_openai_error(await client.post(url, json=chat_body(max_tokens=3)), 503)
                    refused += 1
                    return await offline(node_b, instance_id)

                await wait_until(refused_until_offline, 30, what="instance offline at B")
                assert_openai_error(await client.post(url, json=chat_body(max_tokens=3)), 503)
                clock.lap(f"status offline at node B; {refused + 1} requests there refused with 503 meanwhile")
            # (The agent is resumed here.)

            upstream.release()
            clock = Stopwatch("agent free to reconnect after its relay node died")

            async def served() -> bool:
                response = await client.post(url, json=chat_body(max_tokens=3))
                if response.status_code != 200:
                    assert_openai_error(response, 503)
                return response.status_code == 200

            await wait_until(served, 30, what="the agent back, serving at node B")
            clock.lap("first request served again at node B")
        await agent.wait_for_count("connected to " + re.escape(node_b.url), 1)
        assert agent.count("connected to " + re.escape(node_b.url)) == 1, agent.output
        view = await instance_view(node_b, instance_id)
        assert view["status"] == "online" and view["agents"] == 1


# -- Redis goes away ---------------------------------------------------------------------


async def _ready_is(node, code: int) -> bool:
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            return (await client.get(node.url + "/readyz")).status_code == code
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("outage", ["kill -9 and restart", "frozen (SIGSTOP)"])
async def test_redis_outage_nodes_and_agents_ride_it_out(tmp_path, outage):
    """Redis killed and restarted on the same socket, or frozen like a cut network.

    Nodes and agents keep running, ``/readyz`` says not ready while Redis is
    gone, a node whose own agent can answer still serves it, and once Redis is
    back presence is re-asserted by the nodes (the agent never reconnects) and
    requests cross nodes again.
    """
    redis = EmbeddedRedis(tmp_path / "redis", persist=True).start()
    upstream = FakeUpstream(chunks=5, hold_after=2)
    try:
        async with running_upstream(upstream), Cluster(redis.url) as cluster:
            # Model timeouts far above anything this test waits for: streams and
            # requests must recover because the relay notices, not because a timeout expires.
            slow_model = {"RELAY_FIRST_CHUNK_TIMEOUT": "120", "RELAY_IDLE_TIMEOUT": "120"}
            node_a, node_b = await cluster.nodes("node-a", "node-b", **slow_model)
            instance_id, token = await register(node_a.url)
            agent = cluster.agent(node_b.url, token, "--backend", "openai", "--upstream-url", upstream.url)
            await agent.wait_for_line("connected to")
            await wait_until(lambda: online(node_a, instance_id), 15, what="online")
            # A persistent Redis: no warning.
            assert node_a.count("persists nothing") == 0 and node_b.count("persists nothing") == 0

            async with httpx.AsyncClient(timeout=30) as client:  # a hung request fails at the deadline

                async def chat(node) -> httpx.Response:
                    return await client.post(f"{node.url}/api/chat/{instance_id}",
                                             json=chat_body(stream=False, max_tokens=3))

                assert (await chat(node_a)).status_code == 200  # across nodes

                with contextlib.ExitStack() as outage_scope:
                    if outage.startswith("kill"):
                        # A stream across nodes (caller at A, agent at B) is in flight.
                        async with stream_in_flight(client, f"{node_a.url}/api/chat/{instance_id}",
                                                    chat_body()) as stream:
                            redis.kill()
                            clock = Stopwatch(f"redis {outage}")
                            events = await stream.rest()
                            clock.lap("cross-node stream in flight ended with an error event")
                        # Its chunks may have been lost with the bus: an error, never a silent gap.
                        assert events[-1] == "[DONE]" and "error" in orjson.loads(events[-2]), events[-3:]
                    else:
                        outage_scope.enter_context(frozen(redis.process))
                        clock = Stopwatch(f"redis {outage}")
                    await asyncio.gather(*(wait_until(lambda node=node: _ready_is(node, 503), 30,
                                                      what=f"{node.name} not ready") for node in (node_a, node_b)))
                    clock.lap("/readyz 503 on both nodes")
                    # Both nodes failed to reach Redis: no refresh of theirs lands from here on.
                    unreachable_since = time.monotonic()

                    # Callers get an answer, not a hang: node A cannot route without
                    # Redis (503); node B holds the agent and may serve it locally
                    # (200) unless its caller checks need Redis (503).
                    async def chat_while_down(node, allowed: set[int]) -> None:
                        started = time.monotonic()
                        response = await chat(node)
                        took = time.monotonic() - started
                        print(f"[recovery] redis down: chat at {node.name} answered {response.status_code} "
                              f"in {took:.2f}s")
                        assert response.status_code in allowed, response.text

                    await asyncio.gather(chat_while_down(node_a, {503}), chat_while_down(node_b, {200, 503}))

                    # Node keys live one heartbeat timeout past their last refresh: once
                    # that much has passed, they are expired (the nodes must re-assert).
                    await wait_until(lambda: time.monotonic() - unreachable_since > HEARTBEAT_TIMEOUT, 30,
                                     what="the node keys to be past their TTL")
                    if outage.startswith("kill"):
                        redis.start()
                # (A frozen Redis is resumed here.)
                clock = Stopwatch(f"redis back after {outage}")
                await asyncio.gather(*(wait_until(lambda node=node: _ready_is(node, 200), 30,
                                                  what=f"{node.name} ready again") for node in (node_a, node_b)))
                clock.lap("/readyz 200 on both nodes")
                await wait_until(lambda: online(node_a, instance_id), 30, what="online again")
                clock.lap("instance online again (presence re-asserted)")
                upstream.release()

                async def served() -> bool:
                    return (await chat(node_a)).status_code == 200  # a request lost between nodes times out

                await wait_until(served, 30, what="a request at node A served by the agent on node B")
                clock.lap("request across nodes served again")

            assert agent.count("connected to") == 1, "the agent had to reconnect:\n" + agent.output
            assert all(proc.popen.poll() is None for proc in cluster.procs)
            await node_b.wait_for_line("presence re-asserted")
    finally:
        redis.stop()


# -- a node asked to stop -------------------------------------------------------------------


async def test_sigterm_drains_streams_then_sends_agents_elsewhere(redis_url):
    upstream = FakeUpstream(chunks=5, hold_after=2)
    async with running_upstream(upstream), Cluster(redis_url) as cluster:
        # Drain and idle limits far above anything this test waits for: the
        # stream in flight ends because the model finishes it (released below).
        node_a, node_b = await cluster.nodes("node-a", "node-b", RELAY_DRAIN_TIMEOUT="120",
                                             RELAY_IDLE_TIMEOUT="120")
        instance_id, token = await register(node_a.url)
        agent = cluster.agent(f"{node_a.url},{node_b.url}", token, "--backend", "openai",
                              "--upstream-url", upstream.url)
        assert node_a.url in (await agent.wait_for_line("connected to")).string
        await wait_until(lambda: online(node_b, instance_id), 15, what="online")

        async with httpx.AsyncClient(base_url=node_a.url, timeout=30) as client, \
                httpx.AsyncClient(base_url=node_a.url, timeout=30) as probe:
            # A kept-alive connection: the draining node accepts no new ones.
            assert (await probe.get("/readyz")).status_code == 200
            async with stream_in_flight(client, f"/api/chat/{instance_id}", chat_body()) as stream:
                node_a.signal(signal.SIGTERM)
                clock = Stopwatch("SIGTERM to a node with a stream in flight")

                # During the drain: not ready, and new chat requests are turned away.
                await wait_until(lambda: _probe_is(probe, 503), 30, what="/readyz 503 while draining")
                clock.lap("/readyz 503 (draining)")
                refused = await probe.post(f"/api/chat/{instance_id}", json=chat_body())
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "node_draining"

                upstream.release()  # the model finishes the stream in flight
                events = await stream.rest()
                clock.lap("in-flight stream completed")
        assert events[-1] == "[DONE]"
        chunks = [orjson.loads(e) for e in events[:-1]]
        assert all("choices" in c for c in chunks), events[-3:]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "w0 w1 w2 w3 w4 "

        assert await node_a.wait_exit(30) == 0, node_a.output
        clock.lap("node exited")
        assert node_a.count("draining") >= 1
        # Told to go away, the agent went to the other URL it was given.
        await agent.wait_for_line("connected to " + re.escape(node_b.url), 30)
        await wait_until(lambda: online(node_b, instance_id), 15, what="online via node B")
        clock.lap("agent online again through node B")
        async with httpx.AsyncClient(base_url=node_b.url, timeout=30) as client:
            response = await client.post(f"/api/chat/{instance_id}", json=chat_body(max_tokens=3))
            assert response.status_code == 200


async def _probe_is(probe: httpx.AsyncClient, code: int) -> bool:
    return (await probe.get("/readyz")).status_code == code


async def test_relay_node_restarted_agent_comes_back_to_the_same_url(redis_url, redis):
    async with Cluster(redis_url) as cluster:
        [node] = await cluster.nodes("node")
        instance_id, token = await register(node.url)
        agent = cluster.agent(node.url, token, "--backend", "demo", "--demo-rate", "0")
        await agent.wait_for_line("connected to")
        await wait_until(lambda: online(node, instance_id), 15, what="online")
        [node_id] = await redis.zrange(keys.NODES, 0, -1)

        node.kill()
        clock = Stopwatch("only relay node killed (SIGKILL) and restarted")
        port = int(node.url.rsplit(":", 1)[1])
        # Down for longer than its liveness lasts: seen in Redis, not guessed.
        registry = InstanceRegistry(redis, heartbeat_timeout=HEARTBEAT_TIMEOUT, base_url="http://unused")
        await wait_until(lambda: _dead(registry, node_id.decode()), 30, what="the dead node's liveness to end")
        clock.lap("dead node's liveness ended")
        # Its agent's entry went with it: offline until the agent is back.
        assert (await registry.view(instance_id))["status"] == "offline"
        restarted = cluster.relay("node-restarted", port=port)
        await wait_ready(restarted)
        clock.lap("node ready again")
        await wait_until(lambda: online(restarted, instance_id), 30, what="online again")
        clock.lap("agent reconnected to the same URL, instance online")
        await agent.wait_for_count("connected to", 2)
        assert agent.count("connected to") == 2
        async with httpx.AsyncClient(base_url=restarted.url, timeout=30) as client:
            response = await client.post(f"/api/chat/{instance_id}", json=chat_body(max_tokens=3))
            assert response.status_code == 200, response.text
            assert (await instance_view(restarted, instance_id))["agents"] == 1


async def _dead(registry: InstanceRegistry, node_id: str) -> bool:
    await registry.liveness.refresh()
    return node_id not in registry.liveness.alive
