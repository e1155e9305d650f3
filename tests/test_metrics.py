"""``GET /metrics``: Prometheus text, parsed with prometheus-client's own parser.

A few real requests go through a real relay and agent; each test then reads
the counters and checks they moved exactly as those requests should make them.
"""

from __future__ import annotations

import asyncio
import sys

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

import wire
from tests.helpers import (
    FakeUpstream,
    openai_backend,
    running_agent,
    running_relay,
    running_upstream,
    wait_until,
)

pytestmark = pytest.mark.anyio

CHAT = {"messages": [{"role": "user", "content": "hello metrics"}]}


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counters_move_with_requests(redis_url):
    async with running_relay(redis_url) as relay:
        instance_id, token = await relay.register()
        async with relay.client() as client:
            before = await scrape(client)
            assert value(before, "relay_connected_agents") == 0
            assert value(before, "relay_online_instances") == 0
            # Offline instance: a rejection, before any agent exists.
            offline = await client.post(f"/api/chat/{instance_id}", json=CHAT)
            assert offline.status_code == 503

            async with running_agent(relay.url, token):
                streamed = []
                for _ in range(2):
                    response = await client.post(f"/api/chat/{instance_id}/chat/completions", json=CHAT)
                    assert response.status_code == 200
                    streamed.append(response.content)
                whole = await client.post(f"/api/chat/{instance_id}", json={**CHAT, "stream": False})
                assert whole.status_code == 200
                missing = await client.post("/api/chat/0000000000000000", json=CHAT)
                assert missing.status_code == 404
                invalid = await client.post(f"/api/chat/{instance_id}", json={"messages": "nope"})
                assert invalid.status_code == 422
                # A request is counted once its handler returns, a moment after
                # the client has read the last byte.
                await wait_until(lambda: _active_is(client, 0), what="requests to be counted")
                after = await scrape(client)

    assert value(after, "relay_connected_agents") == 1
    assert value(after, "relay_online_instances") == 1
    assert value(after, "relay_requests_total", endpoint="chat", status="200") == 3
    assert value(after, "relay_requests_total", endpoint="chat", status="404") == 1
    assert value(after, "relay_requests_total", endpoint="chat", status="422") == 1
    assert value(after, "relay_requests_total", endpoint="chat", status="503") == 1
    assert value(after, "relay_requests_total", endpoint="instances", status="201") == 1
    assert value(after, "relay_rejections_total", reason="instance_offline") == 1
    assert value(after, "relay_rejections_total", reason="instance_not_found") == 1
    assert value(after, "relay_rejections_total", reason="invalid_parameter") == 1
    # Two streamed answers: one first-chunk time and one duration each; the
    # non-streaming answer is in neither histogram.
    assert value(after, "relay_time_to_first_chunk_seconds_count") == 2
    assert value(after, "relay_stream_duration_seconds_count") == 2
    assert value(after, "relay_stream_duration_seconds_sum") >= value(after, "relay_time_to_first_chunk_seconds_sum")
    assert value(after, "relay_active_streams") == 0
    # Relayed bytes are exactly the agent's payloads: the SSE events of the two
    # streams (the relay adds only the [DONE] tail) plus the JSON body.
    expected = sum(len(body) - len(wire.SSE_DONE) for body in streamed) + len(whole.content)
    assert value(after, "relay_relayed_bytes_total") == expected
    events = sum(body.count(b"data: ") - 1 for body in streamed)
    assert 3 <= value(after, "relay_relayed_chunks_total") <= events + 1
    assert value(after, "relay_crossnode_forwards_total", direction="out") == 0
    if sys.platform.startswith("linux"):  # the process collector reads /proc
        assert value(after, "process_resident_memory_bytes") > 0


