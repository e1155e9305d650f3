"""The registry against a real Redis: registration, tokens, paging, presence."""

from __future__ import annotations

import hashlib
import time

import orjson
import pytest

from relay.errors import Forbidden, NotFound, Unauthorized
from relay.store import keys
from relay.store.agents import AgentEntry
from relay.store.registry import InstanceRegistry
from relay.store.tokens import hash_token
from tests.helpers import wait_until

pytestmark = pytest.mark.anyio

BASE = "http://relay.test"


#: Node keys written by the ``registry`` fixture outlive any test: a node is
#: alive until a test makes it stop (see test_presence_expires_when_heartbeats_stop).
HEARTBEAT_TIMEOUT = 60.0


@pytest.fixture
def registry(redis):
    return InstanceRegistry(redis, heartbeat_timeout=HEARTBEAT_TIMEOUT, base_url=BASE + "/")


def entry(agent_id="agent-1", node="node-a", session="s1", models=("m1", "m2"), max_concurrency=4):
    return AgentEntry(agent_id=agent_id, node=node, session=session, max_concurrency=max_concurrency,
                      models=tuple(models), connected_at=time.time())


async def dump_redis(redis) -> list[bytes]:
    """Every key name and every stored value, whatever its type."""
    out: list[bytes] = []
    async for key in redis.scan_iter(count=1000):
        out.append(key)
        kind = (await redis.type(key)).decode()
        if kind == "string":
            out.append(await redis.get(key))
        elif kind == "hash":
            for k, v in (await redis.hgetall(key)).items():
                out += [k, v]
        elif kind == "zset":
            out += [m for m, _ in await redis.zrange(key, 0, -1, withscores=True)]
        elif kind == "set":
            out += list(await redis.smembers(key))
        elif kind == "list":
            out += await redis.lrange(key, 0, -1)
        else:
            raise AssertionError(f"unexpected key type {kind} for {key!r}")
    return out


# -- registration -------------------------------------------------------------


async def test_register_and_get(registry):
    before = time.time()
    instance_id, token = await registry.register("alice", "my llama")
    assert token.startswith("ira_") and len(token) >= 4 + 43  # >= 256 bits, url-safe base64
    view = await registry.view(instance_id)
    contract = {
        "instance_id": instance_id,
        "name": "alice",
        "description": "my llama",
        "status": "offline",
        "models": [],
        "agents": 0,
        "last_seen": None,
        "created_at": view["created_at"],
        "chat_url": f"{BASE}/api/chat/{instance_id}",
    }
    assert {k: view.get(k) for k in contract} == contract
    # More fields may come; secrets never do.
    assert not {"token_hash", "agent_token", "token", "seq"} & set(view)
    assert hash_token(token) not in orjson.dumps(view).decode()
    assert before <= view["created_at"] <= time.time()
    assert await registry.exists(instance_id)


async def test_ids_and_tokens_are_unique(registry):
    results = [await registry.register(f"n{i}") for i in range(20)]
    assert len({iid for iid, _ in results}) == 20
    assert len({tok for _, tok in results}) == 20


async def test_get_unknown_instance(registry):
    with pytest.raises(NotFound) as info:
        await registry.view("doesnotexist")
    assert info.value.status == 404
    assert not await registry.exists("doesnotexist")


async def test_token_is_stored_only_as_its_sha256(registry, redis):
    instance_id, token = await registry.register("alice")
    everything = await dump_redis(redis)
    assert everything, "the registry wrote nothing?"
    digest = hashlib.sha256(token.encode()).hexdigest().encode()
    assert hash_token(token).encode() == digest
    assert any(digest in blob for blob in everything)
    secret = token.encode()
    secret_part = token.removeprefix("ira_").encode()
    for blob in everything:
        assert secret not in blob and secret_part not in blob


async def test_authenticate(registry):
    a, token_a = await registry.register("a")
    b, token_b = await registry.register("b")
    assert await registry.authenticate(token_a) == a
    assert await registry.authenticate(token_b) == b
    assert await registry.authenticate(token_a + "x") is None
    assert await registry.authenticate("") is None
    assert await registry.authenticate("ira_" + "A" * 43) is None


async def test_authenticate_refuses_a_stale_index_entry(registry, redis):
    # The token index points at an instance whose record holds another hash:
    # the record, not the index, has the final word.
    a, token_a = await registry.register("a")
    await redis.hset(keys.instance(a), "token_hash", hash_token("something else"))
    assert await registry.authenticate(token_a) is None


