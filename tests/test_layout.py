"""The key layout: data of layout 1 moved to layout 2, and a dead node's leftovers swept.

The layout-1 data is written here as the 0.13 relay wrote it (the key names
and records it used), then a relay of today starts on it: the instance,
its agent token, its visibility and its caller keys must all still work.
"""

from __future__ import annotations

import time

import httpx
import orjson
import pytest
import websockets

from relay.store import keys, migrate
from relay.store.agents import AgentEntry
from relay.store.liveness import NodeLiveness
from relay.store.registry import InstanceRegistry
from relay.store.tokens import hash_token
from tests.helpers import running_agent, running_relay

pytestmark = pytest.mark.anyio

TOKEN = "ira_" + "t" * 43
CALLER_KEY = "irk_" + "k" * 43


async def write_layout_1(redis, iid: str = "0123456789abcdef") -> str:
    """One private instance with one caller key, as relay 0.13 stored it."""
    token_hash, key_hash = hash_token(TOKEN), hash_token(CALLER_KEY)
    await redis.hset(f"ir:inst:{iid}", mapping={
        "name": "old", "description": "from 0.13", "token_hash": token_hash, "created_at": repr(time.time()),
        "seq": 1, "models": "[]", "visibility": "private"})
    await redis.set(f"ir:token:{token_hash}", iid)
    await redis.zadd("ir:instances", {iid: 1})
    await redis.set("ir:seq", 1)
    await redis.hset(f"ir:ckeys:{iid}", "key1",
                     orjson.dumps({"name": "app", "created_at": time.time(), "key_hash": key_hash}))
    await redis.set(f"ir:ckey:{key_hash}", f"{iid} key1")
    # What a running 0.13 relay left that nobody needs once it is stopped.
    await redis.hset(f"ir:agents:{iid}", "a1", orjson.dumps({"node": "gone", "session": "s"}))
    await redis.hset(f"ir:load:{iid}", "s", 1)
    return iid


async def test_a_relay_started_on_layout_1_data_moves_it_and_serves_it(redis, redis_url):
    iid = await write_layout_1(redis)
    async with running_relay(redis_url) as relay:
        assert await redis.get(keys.LAYOUT_KEY) == str(keys.LAYOUT).encode()
        assert not await redis.exists(f"ir:inst:{iid}", f"ir:ckeys:{iid}", f"ir:agents:{iid}", f"ir:load:{iid}")
        async with httpx.AsyncClient(base_url=relay.url) as http:
            listed = (await http.get(f"/api/instances/{iid}")).json()
            assert (listed["name"], listed["visibility"], listed["status"]) == ("old", "private", "offline")
            # The owner's token still owns it, and the caller key still opens it.
            keys_seen = await http.get(f"/api/instances/{iid}/keys", headers={"Authorization": f"Bearer {TOKEN}"})
            assert [k["key_id"] for k in keys_seen.json()["data"]] == ["key1"]
            async with running_agent(relay.url, TOKEN):
                chat = await http.post(f"/api/chat/{iid}/chat/completions",
                                       headers={"Authorization": f"Bearer {CALLER_KEY}"},
                                       json={"messages": [{"role": "user", "content": "hi"}], "stream": False})
                assert chat.status_code == 200, chat.text
                refused = await http.post(f"/api/chat/{iid}/chat/completions",
                                          json={"messages": [{"role": "user", "content": "hi"}], "stream": False})
                assert refused.status_code == 401


async def test_the_move_happens_once_and_a_second_node_waits_for_it(redis):
    await write_layout_1(redis)
    assert await migrate.ensure_layout(redis) == 1
    assert await migrate.ensure_layout(redis) == 0
    await redis.set(migrate.LOCK_KEY, "1")  # as if another node were moving it...
    assert await migrate.ensure_layout(redis) == 0  # ... but the layout key says it is done


async def test_data_of_a_newer_layout_is_refused(redis):
    await redis.set(keys.LAYOUT_KEY, keys.LAYOUT + 1)
    with pytest.raises(migrate.LayoutTooNew, match="newer relay"):
        await migrate.ensure_layout(redis)


async def test_a_fresh_redis_gets_the_layout_key_and_nothing_else(redis):
    assert await migrate.ensure_layout(redis) == 0
    assert await redis.keys("*") == [keys.LAYOUT_KEY.encode()]


def entry(node: str, agent_id: str = "a1") -> AgentEntry:
    return AgentEntry(agent_id, node, f"s-{agent_id}-{node}", 4, ("m",), 0.0)


async def test_a_long_dead_node_is_swept_from_every_instance_then_forgotten(redis):
    registry = InstanceRegistry(redis, heartbeat_timeout=0.2, base_url="http://relay")
    liveness: NodeLiveness = registry.liveness
    ids = [(await registry.register(f"i{n}"))[0] for n in range(3)]
    for iid in ids:
        await registry.add_agent(iid, entry("node-dead"))
        await registry.add_agent(iid, entry("node-live", "a2"))
    await redis.hset(keys.load(ids[0]), "s-a1-node-dead", 2)
    await registry.drop_node("node-dead")
    await registry.refresh_node("node-live")
    liveness.memory_ms = 0  # forget as soon as dead, for the test
    due = await liveness.refresh()
    assert liveness.alive == ("node-live",) and due == ["node-dead"]
    assert await liveness.sweep("node-dead") == 3
    for iid in ids:
        assert [e.node for e in await registry.live_agents(iid)] == ["node-live"]
        assert await redis.hkeys(keys.agents(iid)) == [b"a2"]
    assert not await redis.hexists(keys.load(ids[0]), "s-a1-node-dead")
    assert not await redis.exists(keys.node_instances("node-dead"))
    assert await redis.zscore(keys.NODES, "node-dead") is None  # forgotten...
    assert await liveness.refresh() == [] and liveness.alive == ("node-live",)
    assert await redis.zscore(keys.NODES, "node-live") is not None


