"""End to end, in one process: the real relay, the real agent, a fake model.

Every request goes over real sockets: HTTP client -> relay (uvicorn) ->
agent websocket -> agent -> model (FakeUpstream over HTTP, or the built-in
demo model) and back.  Only the model is fake.  Where a behaviour must hold
whether the caller is on the agent's node or not, the test is parametrized
with a second relay node on the same Redis.  (Agents lost mid-stream, a silent
model, an instance at capacity: ``test_faults``.)
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import orjson
import pytest
from openai import APIStatusError, AsyncOpenAI

from relay.store import keys
from tests.helpers import (
    FakeUpstream,
    assert_openai_error,
    online,
    openai_backend,
    running_agent,
    running_relay,
    running_upstream,
    sse_lines,
    stream_in_flight,
    wait_until,
)

pytestmark = pytest.mark.anyio

PATHS = ["", "/chat/completions"]
HELLO = {"messages": [{"role": "user", "content": "hi there"}]}


@contextlib.asynccontextmanager
async def stack(redis_url, upstream: FakeUpstream | None = None, *, max_concurrency: int = 16, **relay_settings):
    """Relay + registered instance + connected agent (demo model, or ``upstream``)."""
    async with contextlib.AsyncExitStack() as stack:
        relay = await stack.enter_async_context(running_relay(redis_url, **relay_settings))
        instance_id, token = await relay.register()
        backend = None
        if upstream is not None:
            await stack.enter_async_context(running_upstream(upstream))
            backend = openai_backend(upstream)
        agent = await stack.enter_async_context(
            running_agent(relay.url, token, backend, max_concurrency=max_concurrency))
        client = await stack.enter_async_context(relay.client())
        yield relay, instance_id, agent, client


def chunks_of(events: list[str]) -> list[dict]:
    assert events, "no events at all"
    assert events[-1] == "[DONE]", events[-3:]
    assert "[DONE]" not in events[:-1]
    return [orjson.loads(e) for e in events[:-1]]


def text_of(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def stream_text(client: httpx.AsyncClient, url: str, body: dict) -> tuple[str, list[dict]]:
    async with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        chunks = chunks_of(await sse_lines(response))
    return text_of(chunks), chunks


# -- happy paths ---------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_demo_stream_and_non_stream(redis_url, path):
    async with stack(redis_url) as (relay, iid, agent, client):
        url = f"/api/chat/{iid}{path}"
        text, chunks = await stream_text(client, url, HELLO)  # stream defaults to true
        assert "You said: hi there." in text
        assert all(c["object"] == "chat.completion.chunk" and c["model"] == "demo" for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

        response = await client.post(url, json={**HELLO, "stream": False})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        completion = response.json()
        assert completion["object"] == "chat.completion"
        assert completion["model"] == "demo"
        assert completion["choices"][0]["message"]["content"] == text
        usage = completion["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


@pytest.mark.parametrize("path", PATHS)
async def test_upstream_stream_and_non_stream(redis_url, path):
    upstream = FakeUpstream(chunks=6)
    async with stack(redis_url, upstream) as (relay, iid, agent, client):
        url = f"/api/chat/{iid}{path}"
        text, chunks = await stream_text(client, url, HELLO)
        assert text == "w0 w1 w2 w3 w4 w5 "
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert upstream.requests[-1]["stream"] is True

        response = await client.post(url, json={**HELLO, "stream": False})
        assert response.status_code == 200
        completion = response.json()
        assert completion["choices"][0]["message"]["content"] == "w0 w1 w2 w3 w4 w5"
        assert completion["usage"] == {"prompt_tokens": 1, "completion_tokens": 6, "total_tokens": 7}
        assert upstream.requests[-1]["stream"] is False
        assert upstream.completed == 2


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["demo", "upstream"])
async def test_openai_sdk(redis_url, backend):
    upstream = FakeUpstream(chunks=4) if backend == "upstream" else None
    model = "fake-model" if upstream else "demo"
    listed = [model] if upstream else [model, "demo-image", "demo-transcribe"]  # the demo also draws and listens
    async with stack(redis_url, upstream) as (relay, iid, agent, client):
        sdk = AsyncOpenAI(base_url=f"{relay.url}/api/chat/{iid}", api_key="x", max_retries=0, timeout=30)
        async with sdk:
            models = await sdk.models.list()
            assert [m.id for m in models.data] == listed

            stream = await sdk.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "sdk stream"}], stream=True)
            parts = [chunk async for chunk in stream]
            streamed = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
            assert parts and all(c.model == model for c in parts)

            completion = await sdk.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "sdk stream"}], stream=False)
            assert completion.model == model
            assert completion.choices[0].message.content == streamed.strip()
            assert completion.usage is not None and completion.usage.total_tokens > 0
        if upstream:
            assert streamed == "w0 w1 w2 w3 "
        else:
            assert "You said: sdk stream." in streamed


async def test_openai_sdk_surfaces_relay_errors(redis_url):
    async with running_relay(redis_url) as relay:
        iid, _ = await relay.register()
        async with AsyncOpenAI(base_url=f"{relay.url}/api/chat/{iid}", api_key="x", max_retries=0) as sdk:
            with pytest.raises(APIStatusError) as info:
                await sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
            assert info.value.status_code == 503
            assert "offline" in info.value.message
            with pytest.raises(APIStatusError) as info:
                await sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                  temperature=5)
            assert info.value.status_code == 422


# -- what reaches the model ------------------------------------------------------


@pytest.mark.slow
async def test_metadata_and_unknown_fields_reach_the_upstream_untouched(redis_url):
    upstream = FakeUpstream()
    metadata = {"role_id": "r-42", "enable_l0_retrieval": True, "nested": {"list": [1, 2.5, None, "x"]},
                "unicode": "héllo ✓"}
    extras = {"stop": ["\n\n", "END"], "seed": 1234, "response_format": {"type": "json_object"},
              "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
              "user": "someone", "logit_bias": {"50256": -100}}
    content = [{"type": "text", "text": "look"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}]
    async with stack(redis_url, upstream) as (relay, iid, agent, client):
        body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}],
                "metadata": metadata, **extras}
        await stream_text(client, f"/api/chat/{iid}", body)
        response = await client.post(f"/api/chat/{iid}/chat/completions", json={**body, "stream": False})
        assert response.status_code == 200
        # The SDK's own metadata parameter too.
        async with AsyncOpenAI(base_url=f"{relay.url}/api/chat/{iid}", api_key="x", max_retries=0) as sdk:
            await sdk.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}],
                                              stream=False, metadata={"role_id": "sdk"}, seed=7)
    assert len(upstream.requests) == 3
    for seen in upstream.requests[:2]:
        assert seen["metadata"] == metadata
        for key, value in extras.items():
            assert seen[key] == value, key
        assert seen["messages"][1]["content"] == content
        assert seen["messages"][0] == {"role": "system", "content": "be brief"}
    assert upstream.requests[2]["metadata"] == {"role_id": "sdk"}
    assert upstream.requests[2]["seed"] == 7


@pytest.mark.slow
async def test_defaults_are_filled_in(redis_url):
    upstream = FakeUpstream()
    async with stack(redis_url, upstream) as (relay, iid, agent, client):
        await stream_text(client, f"/api/chat/{iid}", HELLO)
        await stream_text(client, f"/api/chat/{iid}", {**HELLO, "temperature": 0, "max_tokens": 5, "top_p": 0.5})
    first, second = upstream.requests
    assert (first["temperature"], first["max_tokens"], first["stream"]) == (0.7, 2000, True)
    assert (second["temperature"], second["max_tokens"], second["top_p"]) == (0, 5, 0.5)


@pytest.mark.slow
async def test_unknown_model_falls_back_to_the_default(redis_url):
    upstream = FakeUpstream()
    async with running_relay(redis_url) as relay, running_upstream(upstream):
        iid, token = await relay.register()
        async with running_agent(relay.url, token, openai_backend(upstream), models=["fake-model", "other-model"]), \
                relay.client() as client:
            # A name the instance serves is kept ...
            response = await client.post(f"/api/chat/{iid}", json={**HELLO, "model": "other-model", "stream": False})
            assert response.status_code == 200
            assert upstream.requests[-1]["model"] == "other-model"
            # ... any other name (SDKs insist on one) goes to the default, first model.
            for model in ("gpt-4o", None):
                body = {**HELLO, "stream": False, **({"model": model} if model else {})}
                response = await client.post(f"/api/chat/{iid}", json=body)
                assert response.status_code == 200
                assert upstream.requests[-1]["model"] == "fake-model"
                assert response.json()["model"] == "fake-model"  # the response says who answered
            models = (await client.get(f"/api/chat/{iid}/models")).json()
            assert [m["id"] for m in models["data"]] == ["fake-model", "other-model"]


async def test_demo_model_name_in_response_after_fallback(redis_url):
    async with stack(redis_url) as (relay, iid, agent, client):
        _, chunks = await stream_text(client, f"/api/chat/{iid}", {**HELLO, "model": "gpt-4o"})
        assert {c["model"] for c in chunks} == {"demo"}


# -- multiplexing ---------------------------------------------------------------------


@pytest.mark.slow
async def test_concurrent_streams_over_one_agent_interleave_correctly(redis_url):
    # gate=10: the model holds every answer until all ten are in flight at
    # once, so this only passes if the relay and the agent multiplex them.
    upstream = FakeUpstream(chunks=15, delay=0.005, echo=True, gate=10)
    # All ten come from one caller (127.0.0.1): a per-caller stream limit, if
    # the relay has one, is not what this test is about.
    async with stack(redis_url, upstream, max_streams_per_caller=0) as (relay, iid, agent, client):
        async def one(n: int) -> str:
            text, _ = await stream_text(client, f"/api/chat/{iid}",
                                        {"messages": [{"role": "user", "content": f"caller{n}"}]})
            return text

        texts = await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(10))), 60)
    assert upstream.max_inflight == 10
    for n, text in enumerate(texts):
        assert text == "".join(f"caller{n}-w{i} " for i in range(15))
    assert upstream.completed == 10


@pytest.mark.slow
async def test_large_answers_respect_flow_control(redis_url):
    # Far more bytes than the stream window: credit must flow back to the agent.
    upstream = FakeUpstream(chunks=400, echo=True)
    async with stack(redis_url, upstream, stream_window=2048) as (relay, iid, agent, client):
        bodies = [{"messages": [{"role": "user", "content": f"big{n}" * 10}]} for n in range(3)]
        texts = await asyncio.wait_for(
            asyncio.gather(*(stream_text(client, f"/api/chat/{iid}", b) for b in bodies)), 60)
    for n, (text, _) in enumerate(texts):
        prefix = f"big{n}" * 10
        assert text == "".join(f"{prefix}-w{i} " for i in range(400))


# -- cancellation ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("where", ["same node", "other node"])
async def test_client_disconnect_cancels_the_upstream_request(redis_url, redis, where):
    """A caller hanging up mid-stream makes the agent abort the model's request, whether
    the caller is on the agent's node or on another (the cancel crosses the bus)."""
    upstream = FakeUpstream(chunks=10, hold_after=3)  # three words, then held until the caller leaves
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(running_upstream(upstream))
        agent_node = await stack.enter_async_context(running_relay(redis_url))
        caller_node = agent_node if where == "same node" else \
            await stack.enter_async_context(running_relay(redis_url))
        iid, token = await agent_node.register()
        agent = await stack.enter_async_context(
            running_agent(agent_node.url, token, openai_backend(upstream), max_concurrency=1))
        client = await stack.enter_async_context(caller_node.client())
        await wait_until(lambda: online(caller_node, iid), what="online as seen by the caller's node")

        async with stream_in_flight(client, f"/api/chat/{iid}", HELLO, after=3):
            pass  # leaving the block hangs up, mid-stream

        await wait_until(lambda: upstream.disconnects == 1, timeout=15, what="the upstream request to be aborted")
        assert upstream.completed == 0

        async def all_idle():
            load = await redis.hgetall(keys.load(iid))
            return (agent.status.inflight == 0 and not any(s.streams for s in agent_node.services.sessions.all())
                    and set(map(int, load.values())) <= {0})

        await wait_until(all_idle, timeout=15, what="agent, relay and load counter to forget the stream")
        # The slot was given back: the single-slot agent answers the next caller.
        upstream.chunks = 3
        upstream.release()
        text, _ = await stream_text(client, f"/api/chat/{iid}", HELLO)
        assert text == "w0 w1 w2 "


