"""The router's choice: which agent a request goes to, decided by one Redis script.

Entries are written straight into a real Redis, so each case states exactly
which agents exist, on which nodes, how busy they are and what they can do.
"""

from __future__ import annotations

import orjson
import pytest

from relay.errors import InstanceUnavailable, ModelNotFound, NotFound, OperationUnsupported, RateLimited
from relay.serving.router import no_agent
from relay.store import keys
from relay.store.agents import AgentEntry
from relay.store.leases import Slot, StreamLeases
from relay.store.registry import InstanceRegistry

pytestmark = pytest.mark.anyio

INSTANCE = "inst1"


@pytest.fixture
async def registry(redis):
    registry = InstanceRegistry(redis, heartbeat_timeout=30.0, base_url="http://relay")
    await redis.hset(keys.instance(INSTANCE), mapping={"name": "x", "created_at": "0"})
    return registry


async def add(redis, agent_id: str, node: str = "n1", *, concurrency: int = 2, inflight: int = 0,
              capabilities: tuple[str, ...] = ("chat",), alive: bool = True, models: tuple[str, ...] = ("m",),
              image_models: tuple[str, ...] = ()) -> AgentEntry:
    entry = AgentEntry(agent_id, node, f"s-{agent_id}", concurrency, models, 0.0, capabilities, image_models)
    await redis.hset(keys.agents(INSTANCE), agent_id, entry.encode())
    if inflight:
        await redis.hset(keys.load(INSTANCE), entry.session, inflight)
    # A node's liveness ends at its score (ms, Redis clock): far ahead, or long past.
    await redis.zadd(keys.NODES, {node: 2**50 if alive else 0})
    return entry


async def picks(registry, n: int, op: str = "chat", exclude: tuple[str, ...] = (),
                here: str = "n1", model: str = "") -> list[str | None]:
    await registry.liveness.refresh()  # as every node does once a second
    out = []
    for _ in range(n):
        verdict, entry = await registry.pick_agent(INSTANCE, op, exclude, here=here, model=model)
        out.append(entry.agent_id if entry else verdict)
    return out


async def test_the_least_busy_agent_relative_to_its_concurrency_wins(registry, redis):
    await add(redis, "big", concurrency=10, inflight=4)  # 40 % busy
    await add(redis, "small", concurrency=2, inflight=1)  # 50 % busy
    assert await picks(registry, 1) == ["big"]
    assert int(await redis.hget(keys.load(INSTANCE), "s-big")) == 5  # the pick took the slot


async def test_agents_at_capacity_are_skipped_then_busy(registry, redis):
    await add(redis, "a", concurrency=1, inflight=1)
    await add(redis, "b", concurrency=2)
    assert await picks(registry, 3) == ["b", "b", "busy"]
    await registry.release_agent(INSTANCE, "s-b")
    assert await picks(registry, 1) == ["b"]


async def test_ties_go_round(registry, redis):
    for name in ("a", "b", "c"):
        await add(redis, name, concurrency=100)
    chosen = await picks(registry, 30)
    assert set(chosen) == {"a", "b", "c"}  # each replica gets requests, even one at a time


async def test_only_agents_that_can_run_the_operation(registry, redis):
    await add(redis, "chatter", capabilities=("chat",))
    await add(redis, "painter", capabilities=("images",))
    assert await picks(registry, 2, "images") == ["painter", "painter"]
    assert await picks(registry, 2, "chat") == ["chatter", "chatter"]
    assert await picks(registry, 1, "transcribe") == ["incapable"]


OLD_ENTRY = b'{"node":"n-old","session":"s-old","max_concurrency":1,"models":["m"],"connected_at":0}'


async def test_an_entry_without_capabilities_is_a_chat_only_agent(registry, redis):
    # Entries written by 0.1 relays carry no capabilities (nor a bus version).
    await redis.hset(keys.agents(INSTANCE), "old", OLD_ENTRY)
    await redis.zadd(keys.NODES, {"n-old": 2**50})
    assert await picks(registry, 1, "chat", here="n-old") == ["old"]
    assert await picks(registry, 1, "images", here="n-old") == ["incapable"]
    (entry,) = await registry.live_agents(INSTANCE)
    assert entry.capabilities == ("chat",)


async def test_agents_of_a_node_that_cannot_read_our_bus_are_out_of_reach(registry, redis):
    # During a rolling upgrade a 0.2 node must not send a stream to a 0.1 node's agent.
    await redis.hset(keys.agents(INSTANCE), "old", OLD_ENTRY)
    await redis.zadd(keys.NODES, {"n-old": 2**50})
    assert await picks(registry, 1, "chat", here="n-new") == ["offline"]
    await add(redis, "new", node="n-new2")
    assert await picks(registry, 2, "chat", here="n-new") == ["new", "new"]


async def test_null_capabilities_mean_chat(registry, redis):
    await redis.hset(keys.agents(INSTANCE), "odd", OLD_ENTRY.replace(b'"connected_at":0', b'"connected_at":0,'
                                                                      b'"capabilities":null,"bus":1'))
    await redis.zadd(keys.NODES, {"n-old": 2**50})
    assert await picks(registry, 1, "chat") == ["odd"]


async def test_capable_agents_out_of_reach_are_offline_not_unsupported(registry, redis):
    await add(redis, "chatter", node="n2")
    await add(redis, "painter", node="n3", capabilities=("images",))
    assert await picks(registry, 1, "chat", exclude=("n2",)) == ["offline"]  # 503, and the caller may retry