@pytest.mark.slow
async def test_active_streams_counts_a_stream_in_flight(redis_url):
    upstream = FakeUpstream(chunks=40, delay=0.05)
    async with running_upstream(upstream), running_relay(redis_url) as relay:
        instance_id, token = await relay.register()
        async with running_agent(relay.url, token, openai_backend(upstream)), relay.client() as client:
            async with client.stream("POST", f"/api/chat/{instance_id}", json=CHAT) as response:
                assert response.status_code == 200
                async for _ in response.aiter_bytes():
                    break  # the stream is running: it has sent its first bytes
                during = await scrape(client)
            await wait_until(lambda: _active_is(client, 0), what="stream to finish")
    assert value(during, "relay_active_streams") == 1
    assert value(during, "relay_time_to_first_chunk_seconds_count") == 1
    assert value(during, "relay_stream_duration_seconds_count") == 0


async def _active_is(client: httpx.AsyncClient, n: int) -> bool:
    return value(await scrape(client), "relay_active_streams") == n


@pytest.mark.slow
async def test_cross_node_forwards_and_per_app_registries(redis_url):
    """Two relays in one process: each has its own registry, and the forward shows on both."""
    async with running_relay(redis_url) as node_a, running_relay(redis_url) as node_b:
        instance_id, token = await node_a.register()
        async with running_agent(node_a.url, token):
            async with node_b.client() as client:
                response = await client.post(f"/api/chat/{instance_id}", json=CHAT)
                assert response.status_code == 200
                assert response.content.endswith(wire.SSE_DONE)
                await wait_until(lambda: _active_is(client, 0), what="request to be counted")
                b = await scrape(client)
            async with node_a.client() as client:
                await wait_until(lambda: _forwarded_in(client), what="node A to count the forward")
                a = await scrape(client)
    assert value(b, "relay_crossnode_forwards_total", direction="out") == 1
    assert value(b, "relay_connected_agents") == 0
    assert value(b, "relay_relayed_chunks_total") == 0  # the frames arrived at node A
    assert value(b, "relay_requests_total", endpoint="chat", status="200") == 1
    assert value(a, "relay_crossnode_forwards_total", direction="in") == 1
    assert value(a, "relay_connected_agents") == 1
    assert value(a, "relay_relayed_chunks_total") > 0
    assert value(a, "relay_requests_total", endpoint="chat", status="200") == 0
    assert value(a, "relay_node_info", node_id=node_a.services.node.node_id, version=wire.__version__) == 1


async def _forwarded_in(client: httpx.AsyncClient) -> bool:
    return value(await scrape(client), "relay_crossnode_forwards_total", direction="in") == 1


@pytest.mark.slow
async def test_rate_limited_requests_are_rejections(redis_url):
    async with running_relay(redis_url, rate_per_caller=1) as relay:
        instance_id, token = await relay.register()
        async with running_agent(relay.url, token), relay.client() as client:
            statuses = [(await client.post(f"/api/chat/{instance_id}", json=CHAT)).status_code for _ in range(3)]
            await wait_until(lambda: _active_is(client, 0), what="requests to be counted")
            samples = await scrape(client)
    assert statuses[0] == 200 and statuses[1:] == [429, 429]
    assert value(samples, "relay_rejections_total", reason="rate_limited") == 2
    assert value(samples, "relay_requests_total", endpoint="chat", status="429") == 2


async def test_refused_agent_is_a_rejection(redis_url):
    async with running_relay(redis_url) as relay:
        ws_url = relay.url.replace("http://", "ws://") + "/api/agent/connect"
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url, additional_headers={"Authorization": "Bearer ira_" + "x" * 43}):
                pass
        assert refused.value.response.status_code == 401
        async with relay.client() as client:
            samples = await scrape(client)
    assert value(samples, "relay_rejections_total", reason="agent_invalid_token") == 1


