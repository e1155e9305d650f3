"""The conversation store against a real Redis: turns, bounds, scopes, paging, retention, purge.

Time is whatever ``now`` each call passes (stale answers are decided by it);
expiry is simulated by deleting keys or shortening TTLs, never by waiting.
"""

from __future__ import annotations

import uuid

import anyio
import anyio.lowlevel
import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from relay.errors import NotFound, ValidationFailed
from relay.store import keys
from relay.store.conversations import ConversationStore, Scope, Turn, clip_utf8, default_name

pytestmark = pytest.mark.anyio

INSTANCE = "inst1"
ME = Scope(INSTANCE, "key:k1", "alice")
STRANGERS = {
    "another caller": Scope(INSTANCE, "anon", "alice"),
    "another user": Scope(INSTANCE, "key:k1", "bob"),
    "another instance": Scope("inst2", "key:k1", "alice"),
}
T0 = 1_700_000_000.0
MESSAGE_KEYS = {"id", "conversation_id", "inputs", "query", "answer", "feedback", "created_at", "status"}
CONVERSATION_KEYS = {"id", "name", "inputs", "status", "created_at", "updated_at"}


def make_store(redis: Redis, **overrides) -> ConversationStore:
    settings = dict(retention_seconds=3600, max_messages=50, max_conversations=20, max_message_bytes=100,
                    stale_after=30.0, purge_batch=2)
    settings.update(overrides)
    return ConversationStore(redis, **settings)


@pytest.fixture
def store(redis) -> ConversationStore:
    return make_store(redis)


async def turn(store: ConversationStore, cid: str | None, query: str, answer: str = "", now: float = T0,
               scope: Scope = ME, inputs: dict | None = None, status: str = "normal") -> Turn:
    """One whole turn: started, then finished with ``answer``."""
    started = await store.start_turn(scope, cid, query, inputs or {}, now)
    assert await store.finish(started, answer, status, now)  # type: ignore[arg-type]
    return started


async def all_messages(store: ConversationStore, cid: str, *, scope: Scope = ME, now: float = T0) -> list[dict]:
    page, _ = await store.messages(scope, cid, None, 100, now=now)
    return page[::-1]  # oldest first


def conversation_keys(scope: Scope, cid: str) -> list[str]:
    return [keys.conversation(scope.instance_id, cid), keys.conversation_messages(scope.instance_id, cid),
            keys.conversation_order(scope.instance_id, cid)]


async def expire(redis: Redis, scope: Scope, cid: str) -> None:
    """What expiry leaves: the conversation's own keys gone, the indexes still naming it."""
    mids = await redis.zrange(keys.conversation_order(scope.instance_id, cid), 0, -1)
    await redis.delete(*conversation_keys(scope, cid),
                       *(keys.message_conversation(scope.instance_id, m.decode()) for m in mids))


def code(exc: pytest.ExceptionInfo) -> tuple[int, str | None]:
    return exc.value.status, exc.value.code


# -- pure --------------------------------------------------------------------------------------


def test_clip_cuts_on_a_character_boundary():
    assert clip_utf8("é" * 60, 100) == ("é" * 50, True)
    assert clip_utf8("a" + "é" * 60, 100) == ("a" + "é" * 49, True)  # 99 bytes: half an é never stays
    assert clip_utf8("ab🙂", 5) == ("ab", True)
    assert clip_utf8("ab🙂", 6) == ("ab🙂", False)
    assert clip_utf8("x" * 500, 0) == ("x" * 500, False)  # 0 = no limit
    assert clip_utf8("a\ud800b", 10) == ("a?b", False)  # a lone surrogate could not be stored


def test_default_name_is_the_start_of_the_query_on_one_line():
    assert default_name("  How do\nI   bake\tbread?  ") == "How do I bake bread?"
    assert default_name("x" * 100) == "x" * 40
    assert default_name(" \n ") == "New conversation"


# -- turns ---------------------------------------------------------------------------------------