async def test_a_node_back_during_its_sweep_is_kept_and_made_to_re_assert(redis):
    registry = InstanceRegistry(redis, heartbeat_timeout=30, base_url="http://relay")
    await registry.drop_node("node-a")
    await registry.refresh_node("node-a")  # back (a long stall), before the sweep ran
    registry.liveness.memory_ms = 0
    await registry.liveness.sweep("node-a")
    assert await redis.zscore(keys.NODES, "node-a") is not None  # not forgotten...
    # ... and its liveness ended, so its next heartbeat re-asserts what the sweep deleted.
    assert await registry.refresh_node("node-a") is False
    assert await registry.node_alive("node-a")


async def test_a_node_never_heard_of_does_not_count_and_a_node_counts_itself(redis):
    # Fail safe: an entry whose node is unknown (forgotten, or never listed) is not online.
    registry = InstanceRegistry(redis, heartbeat_timeout=30, base_url="http://relay")
    iid, _ = await registry.register("x")
    await registry.add_agent(iid, entry("node-ghost"))
    await registry.liveness.refresh()
    assert (await registry.view(iid))["status"] == "offline"
    mine = NodeLiveness(redis, heartbeat_timeout=30, node_id="node-ghost")
    await mine.refresh()
    assert mine.alive == ("node-ghost",)  # before its first heartbeat is read back
    assert await mine.sweep("node-ghost") == 0  # never sweeps itself


async def test_one_node_sweeps_at_a_time(redis):
    registry = InstanceRegistry(redis, heartbeat_timeout=30, base_url="http://relay")
    await redis.set(keys.sweep_lock("node-x"), "1")
    iid, _ = await registry.register("x")
    await registry.add_agent(iid, entry("node-x"))
    assert await registry.liveness.sweep("node-x") == 0
    assert await redis.hexists(keys.agents(iid), "a1")


async def test_deleting_an_instance_leaves_nothing_under_its_nodes(redis):
    registry = InstanceRegistry(redis, heartbeat_timeout=30, base_url="http://relay")
    iid, _ = await registry.register("x")
    await registry.add_agent(iid, entry("node-a"))
    assert await redis.smembers(keys.node_instances("node-a")) == {iid.encode()}
    await registry.delete(iid)
    assert not await redis.exists(keys.node_instances("node-a"))


async def test_a_key_id_that_is_a_hash_field_is_no_key(redis):
    from relay.errors import NotFound
    from relay.store.access import AccessControl

    registry = InstanceRegistry(redis, heartbeat_timeout=30, base_url="http://relay")
    access = AccessControl(redis, registry, registration_key=None)
    iid, _ = await registry.register("x")
    created = await access.create_key(iid, "app")
    field = keys.caller_key_field(hash_token(created["key"]))
    assert await redis.hget(keys.caller_keys(iid), field) == created["key_id"].encode()
    with pytest.raises(NotFound):
        await access.revoke_key(iid, field)
    assert [k["key_id"] for k in await access.list_keys(iid)] == [created["key_id"]]
    await access.revoke_key(iid, created["key_id"])
    assert await redis.hlen(keys.caller_keys(iid)) == 0
    assert not await redis.exists(keys.caller_key_index(hash_token(created["key"])))


@pytest.mark.slow
async def test_a_node_started_without_redis_serves_nothing_until_the_layout_is_known(redis, redis_server):
    # Redis out of reach at start: the layout cannot be checked, so the node must not
    # serve agents (their tokens would look unknown in layout-1 data, a 401 they give
    # up on) nor chats.  It says 503 (retry) until Redis answers and the data is moved.
    from tests.helpers import wait_until
    from tests.redis_servers import PartitionableLink

    iid = await write_layout_1(redis)
    link = await PartitionableLink(str(redis_server.socket_path)).start()
    link.cut()
    try:
        async with running_relay(link.url, redis_timeout=0.5) as relay, relay.client() as http:
            assert relay.services.node.layout_ready is False
            assert (await http.get("/readyz")).status_code == 503
            chat = await http.post(f"/api/chat/{iid}", json={"messages": [{"role": "user", "content": "x"}]})
            assert chat.status_code == 503 and chat.headers["Retry-After"] == "1"
            ws_url = relay.url.replace("http://", "ws://") + "/api/agent/connect"
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(ws_url, additional_headers={"Authorization": f"Bearer {TOKEN}"}):
                    pass
            assert refused.value.response.status_code == 503  # retry: not a 401 the agent gives up on
            link.heal()
            await wait_until(lambda: relay.services.node.layout_ready, 30, what="the layout checked")
            assert await redis.exists(keys.instance(iid))
            async with running_agent(relay.url, TOKEN):
                await wait_until(lambda: _status(http, iid), 30, what="the moved instance online")
    finally:
        await link.stop()


async def _status(http: httpx.AsyncClient, iid: str) -> bool:
    return (await http.get(f"/api/instances/{iid}")).json()["status"] == "online"