async def test_check_owner(registry):
    a, token_a = await registry.register("a")
    _, token_b = await registry.register("b")
    await registry.check_owner(a, token_a)
    with pytest.raises(Unauthorized) as missing:
        await registry.check_owner(a, None)
    assert missing.value.status == 401
    with pytest.raises(Unauthorized):
        await registry.check_owner(a, "")
    with pytest.raises(Forbidden) as wrong:
        await registry.check_owner(a, token_b)
    assert wrong.value.status == 403
    with pytest.raises(Forbidden):
        await registry.check_owner(a, token_a[:-1])
    with pytest.raises(NotFound):
        await registry.check_owner("nope", token_a)


async def test_delete(registry, redis):
    a, token_a = await registry.register("a")
    b, token_b = await registry.register("b")
    await registry.add_agent(a, entry())
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(keys.EVENTS_CHANNEL)
        # Generous deadlines: get_message returns as soon as a message is there.
        confirmation = await pubsub.get_message(timeout=30)
        assert confirmation is not None and confirmation["type"] == "subscribe"
        await registry.delete(a)
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=30)
    assert message is not None and a.encode() in message["data"]
    with pytest.raises(NotFound):
        await registry.view(a)
    assert not await registry.exists(a)
    assert await registry.authenticate(token_a) is None
    page, _ = await registry.list()
    assert [v["instance_id"] for v in page] == [b]
    # Nothing of the deleted instance is left behind; the other is untouched.
    for blob in await dump_redis(redis):
        assert a.encode() not in blob
    assert await registry.authenticate(token_b) == b
    with pytest.raises(NotFound):
        await registry.delete(a)


# -- listing ---------------------------------------------------------------------


async def page_through(registry, **kwargs) -> tuple[list[str], int]:
    seen: list[str] = []
    cursor, pages = 0, 0
    while True:
        page, next_cursor = await registry.list(cursor=cursor, **kwargs)
        pages += 1
        assert len(page) <= kwargs.get("limit", 50)
        seen += [v["instance_id"] for v in page]
        if next_cursor is None:
            return seen, pages
        assert page, "a non-final page must not be empty"
        cursor = int(next_cursor)
        assert pages < 100


