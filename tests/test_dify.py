"""The Dify chat-app API, driven as a Dify client drives it, against a real relay and agent.

Conversations are stored in the relay's Redis; these tests check what a client
sees (blocking and streaming turns, history, names, feedback, parameters),
that a conversation continues on another relay node, that concurrent turns
are all kept, and who may read what (SECURITY.md's conversation rules).
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import orjson
import pytest

from agent.upstream import OpenAIBackend
from relay.store import keys
from tests.helpers import (
    FakeUpstream,
    assert_openai_error,
    online,
    running_agent,
    running_relay,
    running_upstream,
    wait_until,
)

pytestmark = pytest.mark.anyio


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextlib.asynccontextmanager
async def dify_stack(redis_url, upstream: FakeUpstream | None = None, **relay_settings):
    """Relay + instance + agent on a recalling fake model; yields (relay, iid, token, key, client, upstream)."""
    upstream = upstream or FakeUpstream(chunks=2, recall=True)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(running_upstream(upstream))
        relay = await stack.enter_async_context(running_relay(redis_url, **relay_settings))
        iid, token = await relay.register("dify")
        backend = OpenAIBackend(upstream.url, models=[upstream.model])
        stack.push_async_callback(backend.aclose)
        await stack.enter_async_context(running_agent(relay.url, token, backend))
        client = await stack.enter_async_context(relay.client())
        made = await client.post(f"/api/instances/{iid}/keys", headers=bearer(token), json={"name": "dify"})
        yield relay, iid, token, made.json()["key"], client, upstream


async def blocking(client, base: str, headers: dict, query: str, conversation_id: str = "", user: str = "u1",
                   **extra) -> dict:
    response = await client.post(f"{base}/chat-messages", headers=headers, json={
        "query": query, "response_mode": "blocking", "conversation_id": conversation_id, "user": user,
        "inputs": {}, **extra})
    assert response.status_code == 200, response.text
    return response.json()


async def streaming(client, base: str, headers: dict, query: str, conversation_id: str = "",
                    user: str = "u1") -> list[dict]:
    async with client.stream("POST", f"{base}/chat-messages", headers=headers, json={
            "query": query, "response_mode": "streaming", "conversation_id": conversation_id, "user": user,
            "inputs": {}}) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    return [orjson.loads(line[6:]) for line in lines]


@pytest.mark.parametrize("base_kind", ["instance", "v1"])
async def test_a_three_turn_conversation_remembers(redis_url, base_kind):
    async with dify_stack(redis_url) as (_, iid, _, key, client, upstream):
        base = f"/api/chat/{iid}" if base_kind == "instance" else "/v1"
        headers = bearer(key)
        first = await blocking(client, base, headers, "my name is Ada")
        assert set(first) >= {"id", "answer", "conversation_id", "created_at", "message_id"}
        assert first["answer"].startswith("[1 asked, first my name is Ada]")
        cid = first["conversation_id"]

        events = await streaming(client, base, headers, "what about the weather?", cid)
        assert [e["event"] for e in events][-1] == "message_end"
        messages = [e for e in events if e["event"] == "message"]
        assert messages and all(e["conversation_id"] == cid and e["id"] == events[0]["id"] for e in messages)
        assert "".join(e["answer"] for e in messages).startswith("[2 asked, first my name is Ada]")
        assert isinstance(events[-1]["metadata"]["usage"], dict)

        third = await blocking(client, base, headers, "what is my name?", cid)
        assert third["conversation_id"] == cid
        assert "first my name is Ada" in third["answer"]  # the third answer depends on the first
        sent = upstream.requests[-1]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "user", "assistant", "user"]

        history = (await client.get(f"{base}/messages", headers=headers,
                                    params={"conversation_id": cid, "user": "u1", "limit": 2})).json()
        assert history["has_more"] is True and history["limit"] == 2
        assert [m["query"] for m in history["data"]] == ["what is my name?", "what about the weather?"]
        older = (await client.get(f"{base}/messages", headers=headers, params={
            "conversation_id": cid, "user": "u1", "first_id": history["data"][-1]["id"]})).json()
        assert [m["query"] for m in older["data"]] == ["my name is Ada"] and older["has_more"] is False
        assert older["data"][0]["answer"] == first["answer"] and older["data"][0]["status"] == "normal"


@pytest.mark.slow
async def test_list_rename_delete_and_feedback(redis_url):
    async with dify_stack(redis_url) as (_, iid, _, key, client, _):
        base, headers = f"/api/chat/{iid}", bearer(key)
        ids = [(await blocking(client, base, headers, f"topic {n}"))["conversation_id"] for n in range(3)]
        page = (await client.get(f"{base}/conversations", headers=headers, params={"user": "u1", "limit": 2})).json()
        assert [c["id"] for c in page["data"]] == [ids[2], ids[1]] and page["has_more"] is True
        assert page["data"][0]["name"] == "topic 2"
        rest = (await client.get(f"{base}/conversations", headers=headers,
                                 params={"user": "u1", "last_id": ids[1]})).json()
        assert [c["id"] for c in rest["data"]] == [ids[0]] and rest["has_more"] is False

        renamed = await client.post(f"{base}/conversations/{ids[0]}/name", headers=headers,
                                    json={"name": "Holiday plans", "user": "u1"})
        assert renamed.status_code == 200 and renamed.json()["result"] == "success"
        assert renamed.json()["name"] == "Holiday plans"

        message_id = (await client.get(f"{base}/messages", headers=headers,
                                       params={"conversation_id": ids[0], "user": "u1"})).json()["data"][0]["id"]
        for rating, seen in (("like", {"rating": "like"}), ("dislike", {"rating": "dislike"}), (None, None)):
            answer = await client.post(f"{base}/messages/{message_id}/feedbacks", headers=headers,
                                       json={"rating": rating, "user": "u1"})
            assert answer.json() == {"result": "success"}
            listed = (await client.get(f"{base}/messages", headers=headers,
                                       params={"conversation_id": ids[0], "user": "u1"})).json()["data"]
            assert listed[0]["feedback"] == seen

        deleted = await client.request("DELETE", f"{base}/conversations/{ids[0]}", headers=headers,
                                       json={"user": "u1"})
        assert deleted.json() == {"result": "success"}
        gone = await client.get(f"{base}/messages", headers=headers, params={"conversation_id": ids[0], "user": "u1"})
        assert_openai_error(gone, 404, code="conversation_not_found")
        again = await client.request("DELETE", f"{base}/conversations/{ids[0]}", headers=headers, json={"user": "u1"})
        assert_openai_error(again, 404, code="conversation_not_found")


async def test_parameters_and_inputs(redis_url):
    async with dify_stack(redis_url) as (_, iid, token, key, client, upstream):
        base, headers = f"/api/chat/{iid}", bearer(key)
        assert (await client.get(f"{base}/parameters", headers=headers)).json() == {"introduction": "",
                                                                                 "variables": []}
        variables = [{"key": "book", "name": "Book", "type": "string", "required": True},
                     {"key": "tone", "name": "Tone", "type": "select", "options": ["calm", "wild"], "default": "calm"}]
        patched = await client.patch(f"/api/instances/{iid}", headers=bearer(token),
                                     json={"introduction": "nice to meet you", "variables": variables})
        assert patched.status_code == 200, patched.text
        params = (await client.get(f"{base}/parameters", headers=headers, params={"user": "u1"})).json()
        assert params["introduction"] == "nice to meet you"
        assert [v["key"] for v in params["variables"]] == ["book", "tone"]

        missing = await client.post(f"{base}/chat-messages", headers=headers,
                                    json={"query": "hi", "user": "u1", "inputs": {}})
        assert_openai_error(missing, 422, code="input_required", param="inputs.book")
        wrong = await client.post(f"{base}/chat-messages", headers=headers,
                                  json={"query": "hi", "user": "u1", "inputs": {"book": "Emma", "tone": "loud"}})
        assert_openai_error(wrong, 422, param="inputs.tone")
        reply = await blocking(client, base, headers, "hi", inputs={"book": "Emma", "unknown": "dropped"})
        system = upstream.requests[-1]["messages"][0]
        assert system["role"] == "system" and "Book: Emma" in system["content"] and "Tone: calm" in system["content"]
        listed = (await client.get(f"{base}/conversations", headers=headers, params={"user": "u1"})).json()["data"]
        assert listed[0]["id"] == reply["conversation_id"] and listed[0]["inputs"] == {"book": "Emma", "tone": "calm"}

        bad = await client.patch(f"/api/instances/{iid}", headers=bearer(token),
                                 json={"variables": [{"key": "x", "type": "select"}]})
        assert_openai_error(bad, 422)
        off = await client.patch(f"/api/instances/{iid}", headers=bearer(token), json={"conversations": False})
        assert off.status_code == 200
        refused = await client.post(f"{base}/chat-messages", headers=headers,
                                    json={"query": "hi", "user": "u1", "inputs": {"book": "Emma"}})
        assert_openai_error(refused, 422, code="conversations_disabled")


@pytest.mark.slow
async def test_a_conversation_started_on_one_node_continues_on_the_other(redis_url):
    upstream = FakeUpstream(chunks=2, recall=True)
    async with running_upstream(upstream), running_relay(redis_url) as node_a, running_relay(redis_url) as node_b:
        iid, token = await node_a.register("two nodes")
        backend = OpenAIBackend(upstream.url, models=[upstream.model])
        async with running_agent(node_b.url, token, backend), node_a.client() as a, node_b.client() as b:
            first = await blocking(a, f"/api/chat/{iid}", {}, "remember Paris")
            second = await streaming(b, f"/api/chat/{iid}", {}, "and now?", first["conversation_id"])
            text = "".join(e.get("answer", "") for e in second if e["event"] == "message")
            assert text.startswith("[2 asked, first remember Paris]")
            history = (await a.get(f"/api/chat/{iid}/messages", params={
                "conversation_id": first["conversation_id"], "user": "u1"})).json()["data"]
            assert [m["query"] for m in history] == ["and now?", "remember Paris"]
        await backend.aclose()


@pytest.mark.slow
async def test_concurrent_turns_on_one_conversation_are_all_kept(redis_url):
    async with dify_stack(redis_url) as (_, iid, _, key, client, _):
        base, headers = f"/api/chat/{iid}", bearer(key)
        cid = (await blocking(client, base, headers, "start"))["conversation_id"]
        replies = await asyncio.gather(*(blocking(client, base, headers, f"q{n}", cid) for n in range(6)))
        assert len({r["message_id"] for r in replies}) == 6
        data = (await client.get(f"{base}/messages", headers=headers,
                                 params={"conversation_id": cid, "user": "u1", "limit": 100})).json()["data"]
        assert sorted(m["query"] for m in data) == sorted([f"q{n}" for n in range(6)] + ["start"])
        assert all(m["status"] == "normal" and m["answer"] for m in data)


async def test_who_may_read_what(redis_url):
    async with dify_stack(redis_url) as (relay, iid, token, key, client, _):
        base = f"/api/chat/{iid}"
        mine = await blocking(client, base, bearer(key), "my secret", user="alice")
        cid, mid = mine["conversation_id"], mine["message_id"]
        other_key = (await client.post(f"/api/instances/{iid}/keys", headers=bearer(token),
                                       json={"name": "stranger"})).json()["key"]
        strangers = [({}, "alice"), (bearer(other_key), "alice"), (bearer(key), "bob")]
        for headers, user in strangers:
            read = await client.get(f"{base}/messages", headers=headers, params={"conversation_id": cid, "user": user})
            assert_openai_error(read, 404, code="conversation_not_found")
            cont = await client.post(f"{base}/chat-messages", headers=headers,
                                     json={"query": "x", "user": user, "conversation_id": cid})
            assert_openai_error(cont, 404, code="conversation_not_found")
            assert_openai_error(await client.request("DELETE", f"{base}/conversations/{cid}", headers=headers,
                                                     json={"user": user}), 404)
            assert_openai_error(await client.post(f"{base}/conversations/{cid}/name", headers=headers,
                                                  json={"name": "mine now", "user": user}), 404)
            assert_openai_error(await client.post(f"{base}/messages/{mid}/feedbacks", headers=headers,
                                                  json={"rating": "like", "user": user}), 404)
            if headers:
                listed = (await client.get(f"{base}/conversations", headers=headers, params={"user": user})).json()
                assert listed["data"] == []
        # Anonymous callers: the id is the capability, and listing needs a key.
        anon = await blocking(client, base, {}, "no key here", user="carol")
        again = await blocking(client, base, {}, "still me", anon["conversation_id"], user="carol")
        assert again["conversation_id"] == anon["conversation_id"]
        assert_openai_error(await client.get(f"{base}/conversations", params={"user": "carol"}), 401,
                            code="api_key_required")
        assert_openai_error(await client.get("/v1/conversations", params={"user": "carol"}), 401,
                            code="api_key_required")
        # A private instance: nothing without its key.
        await client.patch(f"/api/instances/{iid}", headers=bearer(token), json={"visibility": "private"})
        assert_openai_error(await client.get(f"{base}/messages", params={
            "conversation_id": anon["conversation_id"], "user": "carol"}), 401)
        # The owner forgets everything; deleting the instance would too.
        purged = await client.request("DELETE", f"/api/instances/{iid}/conversations", headers=bearer(token))
        assert purged.status_code == 200 and purged.json()["deleted"] == 2
        assert_openai_error(await client.get(f"{base}/messages", headers=bearer(key),
                                             params={"conversation_id": cid, "user": "alice"}), 404)
        assert_openai_error(await client.request("DELETE", f"/api/instances/{iid}/conversations",
                                                 headers=bearer(key)), 403)  # a caller key owns nothing


@pytest.mark.slow
async def test_deleting_the_instance_deletes_its_conversations(redis_url, redis):
    async with dify_stack(redis_url) as (_, iid, token, key, client, _):
        await blocking(client, f"/api/chat/{iid}", bearer(key), "to be forgotten")
        assert [k async for k in redis.scan_iter(match=f"ir:conv:{{{iid}}}:*")]
        assert (await client.delete(f"/api/instances/{iid}", headers=bearer(token))).status_code == 204
        assert [k async for k in redis.scan_iter(match=f"ir:conv:{{{iid}}}:*")] == []


@pytest.mark.slow
async def test_a_conversation_expires_after_the_retention(redis_url):
    async with dify_stack(redis_url, conversation_retention=1) as (_, iid, _, key, client, _):
        base, headers = f"/api/chat/{iid}", bearer(key)
        cid = (await blocking(client, base, headers, "soon gone"))["conversation_id"]

        async def expired() -> bool:
            found = await client.get(f"{base}/messages", headers=headers, params={"conversation_id": cid, "user": "u1"})
            return found.status_code == 404

        await wait_until(expired, 15, what="the conversation expired")
        listed = (await client.get(f"{base}/conversations", headers=headers, params={"user": "u1"})).json()
        assert listed["data"] == []  # no ghost left in the list


@pytest.mark.slow
async def test_retention_is_a_ttl_on_every_key(redis_url, redis):
    async with dify_stack(redis_url, conversation_retention=3600) as (_, iid, _, key, client, _):
        await blocking(client, f"/api/chat/{iid}", bearer(key), "kept an hour")
        found = [k async for k in redis.scan_iter(match=f"ir:conv:{{{iid}}}:*")]
        assert found
        for name in found:
            assert 0 < await redis.pttl(name) <= 3600 * 1000, name


@pytest.mark.slow
async def test_a_failed_or_abandoned_answer_is_stored_as_such(redis_url):
    upstream = FakeUpstream(chunks=6, error_after=2, recall=True)
    async with dify_stack(redis_url, upstream) as (_, iid, _, key, client, _):
        base, headers = f"/api/chat/{iid}", bearer(key)
        events = await streaming(client, base, headers, "break please")
        assert events[-1]["event"] == "error" and events[-1]["status"] == 502
        assert events[-1]["error"]["type"] == "upstream_error"
        cid = events[0]["conversation_id"]
        stored = (await client.get(f"{base}/messages", headers=headers,
                                   params={"conversation_id": cid, "user": "u1"})).json()["data"][0]
        assert stored["status"] == "error" and stored["answer"] == "".join(
            e["answer"] for e in events if e["event"] == "message")


@pytest.mark.slow
async def test_bad_dify_requests(redis_url):
    async with dify_stack(redis_url, conversation_message_bytes=64) as (_, iid, _, key, client, _):
        base, headers = f"/api/chat/{iid}", bearer(key)
        for body, param in (({"query": "hi"}, "user"), ({"user": "u"}, "query"),
                            ({"query": "hi", "user": "u", "response_mode": "sometimes"}, "response_mode"),
                            ({"query": "hi", "user": "x" * 257}, "user"),
                            ({"query": "hi", "user": "u", "inputs": []}, "inputs")):
            assert_openai_error(await client.post(f"{base}/chat-messages", headers=headers, json=body), 422,
                                param=param)
        too_big = await client.post(f"{base}/chat-messages", headers=headers, json={"query": "q" * 65, "user": "u"})
        assert_openai_error(too_big, 422, code="message_too_large")
        unknown = await client.post(f"{base}/chat-messages", headers=headers,
                                    json={"query": "hi", "user": "u", "conversation_id": "not-a-uuid"})
        assert_openai_error(unknown, 404, code="conversation_not_found")
        assert_openai_error(await client.get(f"{base}/messages", headers=headers, params={"user": "u"}), 422,
                            param="conversation_id")
        assert_openai_error(await client.get(f"{base}/conversations", headers=headers,
                                             params={"user": "u", "limit": 101}), 422, param="limit")
        assert_openai_error(await client.post(f"{base}/messages/x/feedbacks", headers=headers,
                                              json={"rating": "meh", "user": "u"}), 422)
        assert_openai_error(await client.post("/api/chat/0000000000000000/chat-messages",
                                              json={"query": "hi", "user": "u"}), 404, code="instance_not_found")
        assert keys  # the key layout lives in one module


@pytest.mark.slow
async def test_audio_to_text_through_a_fake_upstream(redis_url):
    upstream = FakeUpstream()
    async with running_upstream(upstream), running_relay(redis_url) as relay, relay.client() as client:
        iid, token = await relay.register("ears")
        backend = OpenAIBackend(upstream.url, models=[upstream.model], transcribe_models=["whisper-1"])
        async with running_agent(relay.url, token, backend):
            key = (await client.post(f"/api/instances/{iid}/keys", headers=bearer(token),
                                     json={"name": "k"})).json()["key"]
            audio = b"ID3" + bytes(range(256)) * 4000  # about 1 MB, "mp3"
            for base, headers in ((f"/api/chat/{iid}", {}), ("/v1", bearer(key))):
                response = await client.post(f"{base}/audio-to-text", headers=headers,
                                             files={"file": ("note.mp3", audio, "audio/mp3")})
                assert response.status_code == 200, response.text
                assert response.json() == {"text": f"fake transcript of {len(audio)} bytes"}
            assert [t["size"] for t in upstream.transcriptions] == [len(audio)] * 2
            refused = await client.post(f"/api/chat/{iid}/audio-to-text",
                                        files={"file": ("notes.txt", b"hello", "text/plain")})
            assert_openai_error(refused, 415, code="unsupported_file_format")
        await backend.aclose()
        # An instance whose agents cannot transcribe.
        deaf = OpenAIBackend(upstream.url, models=[upstream.model])
        other, other_token = await relay.register("deaf")
        async with running_agent(relay.url, other_token, deaf):
            response = await client.post(f"/api/chat/{other}/audio-to-text",
                                         files={"file": ("a.wav", b"RIFF0000WAVE", "audio/wav")})
            assert_openai_error(response, 501, code="capability_not_supported")
        await deaf.aclose()


async def test_an_agent_may_suggest_the_parameters_and_the_owner_wins(redis_url):
    async with running_relay(redis_url) as relay, relay.client() as client:
        iid, token = await relay.register("suggested")
        suggestion = {"introduction": "Hi, I read books.", "variables": [{"key": "book", "required": True}]}
        async with running_agent(relay.url, token, parameters=suggestion):
            params = (await client.get(f"/api/chat/{iid}/parameters")).json()
            assert params["introduction"] == "Hi, I read books." and params["variables"][0]["key"] == "book"
            refused = await client.post(f"/api/chat/{iid}/chat-messages", json={"query": "hi", "user": "u"})
            assert_openai_error(refused, 422, code="input_required")
            await client.patch(f"/api/instances/{iid}", headers=bearer(token),
                               json={"introduction": "The owner speaks.", "variables": []})
            params = (await client.get(f"/api/chat/{iid}/parameters")).json()
            assert params == {"introduction": "The owner speaks.", "variables": []}
        other, other_token = await relay.register("bad suggestion")
        bad = {"variables": [{"key": "no spaces allowed"}], "introduction": 7}
        async with running_agent(relay.url, other_token, parameters=bad) as agent:
            assert agent.status.connected  # a bad suggestion is dropped, not a reason to refuse the agent
            params = (await client.get(f"/api/chat/{other}/parameters")).json()
            assert params == {"introduction": "", "variables": []}
            reply = await client.post(f"/api/chat/{other}/chat-messages", json={"query": "hi", "user": "u"})
            assert reply.status_code == 200


@pytest.mark.slow
async def test_a_node_that_dies_mid_answer_leaves_the_question_and_what_was_saved(redis_url):
    """kill -9 the node streaming a turn: the other node reads the turn back as interrupted, answer so far kept."""
    from tests.cluster import Cluster, register

    upstream = FakeUpstream(chunks=10, hold_after=2, recall=True)
    env = {"RELAY_CONVERSATION_CHECKPOINT_INTERVAL": "0.2", "RELAY_REDIS_TIMEOUT": "1"}
    async with running_upstream(upstream), Cluster(redis_url) as cluster, httpx.AsyncClient(timeout=30) as client:
        node_a, node_b = await cluster.nodes("node-a", "node-b", **env)
        iid, token = await register(node_a.url)
        agent = cluster.agent(node_b.url, token, "--backend", "openai", "--upstream-url", upstream.url)
        await agent.wait_for_line("connected to")
        await wait_until(lambda: online(node_a.url, iid), what="the instance online")
        seen: list[dict] = []

        async def turn() -> None:
            async with client.stream("POST", f"{node_a.url}/api/chat/{iid}/chat-messages", json={
                    "query": "long story", "response_mode": "streaming", "user": "u1"}) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        seen.append(orjson.loads(line[6:]))

        streaming_turn = asyncio.create_task(turn())
        words = "[1 asked, first long story]-w0 [1 asked, first long story]-w1 "
        await wait_until(lambda: "".join(e.get("answer", "") for e in seen) == words, what="two words streamed")
        cid = seen[0]["conversation_id"]

        async def latest(status: str) -> dict | None:
            data = (await client.get(f"{node_b.url}/api/chat/{iid}/messages",
                                     params={"conversation_id": cid, "user": "u1"})).json()["data"]
            return data[0] if data and data[0]["answer"] == words and data[0]["status"] == status else None

        await wait_until(lambda: latest("answering"), what="a checkpoint of the partial answer")
        node_a.kill()  # SIGKILL: no finish, no goodbye
        with contextlib.suppress(httpx.HTTPError):
            await streaming_turn
        message = await wait_until(lambda: latest("interrupted"), 20, what="the turn read back as interrupted")
        assert message["query"] == "long story"
        upstream.release()


@pytest.mark.slow
async def test_a_refused_turn_leaves_nothing_behind(redis_url):
    # A 429 invites a retry: the turn it refused must not count towards conversation_full later.
    upstream = FakeUpstream(chunks=4, hold_after=1, recall=True)
    async with dify_stack(redis_url, upstream, max_streams_per_caller=1) as (_, iid, _, key, client, _):
        base, headers = f"/api/chat/{iid}", bearer(key)
        held = asyncio.create_task(streaming(client, base, headers, "held"))
        await wait_until(lambda: upstream.inflight == 1, what="one stream holding the caller's only slot")
        refused = await client.post(f"{base}/chat-messages", headers=headers,
                                    json={"query": "one more", "user": "u1", "response_mode": "blocking"})
        assert_openai_error(refused, 429, code="too_many_streams")
        listed = (await client.get(f"{base}/conversations", headers=headers, params={"user": "u1"})).json()["data"]
        assert [c["name"] for c in listed] == ["held"]
        upstream.release()
        await held


@pytest.mark.slow
async def test_a_turn_waiting_for_its_first_token_is_saved_as_alive(redis_url, redis):
    # The model thinks before its first token: the turn must keep reading as answering, not interrupted.
    upstream = FakeUpstream(chunks=2, gate=2, recall=True)  # holds a lone stream before its first chunk
    async with dify_stack(redis_url, upstream, conversation_checkpoint_interval=0.05) as (_, iid, _, key, client, _):
        turn = asyncio.create_task(streaming(client, f"/api/chat/{iid}", bearer(key), "think first"))
        await wait_until(lambda: upstream.inflight == 1, what="the model holding its first token")
        saves: list[bytes] = []

        async def saved_twice() -> bool:
            for name in await redis.keys(f"ir:conv:{{{iid}}}:m:*"):
                fields = await redis.hgetall(name)
                saves.extend(v for k, v in fields.items() if k.endswith(b":r") and v not in saves)
            return len(saves) >= 3  # the reservation, then two checkpoints before any token

        await wait_until(saved_twice, what="checkpoints while waiting for the first token")
        upstream.gate = 0
        upstream._gate_open.set()
        events = await turn
        assert events[-1]["event"] == "message_end"
