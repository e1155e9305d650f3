"""Limits: each one produces its own status and code, and Redis-backed ones hold across nodes."""

from __future__ import annotations

import contextlib

import httpx
import pytest

from relay.bodies.openai import ChatRequest
from relay.errors import RateLimited, ValidationFailed
from relay.serving.agent_limits import FrameBudget
from relay.serving.request_limits import check_chat_request, content_chars
from relay.settings import RelaySettings
from relay.store import keys
from relay.store.leases import Slot, StreamLeases
from relay.store.rates import Bucket, RateLimiter
from tests.helpers import (
    FakeUpstream,
    openai_backend,
    running_agent,
    running_relay,
    running_upstream,
    sse_lines,
    stream_in_flight,
    wait_until,
)

pytestmark = pytest.mark.anyio

CHAT = {"messages": [{"role": "user", "content": "hi"}], "stream": False}


def ip(address: str) -> dict[str, str]:
    # uvicorn trusts X-Forwarded-For from 127.0.0.1 (its default forwarded_allow_ips),
    # which lets one test play several client addresses.
    return {"X-Forwarded-For": address}


def code_of(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


# -- pure ---------------------------------------------------------------------------------


def test_content_chars_counts_strings_and_parts():
    chat = ChatRequest.model_validate({"messages": [
        {"role": "system", "content": "abc"},
        {"role": "user", "content": [{"type": "text", "text": "hello"},
                                     {"type": "image_url", "image_url": {"url": "data:xyz"}}]},
        {"role": "assistant", "content": None, "tool_calls": []},
    ]})
    assert content_chars(chat) == len("abc") + len("hello") + len("data:xyz")


@pytest.mark.parametrize(("body", "code", "param"), [
    ({"messages": [{"role": "user", "content": "x"}] * 4}, "too_many_messages", "messages"),
    ({"messages": [{"role": "user", "content": "x" * 101}]}, "content_too_large", "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 101}]}]}, "content_too_large",
     "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 51}, "max_tokens_too_large", "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 50, "max_completion_tokens": 51},
     "max_tokens_too_large", "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": "many"}, "invalid_parameter",
     "max_completion_tokens"),
])
def test_request_shape_limits(body, code, param):
    settings = RelaySettings(max_messages=3, max_content_chars=100, max_tokens_cap=50)
    with pytest.raises(ValidationFailed) as raised:
        check_chat_request(ChatRequest.model_validate(body), settings)
    assert (raised.value.code, raised.value.param, raised.value.status) == (code, param, 422)


def test_default_max_tokens_is_lowered_to_the_cap_not_refused():
    # A caller who did not ask for max_tokens gets the relay's default (2000),
    # capped: refusing a request the caller never made that choice in would be wrong.
    chat = ChatRequest.model_validate({"messages": [{"role": "user", "content": "x"}]})
    check_chat_request(chat, RelaySettings(max_tokens_cap=50))
    assert chat.max_tokens == 50 and chat.upstream_body("m")["max_tokens"] == 50


def test_token_counts_must_be_positive_integers_even_without_a_cap():
    # The schema says so whatever the cap; with the cap off the check used to be skipped.
    for value in ("many", 0, -1, True):
        chat = ChatRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                           "max_completion_tokens": value})
        with pytest.raises(ValidationFailed) as raised:
            check_chat_request(chat, RelaySettings(max_tokens_cap=0))
        assert raised.value.param == "max_completion_tokens"


def test_zero_disables_shape_limits():
    settings = RelaySettings(max_messages=0, max_content_chars=0, max_tokens_cap=0)
    check_chat_request(ChatRequest.model_validate(
        {"messages": [{"role": "user", "content": "x" * 10_000}] * 1000, "max_tokens": 10**9}), settings)