@pytest.mark.parametrize("count, limit", [(7, 3), (6, 3), (5, 1), (4, 10)])
async def test_list_pages_in_registration_order(registry, count, limit):
    ids = [(await registry.register(f"n{i}"))[0] for i in range(count)]
    seen, pages = await page_through(registry, limit=limit)
    assert seen == ids
    assert pages == max(1, -(-count // limit))


async def test_list_empty(registry):
    assert await registry.list() == ([], None)


async def test_list_with_status_filter(registry):
    ids = [(await registry.register(f"n{i}"))[0] for i in range(9)]
    online = ids[1::3] + ids[2::3]  # 6 of 9, interleaved with offline ones
    for iid in online:
        await registry.add_agent(iid, entry(session=iid))
    await registry.refresh_node("node-a")
    expected_online = [i for i in ids if i in online]
    expected_offline = [i for i in ids if i not in online]

    seen, pages = await page_through(registry, status="online", limit=2)
    assert seen == expected_online
    assert pages >= 3
    seen, _ = await page_through(registry, status="offline", limit=2)
    assert seen == expected_offline
    page, _ = await registry.list(status="online", limit=50)
    assert all(v["status"] == "online" and v["agents"] == 1 and v["models"] == ["m1", "m2"] for v in page)
    page, _ = await registry.list(status="offline", limit=50)
    assert all(v["status"] == "offline" and v["agents"] == 0 for v in page)


# -- presence --------------------------------------------------------------------


async def test_online_needs_a_node_that_is_not_dead(registry):
    before = time.time()
    iid, _ = await registry.register("a")
    await registry.refresh_node("node-a")
    await registry.drop_node("node-a")
    await registry.add_agent(iid, entry(node="node-a"))
    # Recorded, but its node's liveness has ended: not online (the entry
    # stays until the node is swept, in case it comes back and re-asserts).
    await registry.liveness.refresh()
    assert registry.liveness.alive == ()
    assert (await registry.view(iid))["status"] == "offline"
    assert await registry.live_agents(iid) == []
    await registry.refresh_node("node-a")
    await registry.liveness.refresh()
    await registry.add_agent(iid, entry(node="node-a"))
    view = await registry.view(iid)
    assert view["status"] == "online"
    assert view["agents"] == 1
    assert view["models"] == ["m1", "m2"]
    assert before <= view["last_seen"] <= time.time()


async def test_a_nodes_liveness_lasts_one_heartbeat_timeout(registry, redis):
    assert await registry.refresh_node("node-a") is False  # not alive until now: never seen
    assert await registry.refresh_node("node-a") is True
    seconds, micros = await redis.time()
    ends = await redis.zscore(keys.NODES, "node-a")
    left = ends - (seconds * 1000 + micros // 1000)
    assert 0 < left <= keys.node_ttl_ms(HEARTBEAT_TIMEOUT) == HEARTBEAT_TIMEOUT * 1000
    assert await registry.node_alive("node-a") and not await registry.node_alive("node-never-seen")


async def test_presence_expires_when_heartbeats_stop(registry, redis):
    iid, _ = await registry.register("a")
    other, _ = await registry.register("b")
    await registry.add_agent(iid, entry(node="node-a"))
    await registry.add_agent(other, entry(node="node-b"))
    await registry.refresh_node("node-a")
    await registry.refresh_node("node-b")
    assert (await registry.view(iid))["status"] == "online"

    # node-a's last heartbeat (from a node whose heartbeat timeout is short);
    # node-b stays alive.  node-a's liveness ends on the Redis clock: wait for
    # that, seen in Redis, rather than for a guessed time.
    short_lived = InstanceRegistry(redis, heartbeat_timeout=0.3, base_url=BASE)
    await short_lived.refresh_node("node-a")

    async def node_a_dead() -> bool:
        await registry.liveness.refresh()
        return registry.liveness.alive == ("node-b",)

    await wait_until(node_a_dead, timeout=30, what="node-a's liveness to end")
    view = await registry.view(iid)
    assert view["status"] == "offline"
    assert view["agents"] == 0
    assert view["last_seen"] is not None  # models and last_seen survive going offline
    assert view["models"] == ["m1", "m2"]
    assert (await registry.view(other))["status"] == "online"
    page, _ = await registry.list(status="offline")
    assert [v["instance_id"] for v in page] == [iid]


async def test_replicas_on_two_nodes(registry):
    iid, _ = await registry.register("a")
    await registry.add_agent(iid, entry(agent_id="r1", node="node-a", models=("m1",)))
    await registry.add_agent(iid, entry(agent_id="r2", node="node-b", models=("m2",)))
    await registry.refresh_node("node-a")
    await registry.refresh_node("node-b")
    view = await registry.view(iid)
    assert view["agents"] == 2 and sorted(view["models"]) == ["m1", "m2"]
    await registry.drop_node("node-a")
    await registry.liveness.refresh()
    view = await registry.view(iid)
    assert (view["status"], view["agents"], view["models"]) == ("online", 1, ["m2"])
    await registry.drop_node("node-b")
    await registry.liveness.refresh()
    assert (await registry.view(iid))["status"] == "offline"


async def test_remove_agent_only_removes_the_matching_session(registry):
    before = time.time()
    iid, _ = await registry.register("a")
    await registry.add_agent(iid, entry(session="old"))
    await registry.refresh_node("node-a")
    # The agent reconnected: a new session replaced the old entry.
    await registry.add_agent(iid, entry(session="new"))
    # The old session's cleanup arrives late and must not take the new one down.
    assert await registry.remove_agent(iid, "agent-1", "old") is False
    assert await registry.remove_agent(iid, "other-agent", "new") is False
    live = await registry.live_agents(iid)
    assert [(e.agent_id, e.session) for e in live] == [("agent-1", "new")]
    assert (await registry.view(iid))["status"] == "online"

    assert await registry.remove_agent(iid, "agent-1", "new") is True
    view = await registry.view(iid)
    assert view["status"] == "offline" and view["agents"] == 0
    assert before <= view["last_seen"] <= time.time()
    assert await registry.remove_agent(iid, "agent-1", "new") is False


async def test_agent_entry_round_trip():
    e = entry()
    assert AgentEntry.decode(e.agent_id, e.encode()) == e


async def test_an_agent_on_a_node_younger_than_the_last_read_is_seen_at_once(registry, redis):
    # Each node reads the live nodes once a second; an agent on a node that started since
    # (listed before its agent was) is not skipped: a read of agents that met an unknown
    # node reads the set again, unless one begun after it already did, however recent
    # the last one (a read 10 ms before the new node was listed does not count).
    async def view(observer, iid):
        return (await observer.view(iid))["status"] == "online"

    async def views(observer, iid):
        return (await observer.views([iid]))[iid]["status"] == "online"

    async def live_agents(observer, iid):
        return len(await observer.live_agents(iid)) == 1

    async def pick(observer, iid):
        return (await observer.pick_agent(iid))[0] == "ok"

    for n, look in enumerate((view, views, live_agents, pick)):
        iid, _ = await registry.register(f"young-{n}")
        observer = InstanceRegistry(redis, heartbeat_timeout=HEARTBEAT_TIMEOUT, base_url=BASE + "/")
        await observer.liveness.refresh()  # just now, before the node below was listed
        await registry.refresh_node(f"node-new-{n}")
        await registry.add_agent(iid, entry(node=f"node-new-{n}"))
        assert await look(observer, iid), look.__name__
