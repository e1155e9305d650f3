"""The bounds that existed before issue 21, pushed past with the node's memory watched.

Each test runs ``relay serve`` as its own process (``tests/bounds.py``) with a
real agent and a fake model server in this process, sends what a hostile
caller would, and asserts both the answer and that the node's peak RSS grew by
less than a stated bound while it happened.  The model answers with chunks as
long as the caller's question (``FakeUpstream.echo``), so a long question and
many chunks make an answer of hundreds of megabytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.bounds import MiB, relay_process
from tests.helpers import FakeUpstream, online, openai_backend, running_agent, running_upstream, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

#: Each chunk of the model's answer carries the question: 16 KiB a chunk.
QUESTION = "q" * (16 * 1024)
#: The agent (in this process) sends as fast as the caller reads, past the node's default
#: agent byte budget (64 MiB/s): these tests measure memory, so that budget is lifted.
FAST_AGENT = {"RELAY_AGENT_BYTES_PER_SECOND": "0", "RELAY_MAX_CONTENT_CHARS": "0"}


async def _served(node, upstream: FakeUpstream):
    instance_id, token = await node.register()
    agent = running_agent(node.url, token, openai_backend(upstream), max_concurrency=64)
    return instance_id, agent


async def test_a_chunked_body_far_past_the_limit_is_413_and_never_held(redis_url):
    """A 256 MiB chunked body (no length declared) is refused at 1 MiB; the node holds no more than that."""
    async with relay_process(redis_url) as node:
        instance_id, _ = await node.register()

        async def body() -> AsyncIterator[bytes]:
            piece = b"x" * (1024 * 1024)
            for _ in range(256):
                yield piece

        async with node.watch() as watch, node.client() as client:
            try:
                response = await client.post(f"/api/chat/{instance_id}", content=body(),
                                             headers={"Content-Type": "application/json"})
                status = response.status_code
            except httpx.HTTPError:  # the relay answered and closed while the client was still sending
                status = 413
        assert status == 413
        watch.assert_within(16 * MiB, "a 256 MiB chunked body")


async def test_callers_that_read_nothing_hold_one_window_each_then_are_cut_off(redis_url):
    """32 streams of a 400 MiB answer whose callers read nothing: the node holds about a window each,
    and cuts them off after ``RELAY_STALL_TIMEOUT``."""
    upstream = FakeUpstream(chunks=25_000, echo=True)
    async with running_upstream(upstream), relay_process(redis_url, RELAY_STALL_TIMEOUT="2",
                                                         RELAY_MAX_STREAMS_PER_CALLER="0", **FAST_AGENT) as node:
        instance_id, agent = await _served(node, upstream)
        async with agent:
            await wait_until(lambda: online(node.url, instance_id), what="the agent online")
            body = {"messages": [{"role": "user", "content": QUESTION}], "stream": True}
            async with node.watch() as watch:
                clients = [httpx.AsyncClient(base_url=node.url, timeout=60) for _ in range(32)]
                try:
                    streams = [await clients[i].send(clients[i].build_request(
                        "POST", f"/api/chat/{instance_id}", json=body), stream=True) for i in range(32)]
                    assert all(s.status_code == 200 for s in streams)
                    # Read nothing until the node has cut every one of them off (its log says so).
                    await node.proc.wait_for_count(r"read nothing for", 32, timeout=60)
                    for s in streams:
                        await s.aclose()
                finally:
                    for c in clients:
                        await c.aclose()
            watch.assert_within(48 * MiB, "32 stalled readers of a 400 MiB answer")
            await wait_until(lambda: upstream.inflight == 0, timeout=30, what="the model's streams cancelled")


async def test_a_fast_reader_of_a_huge_answer_costs_the_node_one_window(redis_url):
    """A 400 MiB streamed answer read as fast as it comes: it all arrives, the node's memory stays flat."""
    upstream = FakeUpstream(chunks=25_000, echo=True)
    async with running_upstream(upstream), relay_process(redis_url, **FAST_AGENT) as node:
        instance_id, agent = await _served(node, upstream)
        async with agent:
            await wait_until(lambda: online(node.url, instance_id), what="the agent online")
            body = {"messages": [{"role": "user", "content": QUESTION}], "stream": True}
            received = 0
            async with node.watch() as watch, node.client(timeout=120) as client, \
                    client.stream("POST", f"/api/chat/{instance_id}", json=body) as response:
                assert response.status_code == 200
                tail = b""
                async for piece in response.aiter_bytes():
                    received += len(piece)
                    tail = (tail + piece)[-64:]
            assert tail.endswith(b"data: [DONE]\n\n")
            assert received > 25_000 * len(QUESTION)
            watch.assert_within(32 * MiB, "a 400 MiB answer streamed through")


async def test_a_non_streamed_answer_past_the_answer_limit_is_502_and_never_held_whole(redis_url):
    """A 40 MiB ``chat.completion`` against an 8 MiB ``RELAY_MAX_ANSWER_BYTES``: 502, the node held about 8 MiB.

    The agent runs in this process and reads the model's whole body on its
    event loop before it sends a byte: the heartbeat timeout leaves it time.
    """
    upstream = FakeUpstream(chunks=2_500, echo=True)
    async with running_upstream(upstream), relay_process(redis_url, RELAY_MAX_ANSWER_BYTES=str(8 * MiB),
                                                         RELAY_HEARTBEAT_TIMEOUT="60", **FAST_AGENT) as node:
        instance_id, agent = await _served(node, upstream)
        async with agent:
            await wait_until(lambda: online(node.url, instance_id), what="the agent online")
            body = {"messages": [{"role": "user", "content": QUESTION}], "stream": False}
            async with node.watch() as watch, node.client(timeout=120) as client:
                response = await client.post(f"/api/chat/{instance_id}", json=body)
            assert response.status_code == 502, response.text
            assert response.json()["error"]["code"] == "answer_too_large"
            watch.assert_within(24 * MiB, "a 40 MiB non-streamed answer")
            # The node is still whole: a small answer goes through.
            upstream.chunks = 3
            async with node.client() as client:
                ok = await client.post(f"/api/chat/{instance_id}", json={
                    "messages": [{"role": "user", "content": "hi"}], "stream": False})
            assert ok.status_code == 200
