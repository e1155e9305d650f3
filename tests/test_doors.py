"""Every client's door, end to end: the real relay, the real agent, real clients.

The per-instance URL with the OpenAI SDK's plain call (no ``stream``) and
with curl; the global ``/v1`` base URL with the SDK (sync and async) and
LangChain; images; SwiftChat's ``/api/converse``, ``/api/models``,
``/api/image`` and ``/api/upgrade`` read the way the SwiftChat app reads
them; and the errors each door answers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import struct
import zlib

import httpx
import orjson
import pytest
from openai import AsyncOpenAI, NotFoundError, OpenAI

import wire
from agent.demo_model import DemoBackend
from agent.upstream import OpenAIBackend
from tests.helpers import (
    FAKE_PNG,
    FakeUpstream,
    assert_openai_error,
    running_agent,
    running_relay,
    running_upstream,
)

pytestmark = pytest.mark.anyio

HI = [{"role": "user", "content": "hi there"}]
USAGE_START = b'\n{"inputTokens":'  # how the SwiftChat app finds the usage line


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextlib.asynccontextmanager
async def door_stack(redis_url, backend=None, **relay_settings):
    """Relay + instance + agent; yields (relay, instance id, agent token, caller key, http client)."""
    async with contextlib.AsyncExitStack() as stack:
        relay = await stack.enter_async_context(running_relay(redis_url, **relay_settings))
        instance_id, token = await relay.register("door-test")
        await stack.enter_async_context(running_agent(relay.url, token, backend or DemoBackend(rate=0)))
        client = await stack.enter_async_context(relay.client())
        created = await client.post(f"/api/instances/{instance_id}/keys", headers=bearer(token), json={"name": "k"})
        assert created.status_code == 201, created.text
        yield relay, instance_id, token, created.json()["key"], client


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]
    return width, height


def upstream_backend(upstream: FakeUpstream, image_models: list[str] | None = None) -> OpenAIBackend:
    return OpenAIBackend(upstream.url, models=[upstream.model], image_models=image_models)


# -- the per-instance URL: stream left out -----------------------------------------------


async def test_the_openai_sdk_plain_call_gets_a_chat_completion(redis_url):
    async with door_stack(redis_url) as (relay, iid, _, _, _):
        base = f"{relay.url}/api/chat/{iid}"
        sdk = AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
        async with sdk:
            reply = await sdk.chat.completions.create(model="demo", messages=HI)
            assert reply.object == "chat.completion"
            assert "You said: hi there." in reply.choices[0].message.content
            assert reply.usage.total_tokens > 0
            streamed = await sdk.chat.completions.create(model="demo", messages=HI, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in streamed if c.choices])
            assert text == reply.choices[0].message.content

        def sync_call():
            with OpenAI(base_url=base, api_key="unused", max_retries=0) as client:
                return client.chat.completions.create(model="demo", messages=HI)

        sync_reply = await asyncio.to_thread(sync_call)
        assert sync_reply.choices[0].message.content == reply.choices[0].message.content


@pytest.mark.slow
@pytest.mark.parametrize(("accept", "streams"), [
    (None, True), ("*/*", True), ("text/event-stream", True), ("application/json", False),
    ("application/json, text/plain, */*", False), ("application/json, text/event-stream", True),
    ("text/event-stream;q=0, application/json", False), ("text/event-stream;q=0.5, application/json", True),
])
async def test_accept_decides_when_stream_is_left_out(redis_url, accept, streams):
    async with door_stack(redis_url) as (_, iid, _, _, client):
        headers = {"accept": accept} if accept else {}
        client.headers.pop("accept", None)  # httpx sends */* unless told otherwise
        response = await client.post(f"/api/chat/{iid}", json={"messages": HI}, headers=headers)
        assert response.status_code == 200
        kind = response.headers["content-type"]
        if streams:
            assert kind.startswith("text/event-stream")
            assert response.text.endswith("data: [DONE]\n\n")
        else:
            assert kind.startswith("application/json")
            assert response.json()["object"] == "chat.completion"
        # An explicit ``stream`` always wins over the header.
        explicit = await client.post(f"/api/chat/{iid}", json={"messages": HI, "stream": not streams},
                                     headers=headers)
        assert explicit.headers["content-type"].startswith(
            "application/json" if streams else "text/event-stream")


async def test_curl_without_stream_gets_server_sent_events(redis_url):
    async with door_stack(redis_url) as (relay, iid, _, _, _):
        body = orjson.dumps({"messages": HI}).decode()
        process = await asyncio.create_subprocess_exec(
            "curl", "-sN", "-H", "Content-Type: application/json", "-d", body, f"{relay.url}/api/chat/{iid}",
            stdout=asyncio.subprocess.PIPE)
        out, _ = await process.communicate()
        assert process.returncode == 0
        events = [line[6:] for line in out.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert orjson.loads(events[0])["object"] == "chat.completion.chunk"


# -- an upstream 404 is not "instance not found" -------------------------------------------


@pytest.mark.slow
async def test_an_upstream_404_is_a_502_on_every_door(redis_url):
    upstream = FakeUpstream(fail_status=404)
    async with running_upstream(upstream), door_stack(redis_url, upstream_backend(upstream)) as (
            _, iid, _, key, client):
        for url, body in ((f"/api/chat/{iid}", {"messages": HI, "stream": False}),
                          (f"/api/chat/{iid}", {"messages": HI}),
                          ("/v1/chat/completions", {"model": iid, "messages": HI})):
            response = await client.post(url, json=body)
            assert_openai_error(response, 502, code="upstream_not_found")
            assert "fake failure" in response.json()["error"]["message"]
        converse = await client.post("/api/converse", headers=bearer(key),
                                     json={"modelId": "x", "messages": [{"role": "user", "content": [{"text": "q"}]}]})
        assert converse.status_code == 502 and converse.text.startswith("Error: ")


# -- the global /v1 base URL ---------------------------------------------------------------


async def test_v1_reaches_every_instance_by_model(redis_url):
    async with door_stack(redis_url) as (relay, iid, _, _, client):
        other_id, other_token = await relay.register("second")
        async with running_agent(relay.url, other_token, DemoBackend(rate=0, model="other-model")):
            sdk = AsyncOpenAI(base_url=f"{relay.url}/v1", api_key="anything", max_retries=0)
            async with sdk:
                for model in (iid, f"{iid}/demo"):
                    reply = await sdk.chat.completions.create(model=model, messages=HI)  # stream: false here
                    assert reply.object == "chat.completion" and reply.model == "demo"
                reply = await sdk.chat.completions.create(model=f"{other_id}/other-model", messages=HI)
                assert reply.model == "other-model"
                stream = await sdk.chat.completions.create(model=other_id, messages=HI, stream=True)
                chunks = [c async for c in stream]
                assert chunks and all(c.model == "other-model" for c in chunks)

                listed = await sdk.models.list()
                owners = {m.id: m.owned_by for m in listed.data}
                assert owners[f"{iid}/demo"] == "door-test"
                assert owners[f"{other_id}/other-model"] == "second"
                assert owners[f"{iid}/demo-image"] == "door-test"

                for missing in (f"{iid}/no-such-model", "0123456789abcdef", "gpt-4o", f"{other_id}/demo"):
                    with pytest.raises(NotFoundError) as caught:
                        await sdk.chat.completions.create(model=missing, messages=HI)
                    assert caught.value.code == "model_not_found", missing

        def sync_call():
            with OpenAI(base_url=f"{relay.url}/v1", api_key="anything", max_retries=0) as client:
                return client.chat.completions.create(model=iid, messages=HI)

        assert (await asyncio.to_thread(sync_call)).object == "chat.completion"


@pytest.mark.slow
async def test_v1_with_a_caller_key_takes_plain_model_names(redis_url):
    async with door_stack(redis_url) as (relay, iid, _, key, client):
        sdk = AsyncOpenAI(base_url=f"{relay.url}/v1", api_key=key, max_retries=0)
        async with sdk:
            listed = await sdk.models.list()
            assert [m.id for m in listed.data] == ["demo", "demo-image", "demo-transcribe"]
            assert {m.owned_by for m in listed.data} == {"door-test"}
            for model in ("demo", iid, f"{iid}/demo"):
                reply = await sdk.chat.completions.create(model=model, messages=HI)
                assert reply.model == "demo"
            with pytest.raises(NotFoundError):
                await sdk.chat.completions.create(model="not-served", messages=HI)
        # With the key, ``model`` may be left out altogether.
        response = await client.post("/v1/chat/completions", headers=bearer(key), json={"messages": HI})
        assert response.status_code == 200 and response.json()["object"] == "chat.completion"
        no_model = await client.post("/v1/chat/completions", json={"messages": HI})
        assert_openai_error(no_model, 422, param="model")
        not_text = await client.post("/v1/chat/completions", json={"model": 7, "messages": HI})
        assert_openai_error(not_text, 422, param="model")
        bad_json = await client.post("/v1/chat/completions", content=b"{not json",
                                     headers={"content-type": "application/json"})
        assert_openai_error(bad_json, 400)
        bad_body = await client.post("/v1/chat/completions", json={"model": iid, "messages": []})
        assert_openai_error(bad_body, 422, param="messages")


@pytest.mark.slow
async def test_v1_keeps_the_access_rules_and_limits(redis_url):
    async with door_stack(redis_url, rate_per_caller=3) as (relay, iid, token, key, client):
        patched = await client.patch(f"/api/instances/{iid}", headers=bearer(token), json={"visibility": "private"})
        assert patched.status_code == 200
        body = {"model": iid, "messages": HI}
        assert_openai_error(await client.post("/v1/chat/completions", json=body), 401, code="api_key_required")
        other_id, other_token = await relay.register("other")
        other_key = (await client.post(f"/api/instances/{other_id}/keys", headers=bearer(other_token),
                                       json={"name": "k"})).json()["key"]
        refused = await client.post("/v1/chat/completions", json=body, headers=bearer(other_key))
        assert_openai_error(refused, 403, code="key_not_for_instance")
        # A private instance is not listed to strangers, only to its key.
        public = (await client.get("/v1/models")).json()
        assert not any(m["id"].startswith(iid) for m in public["data"])
        assert (await client.get("/v1/models", headers=bearer(key))).json()["data"][0]["id"] == "demo"
        # The key's rate limit is one bucket, whichever door it comes through.
        assert (await client.post("/v1/chat/completions", json=body, headers=bearer(key))).status_code == 200
        assert (await client.post(f"/api/chat/{iid}", json={"messages": HI, "stream": False},
                                  headers=bearer(key))).status_code == 200
        assert (await client.post("/v1/chat/completions", json=body, headers=bearer(key))).status_code == 200
        limited = await client.post("/v1/chat/completions", json=body, headers=bearer(key))
        assert_openai_error(limited, 429)
        assert "retry-after" in limited.headers
        # Counted as chat requests like the per-instance door's (only /v1 answered 401, 403 and 429 here).
        metrics = (await client.get("/metrics")).text
        for status in ("401", "403", "429"):
            assert f'relay_requests_total{{endpoint="chat",status="{status}"}} 1.0' in metrics, status


async def test_v1_models_pages_through_online_public_instances(redis_url):
    async with door_stack(redis_url) as (relay, iid, _, _, client):
        second, token = await relay.register("second")
        async with running_agent(relay.url, token, DemoBackend(rate=0)):
            first_page = (await client.get("/v1/models", params={"limit": 1})).json()
            assert first_page["has_more"] is True and first_page["next_cursor"]
            assert {m["id"].split("/")[0] for m in first_page["data"]} == {iid}
            rest = (await client.get("/v1/models", params={"limit": 1, "after": first_page["next_cursor"]})).json()
            assert {m["id"].split("/")[0] for m in rest["data"]} == {second}
        for bad in ({"limit": 0}, {"limit": 501}, {"limit": "x"}, {"after": "-1"}, {"limit": "+5"}, {"limit": "1_0"},
                    {"limit": "\u0661\u0660"}):
            assert_openai_error(await client.get("/v1/models", params=bad), 422)


@pytest.mark.slow
async def test_langchain_chat_openai_on_the_global_url(redis_url):
    from langchain_openai import ChatOpenAI

    async with door_stack(redis_url) as (relay, iid, _, _, _):
        llm = ChatOpenAI(base_url=f"{relay.url}/v1", model=iid, api_key="unused", max_retries=0, timeout=30)
        answer = await llm.ainvoke("hello from langchain")
        assert "You said: hello from langchain." in answer.content
        pieces = [chunk.content async for chunk in llm.astream("streamed")]
        assert len(pieces) > 3 and "You said: streamed." in "".join(pieces)
        sync_answer = await asyncio.to_thread(llm.invoke, "sync call")
        assert "You said: sync call." in sync_answer.content


@pytest.mark.slow
async def test_the_seeds_message_forms_pass_through(redis_url):
    upstream = FakeUpstream(chunks=2)
    async with running_upstream(upstream), door_stack(redis_url, upstream_backend(upstream)) as (_, iid, _, _, client):
        messages = [
            {"role": "system", "content": "be brief", "name": "setup"},
            {"role": "user", "content": [{"type": "text", "text": "Describe this image"},
                                         {"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
        ]
        response = await client.post("/v1/chat/completions", json={
            "model": iid, "messages": messages, "temperature": 0.8, "top_p": 0.9, "max_tokens": 1024})
        assert response.status_code == 200, response.text
        sent = upstream.requests[-1]["messages"]
        assert sent[0] == {"role": "system", "content": "be brief", "name": "setup"}
        assert sent[1]["content"][1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        assert sent[2]["content"][0]["image_url"] == {"url": "https://x/y.png"}
        assert upstream.requests[-1]["top_p"] == 0.9 and upstream.requests[-1]["max_tokens"] == 1024


# -- images ----------------------------------------------------------------------------------


async def test_images_through_the_sdk_on_both_urls(redis_url):
    async with door_stack(redis_url) as (relay, iid, _, _, _):
        for base, model in ((f"{relay.url}/api/chat/{iid}", "demo-image"), (f"{relay.url}/v1", f"{iid}/demo-image"),
                            (f"{relay.url}/v1", iid)):
            sdk = AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
            async with sdk:
                made = await sdk.images.generate(model=model, prompt="a lighthouse", size="64x32", n=2)
                assert len(made.data) == 2
                assert png_size(base64.b64decode(made.data[0].b64_json)) == (64, 32)
                as_url = await sdk.images.generate(model=model, prompt="a lighthouse", size="16x16",
                                                   response_format="url")
                assert as_url.data[0].url.startswith("data:image/png;base64,")
                assert png_size(base64.b64decode(as_url.data[0].url.split(",", 1)[1])) == (16, 16)
        sdk = AsyncOpenAI(base_url=f"{relay.url}/v1", api_key="unused", max_retries=0)
        async with sdk:
            with pytest.raises(NotFoundError) as caught:
                await sdk.images.generate(model=f"{iid}/demo", prompt="chat models draw nothing")
            assert caught.value.code == "model_not_found"


@pytest.mark.slow
async def test_images_from_an_upstream_that_returns_a_png(redis_url):
    upstream = FakeUpstream()
    async with running_upstream(upstream), door_stack(redis_url, upstream_backend(upstream, ["painter"])) as (
            _, iid, _, key, client):
        response = await client.post(f"/api/chat/{iid}/images/generations",
                                     json={"prompt": "three dots", "model": "painter", "quality": "high"})
        assert response.status_code == 200, response.text
        assert base64.b64decode(response.json()["data"][0]["b64_json"]) == FAKE_PNG
        assert upstream.image_requests[-1]["prompt"] == "three dots"
        assert upstream.image_requests[-1]["quality"] == "high"  # unknown fields reach the model
        swift = await client.post("/api/image", headers=bearer(key),
                                  json={"prompt": "p", "modelId": "painter", "region": "us-west-2",
                                        "width": "1024", "height": "1024"})
        assert swift.status_code == 200 and base64.b64decode(swift.json()["image"]) == FAKE_PNG
        assert upstream.image_requests[-1]["size"] == "1024x1024"


@pytest.mark.slow
async def test_an_instance_that_cannot_draw_answers_501(redis_url):
    upstream = FakeUpstream()
    async with running_upstream(upstream), door_stack(redis_url, upstream_backend(upstream)) as (
            _, iid, _, key, client):
        for url, body in ((f"/api/chat/{iid}/images/generations", {"prompt": "p"}),
                          ("/v1/images/generations", {"prompt": "p", "model": iid})):
            assert_openai_error(await client.post(url, json=body), 501, code="capability_not_supported")
        swift = await client.post("/api/image", headers=bearer(key), json={"prompt": "p", "modelId": "x"})
        assert swift.status_code == 501
        assert swift.json()["code"] == "capability_not_supported" and "images" in swift.json()["error"]
        assert upstream.image_requests == []


@pytest.mark.slow
@pytest.mark.parametrize("body", [{}, {"prompt": ""}, {"prompt": "p", "n": 0}, {"prompt": "p", "n": "2"},
                                  {"prompt": "p", "size": "big"}, {"prompt": "p", "response_format": "gif"}])
async def test_bad_image_requests_are_422(redis_url, body):
    async with door_stack(redis_url) as (_, iid, _, _, client):
        assert_openai_error(await client.post(f"/api/chat/{iid}/images/generations", json=body), 422)


# -- SwiftChat -------------------------------------------------------------------------------


async def read_like_swiftchat(client: httpx.AsyncClient, key: str, body: dict) -> tuple[int, bytes, dict | None]:
    """Read ``/api/converse`` as the app does: text pieces, and a piece ending in the usage JSON."""
    text, usage = b"", None
    async with client.stream("POST", "/api/converse", json=body,
                             headers={**bearer(key), "accept": "*/*"}) as response:
        async for piece in response.aiter_raw():
            if piece.endswith(b"}") and USAGE_START in piece:
                index = piece.index(USAGE_START)
                text += piece[:index]
                usage = orjson.loads(piece[index + 1:])
            else:
                text += piece
    return response.status_code, text, usage


def converse_body(*blocks: dict, model: str = "anthropic.claude-3-5-sonnet-20240620-v1:0") -> dict:
    return {"messages": [{"role": "user", "content": list(blocks)}], "modelId": model, "region": "us-west-2"}


async def test_converse_streams_text_then_usage(redis_url):
    async with door_stack(redis_url) as (_, iid, _, key, client):
        status, text, usage = await read_like_swiftchat(client, key, converse_body({"text": "Hi"}))
        assert status == 200
        assert text.decode().startswith("Hello! I am the instance-relay demo model") and b"You said: Hi." in text
        assert usage is not None and list(usage) == ["inputTokens", "outputTokens", "totalTokens"]
        assert usage["totalTokens"] == usage["inputTokens"] + usage["outputTokens"] > 0
        # No key: the instance comes from modelId.
        body = converse_body({"text": "Hi"}, model=f"{iid}/demo")
        async with client.stream("POST", "/api/converse", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert USAGE_START in await response.aread()


@pytest.mark.slow
async def test_converse_blocks_reach_the_model_as_openai_messages(redis_url):
    upstream = FakeUpstream(chunks=3)
    async with running_upstream(upstream), door_stack(redis_url, upstream_backend(upstream)) as (
            _, _, _, key, client):
        image = base64.b64encode(FAKE_PNG).decode()
        note = base64.b64encode(b"line one\nline two").decode()
        body = converse_body({"text": "what is this?"}, {"image": {"format": "png", "source": {"bytes": image}}},
                             {"document": {"format": "txt", "name": "notes", "source": {"bytes": note}}})
        body["system"] = [{"text": "You are terse."}]
        status, text, usage = await read_like_swiftchat(client, key, body)
        assert status == 200 and text == b"w0 w1 w2 "
        assert usage == {"inputTokens": 1, "outputTokens": 3, "totalTokens": 4}  # the model's own counts
        sent = upstream.requests[-1]
        assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
        assert sent["model"] == "fake-model"  # a Bedrock id the instance does not serve: its default
        assert sent["messages"][0] == {"role": "system", "content": "You are terse."}
        parts = sent["messages"][1]["content"]
        assert parts[1] == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}
        assert "line one\nline two" in parts[2]["text"]


@pytest.mark.slow
async def test_converse_refusals_read_as_text(redis_url):
    async with door_stack(redis_url) as (_, _, _, key, client):
        pdf = converse_body({"text": "read"}, {"document": {"format": "pdf", "name": "a", "source": {"bytes": "AAAA"}}})
        for body, status in ((pdf, 422), ({"messages": [], "modelId": "x"}, 422), ({"modelId": "x"}, 422),
                             (converse_body({"text": "x"}, model="no-such-thing"), 404)):
            response = await client.post("/api/converse", json=body, headers=bearer(key) if status != 404 else {})
            assert response.status_code == status, response.text
            assert response.headers["content-type"].startswith("text/plain")
            assert response.text.startswith("Error: ")
        assert "pdf" in (await client.post("/api/converse", json=pdf, headers=bearer(key))).text


@pytest.mark.slow
async def test_converse_error_mid_stream_is_written_as_text(redis_url):
    upstream = FakeUpstream(chunks=6, error_after=2)
    async with running_upstream(upstream), door_stack(redis_url, upstream_backend(upstream)) as (
            _, _, _, key, client):
        status, text, usage = await read_like_swiftchat(client, key, converse_body({"text": "go"}))
        assert status == 200 and usage is None
        assert text.startswith(b"w0 w1 ") and b"Error: " in text


async def test_swiftchat_models_and_image(redis_url):
    async with door_stack(redis_url) as (_, iid, _, key, client):
        listed = await client.post("/api/models", headers=bearer(key), json={"region": "us-west-2"})
        assert listed.status_code == 200
        assert listed.json() == {"textModel": [{"modelId": "demo", "modelName": "demo"}],
                                 "imageModel": [{"modelId": "demo-image", "modelName": "demo-image"}]}
        public = (await client.post("/api/models", json={"region": "us-west-2"})).json()
        assert {"modelId": f"{iid}/demo", "modelName": "demo (door-test)"} in public["textModel"]
        made = await client.post("/api/image", headers=bearer(key), json={
            "prompt": "Beautiful countryside", "modelId": "demo-image", "region": "us-west-2",
            "width": "512", "height": "256"})
        assert made.status_code == 200, made.text
        assert png_size(base64.b64decode(made.json()["image"])) == (512, 256)
        for bad in ({"prompt": "p", "modelId": "demo-image", "width": "wide"},
                    {"prompt": "p", "modelId": "demo-image", "refImages": [{"format": "png"}]},
                    {"prompt": "", "modelId": "demo-image"}):
            refused = await client.post("/api/image", headers=bearer(key), json=bad)
            assert refused.status_code == 422 and isinstance(refused.json()["error"], str), refused.text
        stranger = await client.post("/api/image", json={"prompt": "p", "modelId": "stability.sd3"})
        assert stranger.status_code == 404 and stranger.json()["code"] == "model_not_found"


async def test_upgrade_says_what_the_relay_ships(redis_url):
    async with door_stack(redis_url) as (_, _, _, key, client):
        info = (await client.get("/api/upgrade")).json()
        assert info["version"] == wire.__version__ and info["needUpgrade"] is False
        assert info["protocol"] == {"latest": wire.PROTOCOL_VERSION, "oldest": min(wire.SUPPORTED_VERSIONS),
                                    "supported": sorted(wire.SUPPORTED_VERSIONS)}
        assert (await client.get("/api/upgrade", params={"version": "0.0.1"})).json()["needUpgrade"] is True
        assert (await client.get("/api/upgrade", params={"version": wire.__version__})).json()["needUpgrade"] is False
        # SwiftChat asks about its own app: the relay knows nothing of those releases.
        app = await client.post("/api/upgrade", headers=bearer(key), json={"os": "android", "version": "0.0.1"})
        assert app.json()["needUpgrade"] is False and app.json()["url"] == ""
        bad = await client.get("/api/upgrade", params={"version": "latest"})
        assert bad.status_code == 422 and bad.json()["code"] == "invalid_parameter"


# -- the relay's own failures ------------------------------------------------------------------


@pytest.mark.slow
async def test_an_answer_larger_than_the_relay_holds_is_502(redis_url):
    upstream = FakeUpstream(chunks=400)
    async with running_upstream(upstream), door_stack(redis_url, upstream_backend(upstream),
                                                      max_answer_bytes=1024) as (_, iid, _, _, client):
        response = await client.post("/v1/chat/completions", json={"model": iid, "messages": HI})
        assert_openai_error(response, 502, code="answer_too_large")
        streamed = await client.post(f"/api/chat/{iid}", json={"messages": HI})  # streams are not held
        assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")


async def test_a_bug_in_a_handler_is_a_500_in_openais_shape(redis_url, monkeypatch):
    import relay.doors.openai

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(relay.doors.openai, "check_chat_request", broken)
    async with door_stack(redis_url) as (_, iid, _, _, client):
        response = await client.post("/v1/chat/completions", json={"model": iid, "messages": HI})
        error = assert_openai_error(response, 500, code="internal_error")
        assert "a bug" not in error["message"]  # internals stay in the log


@pytest.mark.slow
async def test_agent_status_says_when_an_upgrade_is_available(redis_url):
    from agent.console import format_status
    from agent.registration import instance_status

    async with door_stack(redis_url) as (relay, iid, _, _, _):
        old = await instance_status(relay.url, iid, version="0.0.1")
        assert old["upgrade"] == wire.__version__
        assert f"relay-agent {wire.__version__} is available" in format_status(old)
        current = await instance_status(relay.url, iid, version=wire.__version__)
        assert "upgrade" not in current and "upgrade" not in format_status(current)


@pytest.mark.slow
async def test_every_door_reaches_an_agent_on_another_node(redis_url):
    async with running_relay(redis_url) as node_a, running_relay(redis_url) as node_b:
        iid, token = await node_a.register("far")
        async with running_agent(node_b.url, token, DemoBackend(rate=0)), node_a.client() as client:
            reply = await client.post("/v1/chat/completions", json={"model": f"{iid}/demo", "messages": HI})
            assert reply.status_code == 200 and reply.json()["object"] == "chat.completion"
            image = await client.post("/v1/images/generations",
                                      json={"model": f"{iid}/demo-image", "prompt": "far away", "size": "300x200"})
            assert image.status_code == 200, image.text
            assert png_size(base64.b64decode(image.json()["data"][0]["b64_json"])) == (300, 200)
            async with client.stream("POST", "/api/converse",
                                     json=converse_body({"text": "Hi"}, model=f"{iid}/demo")) as response:
                body = await response.aread()
            assert response.status_code == 200 and b"You said: Hi." in body and USAGE_START in body


class GarbledBackend(DemoBackend):
    """An agent's backend whose collected answers are not what the doors expect."""

    async def complete(self, body):
        return b"not json"

    async def images(self, body):
        return b"[1, 2]"


async def test_an_agent_that_answers_garbage_is_a_502_not_a_500(redis_url):
    async with door_stack(redis_url, GarbledBackend(rate=0)) as (_, iid, _, key, client):
        for url, body in ((f"/api/chat/{iid}/images/generations", {"prompt": "p", "response_format": "url"}),
                          (f"/api/chat/{iid}/chat-messages", {"query": "q", "user": "u"})):
            assert_openai_error(await client.post(url, json=body), 502, code="upstream_error")
        swift = await client.post("/api/image", headers=bearer(key), json={"prompt": "p", "modelId": "demo-image"})
        assert swift.status_code == 502 and swift.json()["code"] == "upstream_error"