# -- errors ------------------------------------------------------------------------------


async def test_unknown_instance_is_404(redis_url):
    async with running_relay(redis_url) as relay, relay.client() as client:
        for path in PATHS:
            response = await client.post(f"/api/chat/nosuchinstance{path}", json=HELLO)
            assert_openai_error(response, 404, type_="not_found_error", code="instance_not_found",
                                param="instance_id")
        assert_openai_error(await client.get("/api/chat/nosuchinstance/models"), 404)
        assert_openai_error(await client.get("/api/instances/nosuchinstance"), 404)
        assert_openai_error(await client.get("/api/no/such/route"), 404)


@pytest.mark.slow
@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({**HELLO, "temperature": 2.5}, "temperature"),
    ({**HELLO, "temperature": -0.1}, "temperature"),
    ({**HELLO, "temperature": "hot"}, "temperature"),
    ({**HELLO, "top_p": 1.5}, "top_p"),
    ({**HELLO, "max_tokens": 0}, "max_tokens"),
    ({**HELLO, "max_tokens": "many"}, "max_tokens"),
    ({**HELLO, "max_tokens": True}, "max_tokens"),
    ({**HELLO, "stream": "yes"}, "stream"),
    ({**HELLO, "metadata": ["not", "an", "object"]}, "metadata"),
    ({**HELLO, "model": 42}, "model"),
])
async def test_invalid_parameters_are_422_naming_the_field(redis_url, body, param):
    async with running_relay(redis_url) as relay, relay.client() as client:
        iid, _ = await relay.register()  # offline: validation comes before routing
        response = await client.post(f"/api/chat/{iid}/chat/completions", json=body)
        error = assert_openai_error(response, 422, type_="invalid_request_error")
        assert error["param"] == param or error["param"].startswith(param + "."), error
        assert param.split(".")[-1] in error["message"]


