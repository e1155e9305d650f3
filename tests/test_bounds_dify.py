"""Bounds of the Dify door (issue 21, rows A, F, H): what a caller or an agent can make it keep.

A: an agent streaming an endless answer into a streaming turn: the node keeps at
most the storage clip of it (the caller still reads all of it), so its memory
stays flat.  F: turns refused before an agent took them (offline, at capacity)
store nothing.  H: an instance's stored conversations are bounded in number and
bytes, across nodes, and an anonymous caller's per-user bound holds per client
address too; one caller (key, or address) holds at most its share of the bytes.
Each runs a real ``relay serve`` process and watches its RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

import wire
from relay.errors import ValidationFailed
from relay.store import keys
from relay.store.conversations import Bounds, ConversationStore, Scope
from tests.bounds import MiB, Node, relay_process
from tests.helpers import assert_openai_error, wait_until
from tests.test_hostile_agent import RawAgent, chunk, raw_agent

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CLIP = 256 * 1024  # RELAY_CONVERSATION_MESSAGE_BYTES, the default
NO_RATES = {"RELAY_RATE_PER_CALLER": "0", "RELAY_RATE_PER_INSTANCE": "0"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def turn(client: httpx.AsyncClient, iid: str, query: str, conversation_id: str = "", user: str = "u1",
               headers: dict[str, str] | None = None) -> httpx.Response:
    return await client.post(f"/api/chat/{iid}/chat-messages", headers=headers or {}, json={
        "query": query, "response_mode": "blocking", "conversation_id": conversation_id, "user": user})


async def messages(client: httpx.AsyncClient, iid: str, cid: str, user: str = "u1",
                   headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    found = await client.get(f"/api/chat/{iid}/messages", headers=headers or {},
                             params={"conversation_id": cid, "user": user, "limit": 100})
    assert found.status_code == 200, found.text
    return list(found.json()["data"])


async def conversation_keys(redis: Redis, iid: str) -> set[bytes]:
    return {k async for k in redis.scan_iter(match=f"ir:conv:{{{iid}}}:*")}


@contextlib.asynccontextmanager
async def answering_agent(node: Node, token: str, *, concurrency: int = 4, hold: asyncio.Event | None = None,
                          asked: asyncio.Event | None = None) -> AsyncIterator[RawAgent]:
    """A raw agent answering every request with one short chunk (blocking: one JSON body).

    ``hold``: the first request is left unanswered until it is set (the agent's
    slot stays taken); ``asked`` is set when that request arrived.
    """
    hello = wire.Hello(wire.PROTOCOL_VERSION, "raw", "raw", ("raw-model",), concurrency)
    async with raw_agent(node.url, token, hello_event=hello) as agent:
        held = hold is not None

        async def answer(request: wire.Request, wait: asyncio.Event | None) -> None:
            if wait is not None:
                await wait.wait()
            if request.stream:
                await agent.send(wire.encode_data(request.id, chunk("fine")))
            else:
                await agent.send(wire.encode_data(request.id, orjson.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": "raw-model",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                                 "finish_reason": "stop"}]})))
            await agent.send(wire.encode(wire.End(request.id)))

        async def serve() -> None:
            nonlocal held
            tasks = set()
            with contextlib.suppress(Exception):
                while True:
                    event = wire.decode(await agent.ws.recv())
                    if type(event) is wire.Request:
                        task = asyncio.create_task(answer(event, hold if held else None))
                        if held and asked is not None:
                            asked.set()
                        held = False
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)

        server = asyncio.create_task(serve())
        try:
            yield agent
        finally:
            server.cancel()


# -- A: an endless streamed answer -------------------------------------------------------------------


async def test_an_endless_streamed_answer_is_stored_clipped_and_the_node_stays_flat(redis_url, redis):
    """A raw agent streams 200 MB of answer into a streaming turn, respecting credit, while the caller reads.

    The caller gets every byte; the node keeps at most the clip of it for storage
    (each checkpoint O(clip)): its RSS grows by less than 40 MiB; the stored
    answer is the first 256 KiB, cut on a character boundary and marked truncated.
    """
    total = 200 * 1000 * 1000
    text = "ab€" * 12_000  # 60,000 bytes of UTF-8; the clip falls inside a "€"
    piece = chunk(text)
    async with relay_process(redis_url, **NO_RATES) as node:
        iid, token = await node.register("endless")
        async with raw_agent(node.url, token) as agent, node.client(timeout=120) as client:
            received = 0
            first: dict[str, Any] = {}
            last: dict[str, Any] = {}

            async def read() -> None:
                nonlocal received
                async with client.stream("POST", f"/api/chat/{iid}/chat-messages", json={
                        "query": "tell me everything", "response_mode": "streaming", "user": "u1"}) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            event = orjson.loads(line[6:])
                            first.setdefault("event", event)
                            last.update(event)
                            received += len(event.get("answer", "").encode())

            caller = asyncio.create_task(read())
            request = await agent.next_event(wire.Request)
            window = wire.SendWindow(request.window)
            credit = asyncio.Event()

            async def credits() -> None:
                with contextlib.suppress(Exception):
                    while True:
                        event = wire.decode(await agent.ws.recv())
                        if type(event) is wire.Credit:
                            window.grant(event.amount)
                            credit.set()

            reader = asyncio.create_task(credits())
            sent = 0
            async with node.watch() as watch:
                while sent < total:
                    while not window.can_send:
                        credit.clear()
                        await credit.wait()
                    await agent.send(wire.encode_data(request.id, piece))
                    window.sent(len(piece))
                    sent += len(text.encode())
                await agent.send(wire.encode(wire.End(request.id)))
                await caller
            reader.cancel()
            watch.assert_within(40 * MiB, f"a {sent // 1_000_000} MB streamed Dify answer")
            assert received == sent and last["event"] == "message_end"  # the caller read all of it

            cid = first["event"]["conversation_id"]
            stored = (await messages(client, iid, cid))[0]
            assert stored["status"] == "normal" and stored["truncated"] is True
            kept = stored["answer"].encode()
            assert CLIP - 3 <= len(kept) <= CLIP and (text * 5).startswith(stored["answer"])
            raw = await redis.hget(keys.conversation_sizes(iid), cid)
            assert raw is not None and int(raw) < CLIP + 1024  # what the instance's byte bound counts


# -- F: refused turns leave nothing ----------------------------------------------------------------------


async def test_turns_refused_at_capacity_or_offline_store_nothing(redis_url, redis):
    """Three turns on a conversation while its instance is at capacity, three more while it is offline.

    Each is a 503 with Retry-After where the pick says so, and none leaves a
    message, a conversation, or a changed counter (the API and Redis agree).
    """
    async with relay_process(redis_url, **NO_RATES) as node, node.client() as client:
        iid, token = await node.register("refusals")
        hold, asked = asyncio.Event(), asyncio.Event()
        async with node.watch() as watch:
            async with answering_agent(node, token, concurrency=1):
                made = await turn(client, iid, "hello")
                assert made.status_code == 200, made.text
                cid = made.json()["conversation_id"]
                conv, sizes = keys.conversation(iid, cid), keys.conversation_sizes(iid)

                async def snapshot() -> tuple[Any, ...]:
                    return (await conversation_keys(redis, iid), await redis.hget(conv, "seq"),
                            await redis.hget(conv, "updated_at"), await redis.hgetall(sizes),
                            await redis.zrange(keys.instance_conversations(iid), 0, -1, withscores=True),
                            len(await messages(client, iid, cid)))

                before = await snapshot()
                assert before[-1] == 1
            # A raw agent of concurrency 1 whose only slot a plain chat holds.
            async with answering_agent(node, token, concurrency=1, hold=hold, asked=asked):
                held = asyncio.create_task(client.post(f"/api/chat/{iid}", json={
                    "messages": [{"role": "user", "content": "hold"}], "stream": False}))
                await asyncio.wait_for(asked.wait(), 30)  # the agent's only slot is taken
                for n in range(3):
                    refused = await turn(client, iid, f"at capacity {n}", cid)
                    assert_openai_error(refused, 503, code="instance_at_capacity")
                    assert refused.headers["retry-after"] == "1"
                new = await turn(client, iid, "a new conversation at capacity")
                assert_openai_error(new, 503, code="instance_at_capacity")
                assert await snapshot() == before
                hold.set()
                assert (await held).status_code == 200
            await wait_until(lambda: _offline(client, iid), what="the instance offline")
            for n in range(3):
                refused = await turn(client, iid, f"offline {n}", cid)
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "instance_offline"
            assert await snapshot() == before
        watch.assert_within(20 * MiB, "six refused Dify turns")


async def _offline(client: httpx.AsyncClient, iid: str) -> bool:
    return bool((await client.get(f"/api/instances/{iid}")).json()["status"] == "offline")


# -- H: an instance's stored conversations --------------------------------------------------------------


async def test_an_instance_keeps_a_bounded_number_of_conversations(redis_url, redis):
    """Anonymous turns each with a new ``user``, then keyed ones, past the instance's bound of 12.

    Anonymous callers are held to the per-user bound (4) per client address;
    past the instance's bound every new conversation is 422
    ``instance_conversations_full`` and the instance's keys stop growing, while
    existing conversations continue; deleting one makes room again.
    """
    env = {**NO_RATES, "RELAY_CONVERSATIONS_PER_INSTANCE": "12", "RELAY_CONVERSATIONS_PER_USER": "4"}
    async with relay_process(redis_url, **env) as node, node.client() as client:
        iid, token = await node.register("popular")
        key = (await client.post(f"/api/instances/{iid}/keys", headers=bearer(token),
                                 json={"name": "app"})).json()["key"]
        async with answering_agent(node, token), node.watch() as watch:
            anonymous = [await turn(client, iid, "hi", user=f"visitor{n}") for n in range(6)]
            assert [r.status_code for r in anonymous] == [200] * 4 + [422] * 2
            assert_openai_error(anonymous[-1], 422, code="too_many_conversations")
            keyed = [await turn(client, iid, "hi", user=f"member{n}", headers=bearer(key)) for n in range(10)]
            assert [r.status_code for r in keyed] == [200] * 8 + [422] * 2
            assert_openai_error(keyed[-1], 422, code="instance_conversations_full")
            assert await redis.zcard(keys.instance_conversations(iid)) == 12

            stored = await conversation_keys(redis, iid)
            for n in range(50):  # a flood of new users, keyed and not: refused, nothing more stored
                refused = await turn(client, iid, "more", user=f"flood{n}", headers=bearer(key) if n % 2 else None)
                assert refused.status_code == 422
            assert await conversation_keys(redis, iid) == stored

            # Existing conversations continue.
            cid = keyed[0].json()["conversation_id"]
            more = await turn(client, iid, "still here?", cid, user="member0", headers=bearer(key))
            assert more.status_code == 200, more.text
            assert len(await messages(client, iid, cid, "member0", bearer(key))) == 2

            # A deleted conversation gives its place back.
            gone = await client.request("DELETE", f"/api/chat/{iid}/conversations/{cid}",
                                        headers=bearer(key), json={"user": "member0"})
            assert gone.status_code == 200
            assert (await turn(client, iid, "room again", user="late", headers=bearer(key))).status_code == 200
        watch.assert_within(20 * MiB, "76 Dify turns past the instance's conversation bound")


async def test_an_instance_keeps_a_bounded_number_of_bytes(redis_url, redis):
    """Queries of 4 KiB past an instance bound of 16 KiB: then every turn is 422, new or not, until room is made."""
    env = {**NO_RATES, "RELAY_CONVERSATION_BYTES_PER_INSTANCE": str(16 * 1024)}
    async with relay_process(redis_url, **env) as node, node.client() as client:
        iid, token = await node.register("wordy")
        async with answering_agent(node, token), node.watch() as watch:
            made = [await turn(client, iid, "q" * 4096, user=f"u{n}") for n in range(6)]
            assert [r.status_code for r in made] == [200] * 4 + [422] * 2
            assert_openai_error(made[-1], 422, code="instance_conversations_full")
            total = int(await redis.hget(keys.conversation_sizes(iid), "total") or 0)
            assert 16 * 1024 <= total < 16 * 1024 + 4 * 1024  # one turn may pass it, no more
            cid = made[0].json()["conversation_id"]
            assert_openai_error(await turn(client, iid, "and?", cid, user="u0"), 422,
                                code="instance_conversations_full")
            gone = await client.request("DELETE", f"/api/chat/{iid}/conversations/{cid}", json={"user": "u0"})
            assert gone.status_code == 200
            assert int(await redis.hget(keys.conversation_sizes(iid), "total") or 0) < total - 4096
            again = await turn(client, iid, "room again", made[1].json()["conversation_id"], user="u1")
            assert again.status_code == 200, again.text
        watch.assert_within(20 * MiB, "Dify turns past the instance's byte bound")


async def test_one_caller_holds_a_bounded_share_of_the_instance_bytes(redis_url, redis):
    """Anonymous queries of 4 KiB past a caller's share of 16 KiB: that caller's turns are 422
    ``caller_conversations_full``, two keyed callers go on storing; deleting gives the share back."""
    env = {**NO_RATES, "RELAY_CONVERSATION_BYTES_PER_CALLER": str(16 * 1024)}
    async with relay_process(redis_url, **env) as node, node.client() as client:
        iid, token = await node.register("shared")
        members = [(await client.post(f"/api/instances/{iid}/keys", headers=bearer(token),
                                      json={"name": f"app{n}"})).json()["key"] for n in range(2)]
        async with answering_agent(node, token), node.watch() as watch:
            made = [await turn(client, iid, "q" * 4096, user=f"u{n}") for n in range(6)]
            assert [r.status_code for r in made] == [200] * 4 + [422] * 2
            assert_openai_error(made[-1], 422, code="caller_conversations_full")
            assert "delete" in made[-1].json()["error"]["message"]
            cid = made[0].json()["conversation_id"]
            assert_openai_error(await turn(client, iid, "and?", cid, user="u0"), 422,
                                code="caller_conversations_full")
            shares = await assert_accounted(redis, iid)
            (anonymous,) = shares.values()
            assert 16 * 1024 <= anonymous < 16 * 1024 + 4 * 1024  # one turn may pass it, no more

            for key in members:  # other callers are untouched, past the anonymous caller's share
                mine = [await turn(client, iid, "k" * 4096, user=f"m{n}", headers=bearer(key)) for n in range(3)]
                assert [r.status_code for r in mine] == [200] * 3, mine[-1].text
                more = await turn(client, iid, "and?", mine[0].json()["conversation_id"], user="m0",
                                  headers=bearer(key))
                assert more.status_code == 200, more.text
            shares = await assert_accounted(redis, iid)
            assert len(shares) == 3 and sorted(shares.values())[:2] > [12 * 1024] * 2

            stored = await conversation_keys(redis, iid)
            for n in range(50):  # the anonymous caller keeps trying: refused, nothing more stored
                assert (await turn(client, iid, "q" * 4096, user=f"flood{n}")).status_code == 422
            assert await conversation_keys(redis, iid) == stored

            gone = await client.request("DELETE", f"/api/chat/{iid}/conversations/{cid}", json={"user": "u0"})
            assert gone.status_code == 200
            after = await assert_accounted(redis, iid)
            assert min(after.values()) < anonymous - 4096  # its share given back
            again = await turn(client, iid, "room again", made[1].json()["conversation_id"], user="u1")
            assert again.status_code == 200, again.text
        watch.assert_within(20 * MiB, "Dify turns past one caller's share of the instance's bytes")


# -- H, in the store: the accounting comes back --------------------------------------------------------------


INSTANCE = "bounds1"


def store_for(redis: Redis, **overrides: Any) -> ConversationStore:
    settings: dict[str, Any] = dict(retention_seconds=3600, max_messages=50, max_conversations=3,
                                    max_message_bytes=1000, stale_after=30.0)
    settings.update(overrides)
    return ConversationStore(redis, **settings)


async def assert_accounted(redis: Redis, iid: str) -> dict[bytes, int]:
    """The sizes hash adds up: ``total`` is the sum of the conversations' bytes, and each
    caller's ``o:`` sum that of the conversations whose ``w:`` names it (no other left).
    Returns the callers' sums."""
    fields = await redis.hgetall(keys.conversation_sizes(iid))
    if not fields:
        return {}
    sizes = {k: int(v) for k, v in fields.items() if k != b"total" and b":" not in k}
    owners = {k[2:]: v for k, v in fields.items() if k.startswith(b"w:")}
    shares: dict[bytes, int] = {}
    for cid, who in owners.items():
        shares[who] = shares.get(who, 0) + sizes[cid]
    assert int(fields[b"total"]) == sum(sizes.values())
    assert {k[2:]: int(v) for k, v in fields.items() if k.startswith(b"o:")} == shares
    return shares