async def test_a_first_turn_creates_the_conversation(store):
    started = await store.start_turn(ME, None, "Bonjour,\ncomment ça va ?", {"lang": "fr"}, T0)
    assert uuid.UUID(started.conversation_id).version == 4 and uuid.UUID(started.message_id).version == 4
    assert (started.created_at, started.inputs, started.history) == (int(T0), {"lang": "fr"}, [])
    assert started.created and started.name == "Bonjour, comment ça va ?"

    # Reserved before any answer: the question is already there.
    (reserved,) = await all_messages(store, started.conversation_id, now=T0 + 1)
    assert reserved == {"id": started.message_id, "conversation_id": started.conversation_id,
                        "inputs": {"lang": "fr"}, "query": "Bonjour,\ncomment ça va ?", "answer": "",
                        "feedback": None, "created_at": int(T0), "status": "answering"}

    assert await store.finish(started, "Très bien.", "normal", T0 + 2, usage={"total_tokens": 7})
    (done,) = await all_messages(store, started.conversation_id, now=T0 + 2)
    assert (done["answer"], done["status"], done["usage"]) == ("Très bien.", "normal", {"total_tokens": 7})
    assert set(done) == MESSAGE_KEYS | {"usage"}

    (listed,), has_more = await store.conversations(ME, None, 20)
    assert not has_more
    assert listed == {"id": started.conversation_id, "name": "Bonjour, comment ça va ?", "inputs": {"lang": "fr"},
                      "status": "normal", "created_at": int(T0), "updated_at": int(T0 + 2)}
    assert set(listed) == CONVERSATION_KEYS


async def test_a_continued_conversation_keeps_its_inputs_and_sees_its_history(store):
    first = await turn(store, None, "one", "1", inputs={"topic": "maths"})
    cid = first.conversation_id
    await turn(store, cid, "two", "2 (cut)", now=T0 + 1, status="stopped")
    await turn(store, cid, "three", "", now=T0 + 2, status="error")
    third = await store.start_turn(ME, cid, "four", {"topic": "ignored"}, T0 + 3)
    assert not third.created and third.inputs == {"topic": "maths"}
    assert [(m["query"], m["answer"], m["status"]) for m in third.history] == [
        ("one", "1", "normal"), ("two", "2 (cut)", "stopped"), ("three", "", "error")]
    assert all(m["inputs"] == {"topic": "maths"} for m in await all_messages(store, cid))


async def test_history_leaves_out_turns_still_answering_but_keeps_interrupted_ones(store):
    first = await turn(store, None, "q1", "a1")
    cid = first.conversation_id
    dying = await store.start_turn(ME, cid, "q2", {}, T0 + 10)
    assert await store.checkpoint(dying, "half an ans", T0 + 20)
    running = await store.start_turn(ME, cid, "q3", {}, T0 + 40)  # q2's last write is 20 s old: live

    later = await store.start_turn(ME, cid, "q4", {}, T0 + 45)
    assert [m["query"] for m in later.history] == ["q1"]  # q2 and q3 are still being answered

    # 30 s (stale_after) past its last write, q2's node is taken for dead.
    latest = await store.start_turn(ME, cid, "q5", {}, T0 + 51)
    assert [(m["query"], m["answer"], m["status"]) for m in latest.history] == [
        ("q1", "a1", "normal"), ("q2", "half an ans", "interrupted")]
    statuses = [m["status"] for m in await all_messages(store, cid, now=T0 + 51)]
    assert statuses == ["normal", "interrupted", "answering", "answering", "answering"]
    assert [m["status"] for m in await all_messages(store, cid, now=T0 + 49)][1] == "answering"

    # A node that was only slow may still finish it: the real answer wins.
    assert await store.finish(dying, "the whole answer", "normal", T0 + 60)
    assert await store.finish(running, "a3", "normal", T0 + 61)
    assert [m["status"] for m in await all_messages(store, cid, now=T0 + 1000)] == [
        "normal", "normal", "normal", "interrupted", "interrupted"]