async def test_request_id_header(redis_url):
    async with running_relay(redis_url) as relay, relay.client() as client:
        made = await client.get("/healthz")
        given = await client.get("/healthz", headers={"X-Request-Id": "lb-1234abcd"})
        hostile = await client.get("/healthz", headers={"X-Request-Id": "not an id; " * 10 + "x"})
        error = await client.post("/api/chat/0000000000000000", content=b"{")
    assert len(made.headers["x-request-id"]) == 16
    assert given.headers["x-request-id"] == "lb-1234abcd"  # a proxy's id is kept, so logs join up
    assert len(hostile.headers["x-request-id"]) == 16  # anything else is replaced
    assert error.headers["x-request-id"]
    assert orjson.loads(error.content)["error"]["code"]


async def test_metrics_scrape_is_cheap_and_stable(redis_url):
    async with running_relay(redis_url) as relay, relay.client() as client:
        first = await scrape(client)
        await asyncio.gather(*(client.get("/metrics") for _ in range(5)))
        second = await scrape(client)
    assert value(second, "relay_requests_total", endpoint="metrics", status="200") == \
        value(first, "relay_requests_total", endpoint="metrics", status="200") + 6


@pytest.mark.parametrize(("path", "label"), [
    ("/api/chat/0123456789abcdef", "chat"), ("/api/chat/0123456789abcdef/chat/completions", "chat"),
    ("/v1/chat/completions", "chat"), ("/api/chat/0123456789abcdef/chat-messages", "chat"),
    ("/v1/chat-messages", "chat"), ("/api/converse", "chat"), ("/api/chat/x/models", "models"),
    ("/v1/models", "models"), ("/api/models", "models"), ("/v1/images/generations", "images"),
    ("/api/image", "images"), ("/v1/audio/transcriptions", "audio"), ("/api/chat/x/audio-to-text", "audio"),
    ("/api/chat/x/conversations", "conversations"), ("/v1/messages", "conversations"),
    ("/api/chat/x/messages/m/feedbacks", "conversations"), ("/v1/parameters", "conversations"),
    ("/api/upgrade", "upgrade"), ("/api/instances/x", "instances"), ("/nowhere", "other"),
    ("/api/instances/events", "watch"), ("/", "dashboard"), ("/register", "dashboard"),
    ("/i/0123456789abcdef", "dashboard"), ("/static/js/common.js", "dashboard"), ("/v1", "other"),
])
def test_each_door_has_its_label(path, label):
    from relay.telemetry.requests import endpoint_of

    assert endpoint_of(path) == label


@pytest.mark.slow
async def test_status_streams_are_not_answers_in_the_stream_metrics(redis_url):
    """The dashboard's live status streams (hours long) stay out of the answer histograms and logs' instance."""
    async with running_relay(redis_url, watch_interval=0.05) as relay, relay.client() as client:
        instance_id, _ = await relay.register("watched")
        async with client.stream("GET", f"/api/instances/events?ids={instance_id}") as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("event: instance"):
                    break
        await wait_until(lambda: not relay.services.watch.watchers, what="the watcher released")
        after = await scrape(client)
    assert value(after, "relay_requests_total", endpoint="watch", status="200") == 1
    assert value(after, "relay_time_to_first_chunk_seconds_count") == 0
    assert value(after, "relay_stream_duration_seconds_count") == 0


async def test_redis_round_trips_are_counted_per_send(redis_url):
    """One count per command, script or pipeline sent: what the bench divides by requests."""
    # Slow housekeeping: the node's own loops send (almost) nothing during the test.
    async with running_relay(redis_url, heartbeat_interval=30, heartbeat_timeout=90) as relay, \
            relay.client() as client:
        redis = relay.services.redis
        before = value(await scrape(client), "relay_redis_round_trips_total")
        await redis.get("x")
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(10):
                pipe.get(f"x{n}")
            await pipe.execute()
        after = value(await scrape(client), "relay_redis_round_trips_total")
    # The two sends, and whatever the node's own loops did meanwhile (never fewer than two).
    assert after - before >= 2
    assert after - before < 12  # the pipeline was one send, not ten