@pytest.mark.slow
@pytest.mark.parametrize("raw", [b"{not json", b"", b'{"messages": [}', b"\xff\xfe"])
async def test_malformed_json_is_400(redis_url, raw):
    async with running_relay(redis_url) as relay, relay.client() as client:
        iid, _ = await relay.register()
        response = await client.post(f"/api/chat/{iid}", content=raw, headers={"content-type": "application/json"})
        assert_openai_error(response, 400, type_="invalid_request_error")


async def test_json_that_is_not_an_object_is_rejected(redis_url):
    async with running_relay(redis_url) as relay, relay.client() as client:
        iid, _ = await relay.register()
        for raw in (b"[]", b"42", b'"hi"', b"null"):
            response = await client.post(f"/api/chat/{iid}", content=raw)
            assert response.status_code in (400, 422), raw
            assert_openai_error(response, response.status_code, type_="invalid_request_error")


async def test_oversized_body_is_413(redis_url):
    async with running_relay(redis_url, max_body_bytes=1000) as relay, relay.client() as client:
        iid, _ = await relay.register()
        body = {"messages": [{"role": "user", "content": "x" * 2000}]}
        assert_openai_error(await client.post(f"/api/chat/{iid}", json=body), 413)


async def test_offline_instance_is_503(redis_url):
    async with running_relay(redis_url) as relay, relay.client() as client:
        iid, token = await relay.register()
        for path in PATHS:
            error = assert_openai_error(await client.post(f"/api/chat/{iid}{path}", json=HELLO), 503,
                                        code="instance_offline")
            assert "offline" in error["message"]
        # Connected, it answers; disconnected again, it is 503 again.
        async with running_agent(relay.url, token):
            assert (await client.post(f"/api/chat/{iid}", json={**HELLO, "stream": False})).status_code == 200

        async def offline():
            response = await client.post(f"/api/chat/{iid}", json=HELLO)
            return response.status_code == 503

        await wait_until(offline, timeout=10, what="instance offline after its agent stopped")