def test_frame_budget_allows_bursts_then_refuses_until_refilled():
    now = [0.0]
    budget = FrameBudget(frames_per_second=10, bytes_per_second=1000, clock=lambda: now[0])
    assert all(budget.allow(1) for _ in range(20))  # burst = twice the rate
    assert not budget.allow(1)
    now[0] += 0.5  # 5 frames of refill
    assert sum(budget.allow(1) for _ in range(10)) == 5
    now[0] += 10
    assert budget.allow(2000)  # bytes burst = 2000
    assert not budget.allow(1)
    unlimited = FrameBudget(0, 0, clock=lambda: now[0])
    assert all(unlimited.allow(10**9) for _ in range(1000))


def test_one_huge_frame_passes_a_full_bucket_only():
    now = [0.0]
    budget = FrameBudget(frames_per_second=100, bytes_per_second=10, clock=lambda: now[0])
    assert budget.allow(1000)  # larger than the burst: allowed on a full bucket (the frame size limit bounds it)
    assert not budget.allow(1)


# -- Redis-backed primitives ----------------------------------------------------------------


async def test_rate_limiter_charges_all_buckets_or_none(redis):
    limiter = RateLimiter(redis)
    a, b = Bucket(keys.rate("t", "a"), 2, "a"), Bucket(keys.rate("t", "b"), 3, "b")
    await limiter.hit([a, b])
    await limiter.hit([a, b])
    with pytest.raises(RateLimited) as raised:
        await limiter.hit([a, b])
    assert raised.value.status == 429
    assert 1 <= int(raised.value.headers["Retry-After"]) <= 30  # one slot per 30 s at 2/min
    # b was not charged by the refused request: one more fits in b alone.
    await limiter.hit([b])
    with pytest.raises(RateLimited):
        await limiter.hit([b])
    # Every bucket key expires.
    assert 0 < await redis.pttl(a.key) <= 60_000
    await limiter.hit([Bucket(keys.rate("t", "off"), 0, "off")] * 3)  # 0 = no limit


async def redis_clock_ms(redis) -> int:
    """Now on the Redis clock (the one lease expiries are written in), in ms."""
    seconds, micros = await redis.time()
    return seconds * 1000 + micros // 1000


@pytest.mark.slow
async def test_stream_leases_are_shared_and_expire_when_not_renewed(redis):
    # No guessed sleeps: the test watches the lease's expiry (its score, on the
    # Redis clock) and the set's key, and waits for what it needs to be true.
    ttl_ms = 1000
    node_a, node_b = StreamLeases(redis, ttl_ms=ttl_ms), StreamLeases(redis, ttl_ms=ttl_ms)
    slot = [Slot(keys.streams("t", "x"), 1, "x")]
    lease = await node_a.acquire(slot)
    with pytest.raises(RateLimited) as raised:
        await node_b.acquire(slot)
    assert raised.value.code == "too_many_streams"
    # Renewed, it outlives its TTL: renew (far more often than the TTL) until
    # the Redis clock is past the expiry it was acquired with; node B never gets it.
    first_expiry = await redis.zscore(slot[0].key, lease.id)
    assert first_expiry is not None

    async def renewed_past_first_expiry() -> bool:
        await node_a.renew_all()
        with pytest.raises(RateLimited):
            await node_b.acquire(slot)
        return await redis_clock_ms(redis) > first_expiry

    await wait_until(renewed_past_first_expiry, timeout=30, interval=0.02, what="the Redis clock past the first expiry")
    assert await redis.zscore(slot[0].key, lease.id) > first_expiry  # renewal moved the expiry on
    # Node A "dies" (stops renewing, never releases): the lease expires on its own.
    node_a.held.clear()

    async def lease_expired() -> bool:
        score = await redis.zscore(slot[0].key, lease.id)
        return score is None or await redis_clock_ms(redis) > score

    await wait_until(lease_expired, timeout=30, what="the lease to expire in Redis")
    other = await node_b.acquire(slot)
    await node_b.release(other)
    await node_b.release(other)  # idempotent
    assert await redis.zcard(slot[0].key) == 0