async def test_checkpoints_and_finish_apply_once(store):
    started = await store.start_turn(ME, None, "q", {}, T0)
    assert await store.checkpoint(started, "par", T0 + 1)
    assert await store.checkpoint(started, "partial", T0 + 2)
    assert (await all_messages(store, started.conversation_id))[0]["answer"] == "partial"
    assert await store.finish(started, "final", "normal", T0 + 3)
    assert not await store.checkpoint(started, "late", T0 + 4)  # a checkpoint in flight arrives after the end
    assert not await store.finish(started, "again", "error", T0 + 5)
    (message,) = await all_messages(store, started.conversation_id)
    assert (message["answer"], message["status"]) == ("final", "normal")
    with pytest.raises(ValueError):
        await store.finish(started, "x", "answering", T0)


async def test_writes_to_a_deleted_conversation_store_nothing(store, redis):
    started = await store.start_turn(ME, None, "q", {}, T0)
    await store.delete(ME, started.conversation_id)
    assert not await store.checkpoint(started, "partial", T0 + 1)
    assert not await store.finish(started, "final", "normal", T0 + 2)
    assert await redis.keys("ir:conv:*") == []  # no key recreated (and none without a TTL)


# -- bounds ----------------------------------------------------------------------------------------


async def test_long_answers_are_truncated_on_a_character_boundary(store):
    started = await store.start_turn(ME, None, "q", {}, T0)
    assert await store.checkpoint(started, "a" + "é" * 80, T0 + 1)
    (partial,) = await all_messages(store, started.conversation_id)
    assert partial["answer"] == "a" + "é" * 49 and partial["truncated"] is True
    assert await store.finish(started, "🙂" * 26, "normal", T0 + 2)  # 104 bytes
    (message,) = await all_messages(store, started.conversation_id)
    assert message["answer"] == "🙂" * 25 and message["truncated"] is True
    short = await turn(store, started.conversation_id, "q2", "é" * 50)  # exactly 100 bytes
    assert "truncated" not in (await all_messages(store, short.conversation_id))[1]


async def test_queries_and_inputs_past_the_byte_limit_are_refused(store, redis):
    await turn(store, None, "é" * 50)  # 100 bytes: at the limit
    with pytest.raises(ValidationFailed) as exc:
        await store.start_turn(ME, None, "é" * 50 + "a", {}, T0)  # 51 characters, 101 bytes
    assert code(exc) == (422, "message_too_large") and exc.value.param == "query"
    with pytest.raises(ValidationFailed) as exc:
        await store.start_turn(ME, None, "q", {"x": "y" * 100}, T0)
    assert code(exc) == (422, "inputs_too_large")
    page, _ = await store.conversations(ME, None, 20)
    assert len(page) == 1  # nothing was half-created


async def test_a_full_conversation_takes_no_more_turns(redis):
    store = make_store(redis, max_messages=3)
    first = await turn(store, None, "1")
    await turn(store, first.conversation_id, "2")
    await store.start_turn(ME, first.conversation_id, "3", {}, T0)  # answering still counts
    with pytest.raises(ValidationFailed) as exc:
        await store.start_turn(ME, first.conversation_id, "4", {}, T0)
    assert code(exc) == (422, "conversation_full")
    assert len(await all_messages(store, first.conversation_id)) == 3
    await turn(store, None, "a new conversation is fine")


async def test_a_scope_holds_at_most_max_conversations(redis):
    store = make_store(redis, max_conversations=2)
    first = await turn(store, None, "1")
    await turn(store, None, "2")
    with pytest.raises(ValidationFailed) as exc:
        await store.start_turn(ME, None, "3", {}, T0)
    assert code(exc) == (422, "too_many_conversations") and not exc.value.headers
    await turn(store, first.conversation_id, "continuing one is fine")
    for other in STRANGERS.values():
        await turn(store, None, "others have their own count", scope=other)
    await store.delete(ME, first.conversation_id)
    await turn(store, None, "3")  # deleting one is the way out