async def test_the_instance_accounting_comes_back_from_expiry_deletion_and_purge(redis):
    """Counts and bytes of conversations that expired, were deleted or purged are given back, exactly."""
    store = store_for(redis)
    bounds = Bounds(conversations=4, bytes=0)
    sizes = keys.conversation_sizes(INSTANCE)
    made = []
    for n in range(4):
        scope = Scope(INSTANCE, "anon", f"u{n}")
        started = await store.start_turn(scope, None, f"q{n}", {}, 1000.0 + n, bounds)
        await store.checkpoint(started, "partial " * 10, 1000.5 + n)
        await store.finish(started, "answer " * 20, "normal", 1001.0 + n)
        made.append(started)
    await assert_accounted(redis, INSTANCE)
    with pytest.raises(ValidationFailed) as exc:
        await store.start_turn(Scope(INSTANCE, "anon", "late"), None, "q", {}, 1010.0, bounds)
    assert exc.value.code == "instance_conversations_full"

    # Expired: the keys gone (as Redis would drop them), the instance index still naming it.
    first = made[0]
    mids = await redis.zrange(keys.conversation_order(INSTANCE, first.conversation_id), 0, -1)
    await redis.delete(keys.conversation(INSTANCE, first.conversation_id),
                       keys.conversation_messages(INSTANCE, first.conversation_id),
                       keys.conversation_order(INSTANCE, first.conversation_id),
                       *(keys.message_conversation(INSTANCE, m.decode()) for m in mids))
    late = await store.start_turn(Scope(INSTANCE, "anon", "late"), None, "q", {}, 1011.0, bounds)
    assert first.conversation_id.encode() not in await redis.hgetall(sizes)
    await assert_accounted(redis, INSTANCE)

    await store.delete(made[1].scope, made[1].conversation_id)
    assert made[1].conversation_id.encode() not in await redis.hgetall(sizes)
    await store.start_turn(Scope(INSTANCE, "anon", "later"), None, "q", {}, 1012.0, bounds)

    assert await store.purge_instance(INSTANCE) == 4
    assert await redis.exists(sizes) == 0 and await redis.zcard(keys.instance_conversations(INSTANCE)) == 0
    assert late.conversation_id