# -- through the relay ------------------------------------------------------------------------


async def test_body_too_large_413_declared_and_chunked(redis_url):
    async with running_relay(redis_url, max_body_bytes=1000) as relay, relay.client() as client:
        instance_id, _ = await relay.register()
        big = b'{"messages": [{"role": "user", "content": "' + b"x" * 2000 + b'"}]}'
        declared = await client.post(f"/api/chat/{instance_id}", content=big,
                                     headers={"Content-Type": "application/json"})
        assert declared.status_code == 413 and code_of(declared) == "payload_too_large"

        async def chunks():
            for i in range(0, len(big), 100):
                yield big[i:i + 100]

        chunked = await client.post(f"/api/chat/{instance_id}", content=chunks(),
                                    headers={"Content-Type": "application/json"})
        assert "content-length" not in chunked.request.headers  # really Transfer-Encoding: chunked
        assert chunked.status_code == 413 and code_of(chunked) == "payload_too_large"
        # A lying Content-Length cannot sneak a big body past the check either.
        register = await client.post("/api/instances", content=chunks(), headers={"Content-Type": "application/json"})
        assert register.status_code == 413


async def test_shape_limits_through_http(redis_url):
    async with running_relay(redis_url, max_messages=2, max_content_chars=50, max_tokens_cap=100) as relay, \
            relay.client() as client:
        instance_id, _ = await relay.register()
        cases = [
            ({"messages": [{"role": "user", "content": "x"}] * 3}, "too_many_messages"),
            ({"messages": [{"role": "user", "content": "x" * 51}]}, "content_too_large"),
            ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 101}, "max_tokens_too_large"),
        ]
        for body, code in cases:
            response = await client.post(f"/api/chat/{instance_id}", json=body)
            assert response.status_code == 422 and code_of(response) == code, response.text
        within = await client.post(f"/api/chat/{instance_id}", json={"messages": [{"role": "user", "content": "x"}],
                                                                     "max_tokens": 100})
        assert within.status_code == 503  # passed every limit; no agent is connected


async def test_rate_limit_per_caller_ip_and_key(redis_url):
    async with running_relay(redis_url, rate_per_caller=3, rate_per_instance=0) as relay, relay.client() as client:
        instance_id, token = await relay.register()
        key = (await client.post(f"/api/instances/{instance_id}/keys", json={"name": "k"},
                                 headers={"Authorization": f"Bearer {token}"})).json()["key"]
        async with running_agent(relay.url, token):
            for _ in range(3):
                response = await client.post(f"/api/chat/{instance_id}", json=CHAT, headers=ip("10.0.0.1"))
                assert response.status_code == 200
            limited = await client.post(f"/api/chat/{instance_id}", json=CHAT, headers=ip("10.0.0.1"))
            assert limited.status_code == 429 and code_of(limited) == "rate_limited"
            assert 1 <= int(limited.headers["Retry-After"]) <= 20
            # Another address, and a caller key (from the same address), have their own buckets.
            assert (await client.post(f"/api/chat/{instance_id}", json=CHAT, headers=ip("10.0.0.2"))).status_code == 200
            keyed = {**ip("10.0.0.1"), "Authorization": f"Bearer {key}"}
            assert (await client.post(f"/api/chat/{instance_id}", json=CHAT, headers=keyed)).status_code == 200
            # An unknown bearer does not buy a fresh bucket.
            forged = {**ip("10.0.0.1"), "Authorization": "Bearer sk-fresh"}
            assert (await client.post(f"/api/chat/{instance_id}", json=CHAT, headers=forged)).status_code == 429