async def test_an_expired_conversation_frees_its_place_wherever_it_sits(redis):
    store = make_store(redis, max_conversations=3)
    old = await turn(store, None, "old", now=T0)
    await turn(store, None, "middle", now=T0 + 1)
    newest = await turn(store, None, "newest", now=T0 + 2)
    await expire(redis, ME, newest.conversation_id)  # not the least recently active one
    await turn(store, None, "takes its place", now=T0 + 3)
    page, _ = await store.conversations(ME, None, 20)
    assert [c["name"] for c in page] == ["takes its place", "middle", "old"]
    assert old.conversation_id in {c["id"] for c in page}


# -- scopes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("who", list(STRANGERS))
async def test_nothing_of_a_scope_exists_for_another(store, who):
    other = STRANGERS[who]
    started = await turn(store, None, "secret", "answer")
    cid, mid = started.conversation_id, started.message_id

    assert await store.conversations(other, None, 20) == ([], False)
    attempts = {
        "continue": store.start_turn(other, cid, "q", {}, T0),
        "messages": store.messages(other, cid, None, 20),
        "rename": store.rename(other, cid, "mine now"),
        "delete": store.delete(other, cid),
        "last_id": store.conversations(other, cid, 20),
    }
    for name, attempt in attempts.items():
        with pytest.raises(NotFound) as exc:
            await attempt
        assert code(exc) == (404, "conversation_not_found"), name
    for rating in ("like", None):
        with pytest.raises(NotFound) as exc:
            await store.feedback(other, mid, rating)
        assert code(exc) == (404, "message_not_found")
    with pytest.raises(NotFound) as exc:
        await store.messages(ME, cid, str(uuid.uuid4()), 20)  # first_id of no message of it
    assert code(exc) == (404, "message_not_found")

    # The owner sees it all unchanged.
    (message,) = await all_messages(store, cid)
    assert (message["answer"], message["feedback"]) == ("answer", None)
    (conversation,), _ = await store.conversations(ME, None, 20)
    assert conversation["name"] == "secret"


@pytest.mark.parametrize("bad_id", [str(uuid.uuid4()), "not-a-uuid", "", "x" * 10_000,
                                    str(uuid.uuid4()).upper(), "{inst2}"])
async def test_unknown_ids_are_not_found(store, bad_id):
    started = await turn(store, None, "q")
    for attempt in (store.start_turn(ME, bad_id, "q", {}, T0), store.messages(ME, bad_id, None, 20),
                    store.rename(ME, bad_id, "n"), store.delete(ME, bad_id), store.conversations(ME, bad_id, 5)):
        with pytest.raises(NotFound) as exc:
            await attempt
        assert exc.value.code == "conversation_not_found"
    for attempt in (store.feedback(ME, bad_id, "like"), store.messages(ME, started.conversation_id, bad_id, 5)):
        with pytest.raises(NotFound) as exc:
            await attempt
        assert exc.value.code == "message_not_found"


# -- lists ----------------------------------------------------------------------------------------


async def page_through(fetch, limit: int) -> tuple[list[dict], list[bool], list[int]]:
    items: list[dict] = []
    flags, sizes = [], []
    cursor = None
    while True:
        page, has_more = await fetch(cursor, limit)
        items += page
        flags.append(has_more)
        sizes.append(len(page))
        if not has_more:
            return items, flags, sizes
        cursor = page[-1]["id"]


async def test_conversations_page_most_recently_active_first(store):
    made = [await turn(store, None, f"c{i}", now=T0 + i) for i in range(7)]
    await turn(store, made[2].conversation_id, "again", now=T0 + 100)  # activity moves it up
    items, flags, sizes = await page_through(lambda cursor, n: store.conversations(ME, cursor, n), 3)
    assert sizes == [3, 3, 1] and flags == [True, True, False]
    assert [c["name"] for c in items] == ["c2", "c6", "c5", "c4", "c3", "c1", "c0"]
    assert items[0]["updated_at"] == int(T0 + 100)

    items, flags, _ = await page_through(lambda cursor, n: store.conversations(ME, cursor, n), 7)
    assert len(items) == 7 and flags == [False]  # an exact last page says so