@pytest.mark.slow
@pytest.mark.parametrize("stream", [True, False])
async def test_upstream_failure_before_streaming_is_502(redis_url, stream):
    upstream = FakeUpstream(fail_status=500)
    async with stack(redis_url, upstream) as (relay, iid, agent, client):
        response = await client.post(f"/api/chat/{iid}", json={**HELLO, "stream": stream})
        error = assert_openai_error(response, 502, code="upstream_error")
        assert "fake failure" in error["message"]
        # The agent survives it.
        upstream.fail_status = None
        assert (await client.post(f"/api/chat/{iid}", json={**HELLO, "stream": False})).status_code == 200


@pytest.mark.slow
async def test_upstream_client_error_keeps_its_status(redis_url):
    upstream = FakeUpstream(fail_status=400)
    async with stack(redis_url, upstream) as (relay, iid, agent, client):
        response = await client.post(f"/api/chat/{iid}", json={**HELLO, "stream": False})
        assert_openai_error(response, 400)


async def test_error_mid_stream_is_an_sse_error_then_done(redis_url):
    upstream = FakeUpstream(chunks=10, error_after=3)
    async with stack(redis_url, upstream) as (relay, iid, agent, client):
        async with client.stream("POST", f"/api/chat/{iid}", json=HELLO) as response:
            assert response.status_code == 200  # the stream had begun
            events = await sse_lines(response)
        assert events[-1] == "[DONE]"
        error = orjson.loads(events[-2])
        assert set(error["error"]) == {"message", "type", "param", "code"}
        assert "fake mid-stream failure" in error["error"]["message"]
        assert text_of([orjson.loads(e) for e in events[:-2]]) == "w0 w1 w2 "