async def test_anonymous_conversations_are_bounded_per_address_not_only_per_user(redis):
    store = store_for(redis)
    here, there = Bounds(address="198.51.100.7"), Bounds(address="203.0.113.9")
    for n in range(3):
        await store.start_turn(Scope(INSTANCE, "anon", f"user{n}"), None, "q", {}, 1000.0 + n, here)
    with pytest.raises(ValidationFailed) as exc:
        await store.start_turn(Scope(INSTANCE, "anon", "user9"), None, "q", {}, 1005.0, here)
    assert exc.value.code == "too_many_conversations"
    await store.start_turn(Scope(INSTANCE, "anon", "user9"), None, "q", {}, 1006.0, there)  # another address


async def test_a_prepared_turn_stores_nothing_until_reserved(redis):
    store = store_for(redis)
    scope = Scope(INSTANCE, "key:k", "u")
    first = await store.start_turn(scope, None, "q", {"topic": "x"}, 1000.0)
    await store.finish(first, "a", "normal", 1001.0)
    before = {k: await redis.dump(k) for k in await redis.keys("ir:conv:*")}
    prepared = await store.prepare_turn(scope, first.conversation_id, "again", {}, 1002.0)
    fresh = await store.prepare_turn(scope, None, "new", {}, 1002.0)
    assert [m["answer"] for m in prepared.history] == ["a"] and prepared.inputs == {"topic": "x"}
    assert {k: await redis.dump(k) for k in await redis.keys("ir:conv:*")} == before
    await store.reserve_turn(prepared, 1003.0)
    await store.reserve_turn(fresh, 1003.0)
    page, _ = await store.messages(scope, first.conversation_id, None, 10, now=1003.0)
    assert [m["query"] for m in page] == ["again", "q"] and page[0]["status"] == "answering"
    assert (await store.messages(scope, fresh.conversation_id, None, 10, now=1003.0))[0][0]["query"] == "new"