async def test_rate_limit_per_instance_and_registration(redis_url):
    async with running_relay(redis_url, rate_per_caller=0, rate_per_instance=2, rate_register_per_ip=2) as relay, \
            relay.client() as client:
        instance_id, _ = await relay.register()
        await relay.register()
        third = await client.post("/api/instances", json={"name": "x"})
        assert third.status_code == 429 and "Retry-After" in third.headers
        assert (await client.post("/api/instances", json={"name": "x"}, headers=ip("10.1.1.1"))).status_code == 201
        for n in range(2):
            response = await client.post(f"/api/chat/{instance_id}", json=CHAT, headers=ip(f"10.0.0.{n}"))
            assert response.status_code == 503
        limited = await client.post(f"/api/chat/{instance_id}", json=CHAT, headers=ip("10.0.0.9"))
        assert limited.status_code == 429 and "instance" in limited.json()["error"]["message"]


@pytest.mark.slow
async def test_rate_limits_hold_across_two_nodes(redis_url):
    async with running_relay(redis_url, rate_per_caller=4, rate_per_instance=0) as node_a, \
            running_relay(redis_url, rate_per_caller=4, rate_per_instance=0) as node_b:
        instance_id, _ = await node_a.register()
        async with node_a.client() as a, node_b.client() as b:
            statuses = [(await c.post(f"/api/chat/{instance_id}", json=CHAT)).status_code for c in (a, b, a, b)]
            assert statuses == [503] * 4  # allowed through (no agent)
            assert (await a.post(f"/api/chat/{instance_id}", json=CHAT)).status_code == 429
            assert (await b.post(f"/api/chat/{instance_id}", json=CHAT)).status_code == 429


@pytest.mark.slow
async def test_concurrent_streams_per_caller_and_per_instance_across_nodes(redis_url):
    # The model sends one word, then holds every stream until released: the
    # streams are surely running while the limits are checked, however slow
    # the machine.  Idle and lease timeouts are far above anything the test waits for.
    upstream = FakeUpstream(chunks=5, hold_after=1)
    limits = dict(max_streams_per_caller=1, max_streams_per_instance=2, rate_per_caller=0, rate_per_instance=0,
                  idle_timeout=120, heartbeat_timeout=30)
    async with running_upstream(upstream), running_relay(redis_url, **limits) as node_a, \
            running_relay(redis_url, **limits) as node_b:
        instance_id, token = await node_a.register()
        async with running_agent(node_a.url, token, openai_backend(upstream)), node_a.client() as a, \
                node_b.client() as b, contextlib.AsyncExitStack() as streams:
            url, body = f"/api/chat/{instance_id}", {**CHAT, "stream": True}
            first = contextlib.AsyncExitStack()
            await streams.enter_async_context(first)
            await first.enter_async_context(stream_in_flight(a, url, body, after=1, headers=ip("10.0.0.1")))
            # The same caller, on the other node: its one stream is in use.
            same = await b.post(url, json=CHAT, headers=ip("10.0.0.1"))
            assert same.status_code == 429 and code_of(same) == "too_many_streams"
            assert same.headers["Retry-After"] == "1"
            second = await streams.enter_async_context(
                stream_in_flight(b, url, body, after=1, headers=ip("10.0.0.2")))
            # The instance has two streams running, whatever the node or the caller.
            third = await a.post(url, json=CHAT, headers=ip("10.0.0.3"))
            assert third.status_code == 429 and "instance" in third.json()["error"]["message"]
            # Ending a stream gives its slot back (as soon as the relay sees the caller leave).
            await first.aclose()
            leases = keys.streams("caller", f"{instance_id}:ip:10.0.0.1")
            await wait_until(lambda: _empty(node_a.services.redis, leases), what="slot released")
            response = await a.post(url, json=CHAT, headers=ip("10.0.0.1"))
            assert response.status_code == 200
            upstream.release()
            rest = await second.rest()
            assert rest[-1] == "[DONE]"
        await wait_until(lambda: _empty(node_a.services.redis, keys.streams("instance", instance_id)),
                         what="every slot released")


async def _empty(redis, key: str) -> bool:
    return await redis.zcard(key) == 0