async def test_excluded_nodes_and_dead_nodes(registry, redis):
    await add(redis, "on-gone-node", node="n-gone", alive=False)
    await add(redis, "on-excluded", node="n2")
    assert await picks(registry, 1, exclude=("n2",)) == ["offline"]
    assert await picks(registry, 1) == ["on-excluded"]
    # The dead node's entry is skipped, and left for the sweep (its node may
    # be back within the second the list of dead nodes is old).
    await redis.zadd(keys.NODES, {"n-gone": 2**50})
    assert "on-gone-node" in await picks(registry, 2)


async def test_unknown_and_offline_instances(registry, redis):
    assert (await registry.pick_agent("nope"))[0] == "missing"
    assert (await registry.pick_agent(INSTANCE))[0] == "offline"


@pytest.mark.parametrize("verdict, error, status", [
    ("missing", NotFound, 404), ("offline", InstanceUnavailable, 503), ("busy", InstanceUnavailable, 503),
    ("incapable", OperationUnsupported, 501), ("no_model", ModelNotFound, 404),
])
def test_each_verdict_has_its_error(verdict, error, status):
    exc = no_agent(INSTANCE, "chat", verdict)
    assert isinstance(exc, error) and exc.status == status
    if verdict == "busy":
        assert exc.headers["Retry-After"] == "1" and exc.code == "instance_at_capacity"


async def test_a_slot_given_back_after_the_agents_node_reset_the_counter_does_not_go_negative(registry, redis):
    await add(redis, "a", concurrency=1)
    assert await picks(registry, 1) == ["a"]
    await registry.reset_load([(INSTANCE, "s-a")])  # the agent's node saw it idle first
    await registry.release_agent(INSTANCE, "s-a")  # then the routing node gives its slot back
    assert await redis.hget(keys.load(INSTANCE), "s-a") is None
    assert await picks(registry, 2) == ["a", "busy"]  # still one slot, not two


async def test_a_named_model_picks_only_agents_that_serve_it(registry, redis):
    await add(redis, "llama", models=("llama3", "m"), concurrency=4, inflight=3)
    await add(redis, "qwen", models=("qwen2", "m"), concurrency=4)
    assert await picks(registry, 2, model="llama3") == ["llama", "busy"]  # the idle qwen agent is no help
    assert await picks(registry, 1, model="qwen2") == ["qwen"]
    assert await picks(registry, 1, model="mistral") == ["no_model"]
    assert await picks(registry, 1, model="") != ["no_model"]  # no model named: any agent


async def test_image_models_are_their_own_list(registry, redis):
    await add(redis, "painter", capabilities=("chat", "images"), models=("chat-model",), image_models=("sdxl",))
    assert await picks(registry, 1, "images", model="sdxl") == ["painter"]
    assert await picks(registry, 1, "images", model="chat-model") == ["no_model"]
    assert await picks(registry, 1, "chat", model="sdxl") == ["no_model"]
    await registry.release_agent(INSTANCE, "s-painter")
    verdict, entry = await registry.pick_agent(INSTANCE, "images")
    assert verdict == "ok" and entry.serves("images") == ("sdxl",) and entry.serves("chat") == ("chat-model",)


async def test_an_entry_without_image_models_serves_none(registry, redis):
    # What a version-1 agent's entry (or a 0.1 node's) looks like: no image_models key at all.
    await redis.hset(keys.agents(INSTANCE), "old", orjson.dumps(
        {"node": "n1", "session": "s-old", "max_concurrency": 2, "models": ["m"], "connected_at": 0}))
    await redis.zadd(keys.NODES, {"n1": 2**50})
    assert await picks(registry, 1, "chat", model="m") == ["old"]
    assert await picks(registry, 1, "images", model="x") == ["incapable"]


# -- the first pick takes the request's stream lease (leases.StreamLeases.pick) --------------


async def test_the_first_pick_takes_the_stream_lease_in_the_same_script(registry, redis):
    leases = StreamLeases(redis, ttl_ms=60_000)
    slot = Slot(keys.streams("instance", INSTANCE), 1, "this instance")
    await add(redis, "a", concurrency=5)
    await registry.liveness.refresh()

    first = leases.prepare([slot])
    verdict, entry = await leases.pick(first, registry, INSTANCE, "chat", here="n1", model="")
    assert verdict == "ok" and entry is not None and entry.agent_id == "a"
    assert await redis.zrange(slot.key, 0, -1) == [first.lease.id.encode()]  # the lease, taken
    assert first.lease.id in leases.held  # renewed and released like any other
    assert int(await redis.hget(keys.load(INSTANCE), "s-a")) == 1

    # The limit is full: 429, and the agent's slot is not taken either.
    with pytest.raises(RateLimited) as refused:
        await leases.pick(leases.prepare([slot]), registry, INSTANCE, "chat", here="n1", model="")
    assert refused.value.code == "too_many_streams"
    assert int(await redis.hget(keys.load(INSTANCE), "s-a")) == 1

    # A pick that finds no agent takes no lease: the limit's room stays for later.
    await leases.release(first.lease, [(keys.load(INSTANCE), "s-a")])
    assert await redis.zcard(slot.key) == 0
    none = leases.prepare([slot])
    assert (await leases.pick(none, registry, INSTANCE, "chat", here="n1", model="absent"))[0] == "no_model"
    assert await redis.zcard(slot.key) == 0 and none.lease.id not in leases.held

    # With every limit off, it is the plain pick.
    off = leases.prepare([Slot(slot.key, 0, "this instance")])
    assert (await leases.pick(off, registry, INSTANCE, "chat", here="n1", model=""))[0] == "ok"
    assert await redis.zcard(slot.key) == 0