# -- instances API (the parts the chat paths rely on) ---------------------------------------


async def test_instance_goes_online_and_lists(redis_url):
    async with running_relay(redis_url) as relay, relay.client() as client:
        iid, token = await relay.register("mine")
        view = (await client.get(f"/api/instances/{iid}")).json()
        assert (view["status"], view["agents"]) == ("offline", 0)
        async with running_agent(relay.url, token):
            view = (await client.get(f"/api/instances/{iid}")).json()
            assert (view["status"], view["agents"], view["models"]) == ("online", 1, ["demo"])
            page = (await client.get("/api/instances", params={"status": "online"})).json()
            assert [v["instance_id"] for v in page["data"]] == [iid]
        # Deleting needs the owner's token.
        assert_openai_error(await client.delete(f"/api/instances/{iid}"), 401)
        assert_openai_error(await client.delete(f"/api/instances/{iid}", headers={"authorization": "Bearer nope"}),
                            403)
        response = await client.delete(f"/api/instances/{iid}", headers={"authorization": f"Bearer {token}"})
        assert response.status_code == 204
        assert_openai_error(await client.get(f"/api/instances/{iid}"), 404)


@pytest.mark.slow
async def test_messages_are_forwarded_as_sent(redis_url):
    # Explicit nulls and extra keys inside messages are the caller's business:
    # an assistant turn with tool_calls carries "content": null.
    upstream = FakeUpstream()
    messages = [
        {"role": "developer", "content": "rules", "name": "ops"},
        {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    async with stack(redis_url, upstream) as (relay, iid, agent, client):
        response = await client.post(f"/api/chat/{iid}", json={"messages": messages, "stream": False,
                                                                "logprobs": None, "n": 1})
        assert response.status_code == 200, response.text
    seen = upstream.requests[-1]
    assert seen["messages"] == messages
    assert seen["n"] == 1 and "logprobs" in seen and seen["logprobs"] is None


@pytest.mark.slow
@pytest.mark.parametrize("stream", [True, False])
async def test_client_gone_before_the_first_chunk_cancels_the_upstream_request(redis_url, stream):
    # The model takes long to start (or, without streaming, to finish); the
    # caller gives up first.  The relay must not wait for its own timeout to
    # tell the agent: the model should stop working for nobody at once.
    upstream = FakeUpstream(hang=True)
    async with stack(redis_url, upstream, max_concurrency=1, first_chunk_timeout=60) as (relay, iid, agent, client):
        caller = asyncio.create_task(client.post(f"/api/chat/{iid}", json={**HELLO, "stream": stream}))
        await wait_until(lambda: len(upstream.requests) == 1, timeout=15, what="the model to be busy with it")
        caller.cancel()  # the caller gives up, before any answer: its connection closes
        with pytest.raises(asyncio.CancelledError):
            await caller

        await wait_until(lambda: upstream.disconnects == 1, timeout=15, what="the agent to abort the upstream request")

        async def slot_free():
            return agent.status.inflight == 0 and not any(s.streams for s in relay.services.sessions.all())

        await wait_until(slot_free, timeout=15, what="the stream to be forgotten")


# -- listing over HTTP -------------------------------------------------------------------


@pytest.mark.slow
async def test_list_instances_over_http(redis_url):
    async with running_relay(redis_url) as relay, relay.client() as client:
        ids = [(await relay.register(f"n{i}"))[0] for i in range(5)]
        seen, cursor = [], ""
        for _ in range(10):
            page = (await client.get("/api/instances", params={"limit": 2, "cursor": cursor})).json()
            assert len(page["data"]) <= 2
            seen += [v["instance_id"] for v in page["data"]]
            if page["next_cursor"] is None:
                break
            cursor = page["next_cursor"]
        assert seen == ids
        # Empty parameters mean their defaults.
        response = await client.get("/api/instances?status=&limit=&cursor=")
        assert response.status_code == 200
        assert [v["instance_id"] for v in response.json()["data"]] == ids
        assert (await client.get("/api/instances?status=offline")).json()["data"][0]["status"] == "offline"
        assert (await client.get("/api/instances?status=online")).json() == {"data": [], "next_cursor": None}
        for query, param in [("status=sleeping", "status"), ("limit=abc", "limit"), ("limit=0", "limit"),
                             ("limit=100000", "limit"), ("cursor=abc", "cursor"), ("cursor=-1", "cursor")]:
            assert_openai_error(await client.get(f"/api/instances?{query}"), 422, param=param)


# -- misbehaving agents -------------------------------------------------------------------


def hello_frame(protocol: int = 1) -> str:
    return orjson.dumps({"type": "hello", "protocol": protocol, "agent_version": "test", "agent_id": "raw",
                         "models": ["raw-model"], "max_concurrency": 1}).decode()


async def test_agent_websocket_needs_a_token_in_the_header(redis_url):
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    async with running_relay(redis_url) as relay:
        _, token = await relay.register()
        ws_url = relay.url.replace("http://", "ws://") + "/api/agent/connect"
        for headers, url in [({}, ws_url), ({"Authorization": "Bearer ira_wrong"}, ws_url),
                             ({}, f"{ws_url}?token={token}")]:  # never a token in the URL
            with pytest.raises(InvalidStatus) as info:
                async with connect(url, additional_headers=headers):
                    pass
            assert info.value.response.status_code in (400, 401)


@pytest.mark.slow
@pytest.mark.parametrize("first, close_code", [
    (hello_frame(protocol=99), 4001),  # an agent too new (or old) for this relay
    ("garbage", 1002),
    ('{"type": "ping"}', 1002),  # anything but hello first
    (b"\x01\x00\x00\x00\x01data", 1002),
])
async def test_bad_handshakes_are_closed_with_a_reason(redis_url, first, close_code):
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async with running_relay(redis_url) as relay:
        _, token = await relay.register()
        ws_url = relay.url.replace("http://", "ws://") + "/api/agent/connect"
        async with connect(ws_url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            await ws.send(first)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == close_code
        assert ws.close_reason
        if close_code == 4001:
            assert "99" in ws.close_reason


@pytest.mark.slow
async def test_garbage_from_one_agent_harms_no_other_stream(redis_url):
    from websockets.asyncio.client import connect

    upstream = FakeUpstream(chunks=30, delay=0.01)
    async with stack(redis_url, upstream) as (relay, iid, agent, client):
        bad_iid, bad_token = await relay.register("bad")
        ws_url = relay.url.replace("http://", "ws://") + "/api/agent/connect"
        async with connect(ws_url, additional_headers={"Authorization": f"Bearer {bad_token}"}) as ws:
            await ws.send(hello_frame())
            welcome = orjson.loads(await ws.recv())
            assert welcome["type"] == "welcome" and welcome["instance_id"] == bad_iid

            async def good_stream():
                return await stream_text(client, f"/api/chat/{iid}", HELLO)

            good = asyncio.create_task(good_stream())
            # A request for the bad agent, then it answers with nonsense.
            bad = asyncio.create_task(client.post(f"/api/chat/{bad_iid}", json={**HELLO, "stream": False}))
            request = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            assert request["type"] == "request"
            await ws.send(b"\x09\x00\x00\x00\x01junk")  # unknown binary frame kind
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1002
            response = await asyncio.wait_for(bad, 10)
            assert_openai_error(response, 502)
            text, _ = await asyncio.wait_for(good, 30)
            assert text == "".join(f"w{i} " for i in range(30))
        view = (await client.get(f"/api/instances/{iid}")).json()
        assert view["status"] == "online"


async def test_stream_usage_chunk_when_asked(redis_url):
    async with stack(redis_url) as (relay, iid, agent, client):
        _, chunks = await stream_text(client, f"/api/chat/{iid}",
                                      {**HELLO, "stream_options": {"include_usage": True}})
        assert chunks[-1]["choices"] == []
        usage = chunks[-1]["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
        assert all("usage" not in c for c in chunks[:-1])