async def test_a_turn_reads_only_the_recent_history_it_may_send(redis):
    """However long the conversation, a turn reads its newest messages up to a byte or message budget."""
    store = store_for(redis, max_message_bytes=0)
    scope = Scope(INSTANCE, "key:k", "u")
    started = await store.start_turn(scope, None, "q0", {}, 1000.0)
    await store.finish(started, "a" * 100, "normal", 1000.0)
    cid = started.conversation_id
    for n in range(1, 10):
        following = await store.start_turn(scope, cid, f"q{n}", {}, 1000.0 + n)
        await store.finish(following, "" if n == 8 else "a" * 100, "error" if n == 8 else "normal", 1000.0 + n,
                           usage={"tokens": "x" * 5000})  # too large a usage object: left out
    whole = await store.prepare_turn(scope, cid, "next", {}, 1100.0)
    assert [m["query"] for m in whole.history] == [f"q{n}" for n in range(10)]
    assert all("usage" not in m for m in whole.history)
    by_answers = await store.prepare_turn(scope, cid, "next", {}, 1100.0, recent=(0, 3))
    assert [m["query"] for m in by_answers.history] == ["q6", "q7", "q8", "q9"]  # q8 has no answer
    by_bytes = await store.prepare_turn(scope, cid, "next", {}, 1100.0, recent=(300, 0))
    # ~170 bytes a record with its answer: q9 and q8 leave it under 300, q7 passes it, then it stops.
    assert [m["query"] for m in by_bytes.history] == ["q7", "q8", "q9"]