async def test_conversations_active_at_the_same_instant_page_without_loss(store):
    made = {(await turn(store, None, f"c{i}", now=T0)).conversation_id for i in range(9)}
    items, flags, _ = await page_through(lambda cursor, n: store.conversations(ME, cursor, n), 2)
    assert [c["id"] for c in items] == sorted(made, reverse=True) and flags[-1] is False


async def test_messages_page_newest_first(store):
    cid = (await turn(store, None, "m0", "a0", now=T0)).conversation_id
    for i in range(1, 8):
        await turn(store, cid, f"m{i}", f"a{i}", now=T0 + i)
    items, flags, sizes = await page_through(lambda cursor, n: store.messages(ME, cid, cursor, n), 3)
    assert [m["query"] for m in items] == [f"m{i}" for i in range(7, -1, -1)]
    assert sizes == [3, 3, 2] and flags == [True, True, False]
    assert [m["created_at"] for m in items] == [int(T0) + i for i in range(7, -1, -1)]


async def test_page_sizes_are_bounded(store):
    cid = (await turn(store, None, "q")).conversation_id
    for limit in (0, 101, -1):
        with pytest.raises(ValidationFailed):
            await store.messages(ME, cid, None, limit)
        with pytest.raises(ValidationFailed):
            await store.conversations(ME, None, limit)


# -- changes ----------------------------------------------------------------------------------------


async def test_rename(store):
    first = await turn(store, None, "first", now=T0)
    await turn(store, None, "second", now=T0 + 1)
    renamed = await store.rename(ME, first.conversation_id, "  Bread\n recipes ", now=T0 + 5)
    assert renamed == {"id": first.conversation_id, "name": "Bread recipes", "inputs": {}, "status": "normal",
                       "created_at": int(T0), "updated_at": int(T0 + 5)}
    page, _ = await store.conversations(ME, None, 20)
    assert page[0] == renamed
    with pytest.raises(ValidationFailed) as exc:
        await store.rename(ME, first.conversation_id, " \n ")
    assert exc.value.param == "name"
    with pytest.raises(ValidationFailed) as exc:
        await store.rename(ME, first.conversation_id, "n" * 257)
    assert exc.value.code == "name_too_long"


async def test_delete_removes_every_key(store, redis):
    keep = await turn(store, None, "keep")
    gone = await turn(store, None, "gone")
    await turn(store, gone.conversation_id, "more")
    await store.delete(ME, gone.conversation_id)
    for attempt in (store.messages(ME, gone.conversation_id, None, 5), store.delete(ME, gone.conversation_id)):
        with pytest.raises(NotFound):
            await attempt
    with pytest.raises(NotFound):
        await store.feedback(ME, gone.message_id, "like")
    names = {k.decode() for k in await redis.keys("ir:conv:*")}
    assert not any(gone.conversation_id in n or gone.message_id in n for n in names)
    assert keys.message_conversation(INSTANCE, keep.message_id) in names
    page, _ = await store.conversations(ME, None, 20)
    assert [c["id"] for c in page] == [keep.conversation_id]


async def test_feedback_set_changed_and_undone(store):
    started = await turn(store, None, "q", "a")
    cid, mid = started.conversation_id, started.message_id
    await store.feedback(ME, mid, "like")
    assert (await all_messages(store, cid))[0]["feedback"] == {"rating": "like"}
    await store.feedback(ME, mid, "dislike")
    assert (await all_messages(store, cid))[0]["feedback"] == {"rating": "dislike"}
    await store.feedback(ME, mid, None)
    await store.feedback(ME, mid, None)  # undoing twice is harmless
    assert (await all_messages(store, cid))[0]["feedback"] is None
    with pytest.raises(ValidationFailed) as exc:
        await store.feedback(ME, mid, "meh")
    assert exc.value.param == "rating"