async def _no_leases(relay) -> bool:
    return relay.services.stream_leases.held == {}


@pytest.mark.slow
async def test_failed_requests_give_their_stream_slot_back(redis_url):
    async with running_relay(redis_url, max_streams_per_caller=1, rate_per_caller=0) as relay, \
            relay.client() as client:
        instance_id, token = await relay.register()
        for _ in range(3):  # offline: 503 each time, never 429
            assert (await client.post(f"/api/chat/{instance_id}", json=CHAT)).status_code == 503
        async with running_agent(relay.url, token):
            for _ in range(3):
                async with client.stream("POST", f"/api/chat/{instance_id}", json={**CHAT, "stream": True}) as r:
                    assert r.status_code == 200
                    assert (await sse_lines(r))[-1] == "[DONE]"
            await wait_until(lambda: _no_leases(relay), what="every lease released")


def test_a_window_that_does_not_fit_in_a_frame_is_refused():
    # Agents send big answers one window per frame: such a window would get them closed (1009).
    with pytest.raises(ValueError, match="stream_window"):
        RelaySettings(stream_window=4 * 1024 * 1024, max_frame_bytes=4 * 1024 * 1024)
    assert RelaySettings(stream_window=1024, max_frame_bytes=4096).stream_window == 1024


@pytest.mark.slow
async def test_refused_callers_spend_no_rate_and_a_key_keeps_its_bucket_across_addresses(redis_url):
    """Access and rates are one script: a refusal (401/403) charges nothing, so nobody without a key
    can spend a private instance's budget; a key's bucket is the key's, from any address."""
    async with running_relay(redis_url, rate_per_caller=2, rate_per_instance=3) as relay, relay.client() as client:
        instance_id, token = await relay.register("private")
        other_id, other_token = await relay.register("other")
        owner = {"Authorization": f"Bearer {token}"}
        await client.patch(f"/api/instances/{instance_id}", json={"visibility": "private"}, headers=owner)
        key = (await client.post(f"/api/instances/{instance_id}/keys", json={"name": "k"}, headers=owner)).json()["key"]
        foreign = (await client.post(f"/api/instances/{other_id}/keys", json={"name": "f"},
                                     headers={"Authorization": f"Bearer {other_token}"})).json()["key"]
        async with running_agent(relay.url, token):
            url = f"/api/chat/{instance_id}"
            for n in range(10):  # far past both budgets, from many addresses
                assert (await client.post(url, json=CHAT, headers=ip(f"10.9.0.{n}"))).status_code == 401
                wrong = {**ip(f"10.9.1.{n}"), "Authorization": f"Bearer {foreign}"}
                assert (await client.post(url, json=CHAT, headers=wrong)).status_code == 403
            keyed = [{**ip(f"10.8.0.{n}"), "Authorization": f"Bearer {key}"} for n in range(3)]
            assert (await client.post(url, json=CHAT, headers=keyed[0])).status_code == 200
            assert (await client.post(url, json=CHAT, headers=keyed[1])).status_code == 200
            # The key's own bucket (2 a minute) is spent, whatever address it comes from.
            limited = await client.post(url, json=CHAT, headers=keyed[2])
            assert limited.status_code == 429 and "this caller" in limited.json()["error"]["message"]


@pytest.mark.parametrize(("address", "counted_as"), [
    ("203.0.113.7", "203.0.113.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # the same host's /64: one budget
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("::ffff:203.0.113.7", "203.0.113.7"),  # IPv4 seen through a dual-stack socket
])
def test_per_address_limits_count_an_ipv6_host_by_its_64(address, counted_as):
    """Rates, streams, uploads and anonymous conversations are per client address: an IPv6 host,
    handed a /64, would otherwise have 2**64 budgets."""
    from starlette.requests import Request

    from relay.inputs import client_ip

    assert client_ip(Request({"type": "http", "client": (address, 1234), "headers": []})) == counted_as