async def test_deleting_and_purging_anonymous_conversations_leave_no_address_index(redis):
    store = store_for(redis)
    here = Bounds(address="198.51.100.7")
    made = [await store.start_turn(Scope(INSTANCE, "anon", f"user{n}"), None, "q", {}, 1000.0 + n, here)
            for n in range(3)]
    index = keys.address_conversations(INSTANCE, here.address_digest)
    await store.delete(made[0].scope, made[0].conversation_id)
    assert await redis.zcard(index) == 2
    assert await store.purge_instance(INSTANCE) == 2
    assert await redis.keys(f"ir:conv:{{{INSTANCE}}}:*") == []  # the address index, the sizes too


async def test_the_caller_shares_are_exact_through_every_write_and_given_back(redis):
    """Turns, checkpoints, finishes, renames, expiry, deletion, purge: each caller's sum stays
    that of its conversations; past its share only that caller is refused; a conversation
    stored before the shares joins one, whole, at its next turn."""
    store = store_for(redis, max_conversations=20)
    here, there = Bounds(address="198.51.100.7", caller_bytes=2000), Bounds(address="203.0.113.9", caller_bytes=2000)
    keyed = Bounds(caller_bytes=2000)
    sizes = keys.conversation_sizes(INSTANCE)
    made = []
    for n in range(4):
        scope = Scope(INSTANCE, "anon", f"u{n}")
        started = await store.start_turn(scope, None, "q" * 300, {}, 1000.0 + n, here)
        await store.checkpoint(started, "partial " * 10, 1000.5 + n)
        await store.finish(started, "answer " * 20, "normal", 1000.7 + n)
        await store.rename(scope, started.conversation_id, f"talk {n}", now=1000.8 + n)
        made.append(started)
        await assert_accounted(redis, INSTANCE)
    with pytest.raises(ValidationFailed) as exc:  # ~2,100 bytes held from this address
        await store.start_turn(Scope(INSTANCE, "anon", "late"), None, "q", {}, 1010.0, here)
    assert exc.value.code == "caller_conversations_full"
    with pytest.raises(ValidationFailed) as exc:  # its existing conversations too
        await store.start_turn(made[3].scope, made[3].conversation_id, "q", {}, 1010.0, here)
    assert exc.value.code == "caller_conversations_full"
    keyed_turn = await store.start_turn(Scope(INSTANCE, "key:k1", "u"), None, "q" * 300, {}, 1011.0, keyed)
    await store.start_turn(Scope(INSTANCE, "anon", "elsewhere"), None, "q" * 300, {}, 1011.0, there)
    await assert_accounted(redis, INSTANCE)

    # Expired (keys gone as Redis would drop them): the next turn from the address finds room.
    first = made[0]
    mids = await redis.zrange(keys.conversation_order(INSTANCE, first.conversation_id), 0, -1)
    await redis.delete(keys.conversation(INSTANCE, first.conversation_id),
                       keys.conversation_messages(INSTANCE, first.conversation_id),
                       keys.conversation_order(INSTANCE, first.conversation_id),
                       *(keys.message_conversation(INSTANCE, m.decode()) for m in mids))
    await store.start_turn(made[1].scope, made[1].conversation_id, "again", {}, 1012.0, here)
    assert first.conversation_id.encode() not in await redis.hgetall(sizes)
    await assert_accounted(redis, INSTANCE)

    # Stored before the shares: one with no owner joins its address's share, whole, at its next turn
    # (the address it was started from when it names one, else the caller's now).
    old = await store.start_turn(Scope(INSTANCE, "anon", "old"), None, "q" * 200, {}, 1013.0)
    assert await redis.hget(sizes, f"w:{old.conversation_id}") is None
    before = await assert_accounted(redis, INSTANCE)
    await store.start_turn(old.scope, old.conversation_id, "q", {}, 1014.0, there)
    after = await assert_accounted(redis, INSTANCE)
    who = f"addr:{there.address_digest}".encode()
    assert after[who] - before[who] > 200
    cid = made[2].conversation_id
    held = int(await redis.hget(sizes, cid) or 0)
    await redis.hdel(sizes, f"w:{cid}")
    await redis.hincrby(sizes, f"o:addr:{here.address_digest}", -held)
    await store.start_turn(made[2].scope, cid, "q", {}, 1015.0, there)  # from another address now
    assert (await redis.hget(sizes, f"w:{cid}")) == f"addr:{here.address_digest}".encode()
    await assert_accounted(redis, INSTANCE)

    await store.delete(keyed_turn.scope, keyed_turn.conversation_id)
    assert b"key:k1" not in await assert_accounted(redis, INSTANCE)
    assert await store.purge_instance(INSTANCE) == 5
    assert await redis.exists(sizes) == 0