async def test_every_key_of_an_instance_is_in_one_cluster_slot(store, redis):
    started = await turn(store, None, "q", "a")
    await turn(store, started.conversation_id, "q2", "a2", scope=ME)
    await turn(store, None, "q", "a", scope=STRANGERS["another user"])
    await store.feedback(ME, started.message_id, "like")
    names = await redis.keys("ir:conv:*")
    assert len(names) == 13  # 2 conversations (3 keys each), 3 messages, 2 scopes, the instance's index and sizes
    assert {key_slot(name) for name in names} == {key_slot(INSTANCE.encode())}


# -- retention -----------------------------------------------------------------------------------------


async def ttls(redis: Redis) -> dict[str, int]:
    return {k.decode(): await redis.pttl(k) for k in await redis.keys("ir:conv:*")}


async def test_every_key_expires_and_activity_renews_it(redis):
    store = make_store(redis, retention_seconds=2)
    started = await turn(store, None, "q1", "a1")
    following = await store.start_turn(ME, started.conversation_id, "q2", {}, T0 + 1)
    before = await ttls(redis)
    assert len(before) == 8  # conversation, messages, order, 2 message index entries, 2 indexes, sizes
    assert all(0 < ttl <= 2000 for ttl in before.values())

    # Let every key run down to ~0.2 s, as if time had passed.
    for name in before:
        await redis.pexpire(name, 200)
    assert await store.checkpoint(following, "partial", T0 + 2)
    assert all(ttl <= 200 for ttl in (await ttls(redis)).values())  # a checkpoint is not activity

    assert await store.finish(following, "a2", "normal", T0 + 3)
    assert all(1500 < ttl <= 2000 for ttl in (await ttls(redis)).values())  # every key, older messages too

    # A rename or a feedback is activity too, but O(1): the conversation's own keys,
    # and for a feedback the rated message's index entry, not every message's.
    entries = {keys.message_conversation(INSTANCE, m) for m in (started.message_id, following.message_id)}
    for name in before:
        await redis.pexpire(name, 200)
    await store.rename(ME, started.conversation_id, "renamed")
    after = await ttls(redis)
    assert all(1500 < ttl <= 2000 for name, ttl in after.items() if name not in entries)
    assert all(after[name] <= 200 for name in entries)
    await store.feedback(ME, started.message_id, "like")
    after = await ttls(redis)
    assert after[keys.message_conversation(INSTANCE, started.message_id)] > 1500
    assert after[keys.message_conversation(INSTANCE, following.message_id)] <= 200


async def test_expired_conversations_leave_the_lists(store, redis):
    kept = await turn(store, None, "kept", now=T0)
    lost = [await turn(store, None, f"lost{i}", now=T0 + 1 + i) for i in range(3)]
    for started in lost:
        await expire(redis, ME, started.conversation_id)
    page, has_more = await store.conversations(ME, None, 1)
    assert [c["id"] for c in page] == [kept.conversation_id] and not has_more
    assert await redis.zrange(keys.scope_conversations(INSTANCE, ME.digest), 0, -1) == [
        kept.conversation_id.encode()]
    assert await redis.zrange(keys.instance_conversations(INSTANCE), 0, -1) == [kept.conversation_id.encode()]
    for attempt in (store.messages(ME, lost[0].conversation_id, None, 5),
                    store.conversations(ME, lost[1].conversation_id, 5)):
        with pytest.raises(NotFound):
            await attempt


async def test_creations_sweep_the_instance_index(store, redis):
    # Nobody lists: creations alone keep the instance-wide index from growing.
    for i in range(30):
        started = await turn(store, None, f"c{i}", now=T0 + i, scope=Scope(INSTANCE, "anon", f"user{i}"))
        if i < 29:
            await expire(redis, started.scope, started.conversation_id)
    assert await redis.zcard(keys.instance_conversations(INSTANCE)) <= 2


# -- purge ---------------------------------------------------------------------------------------------


async def test_purge_deletes_every_conversation_in_batches(store, redis):
    other = STRANGERS["another user"]
    made = [await turn(store, None, f"c{i}", "a", scope=ME if i % 2 else other, now=T0 + i) for i in range(5)]
    await turn(store, made[0].conversation_id, "more", scope=other)
    ghost = await turn(store, None, "expired", now=T0 + 9)
    await expire(redis, ME, ghost.conversation_id)
    elsewhere = await turn(store, None, "another instance", scope=STRANGERS["another instance"])

    calls = 0
    script = store._purge

    async def counted(**kwargs):
        nonlocal calls
        calls += 1
        return await script(**kwargs)

    store._purge = counted
    assert await store.purge_instance(INSTANCE) == 5
    assert calls == 3  # 6 index entries, 2 per call
    assert [k for k in await redis.keys("ir:conv:{inst1}:*") if b":s:" not in k] == []
    for scope in (ME, other):
        assert await store.conversations(scope, None, 20) == ([], False)
    assert await redis.zcard(keys.scope_conversations(INSTANCE, other.digest)) == 0
    assert await store.purge_instance(INSTANCE) == 0
    assert len(await all_messages(store, elsewhere.conversation_id, scope=elsewhere.scope)) == 1
    await turn(store, None, "a fresh start")  # the instance's conversations work on afterwards


# -- concurrency ---------------------------------------------------------------------------------------


async def test_concurrent_turns_on_one_conversation_from_two_nodes(redis, redis_url):
    other_node = Redis.from_url(redis_url)
    try:
        stores = [make_store(redis), make_store(other_node)]
        cid = (await turn(stores[0], None, "q-first", "a-first")).conversation_id
        turns: list[tuple[Turn, set[str]]] = []
        finished: set[str] = set()

        async def one(i: int) -> None:
            store = stores[i % 2]
            for _ in range(i % 7):  # starts and finishes interleave
                await anyio.lowlevel.checkpoint()
            done_before = set(finished)
            started = await store.start_turn(ME, cid, f"q{i}", {}, T0 + 1)
            turns.append((started, done_before))
            for _ in range(i % 3):
                await anyio.lowlevel.checkpoint()
            assert await store.finish(started, f"a{i}", "normal", T0 + 2)
            finished.add(started.message_id)

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(one, i)
    finally:
        await other_node.aclose()

    stored = await all_messages(stores[0], cid, now=T0 + 2)
    assert len(stored) == 41 and len({m["id"] for m in stored}) == 41
    assert sorted(m["query"] for m in stored[1:]) == sorted(f"q{i}" for i in range(40))
    assert all(m["answer"] == "a" + m["query"][1:] and m["status"] == "normal" for m in stored[1:])
    order = [m["id"] for m in stored]
    for started, done_before in turns:
        seen = [m["id"] for m in started.history]
        # Only turns stored before it, oldest first; every one finished before it started among them.
        assert seen == [mid for mid in order[:order.index(started.message_id)] if mid in set(seen)]
        assert done_before | {order[0]} <= set(seen)


async def test_concurrent_creations_at_the_limit(redis):
    store = make_store(redis, max_conversations=5)

    async def create(i: int) -> str:
        try:
            return (await store.start_turn(ME, None, f"c{i}", {}, T0)).conversation_id
        except ValidationFailed as exc:
            return str(exc.code)

    results: list[str] = []

    async def run(i: int) -> None:
        results.append(await create(i))

    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(run, i)
    created = [r for r in results if r != "too_many_conversations"]
    assert len(created) == 5 and results.count("too_many_conversations") == 35
    page, _ = await store.conversations(ME, None, 20)
    assert sorted(c["id"] for c in page) == sorted(created)


async def test_concurrent_turns_at_the_message_limit(redis):
    store = make_store(redis, max_messages=10)
    cid = (await turn(store, None, "first")).conversation_id
    outcomes: list[str] = []

    async def one(i: int) -> None:
        try:
            await turn(store, cid, f"q{i}", f"a{i}")
            outcomes.append("ok")
        except ValidationFailed as exc:
            outcomes.append(str(exc.code))

    async with anyio.create_task_group() as tg:
        for i in range(30):
            tg.start_soon(one, i)
    assert outcomes.count("ok") == 9 and outcomes.count("conversation_full") == 21
    assert len(await all_messages(store, cid)) == 10
