"""What an agent can make a node hold, pushed past with the node's memory watched (issue 21, D and I).

Each test runs ``relay serve`` as its own process (``tests/bounds.py``) and
raw agents that speak the protocol by hand (``tests/test_hostile_agent.py``):

* a hello declaring far more (or far longer) model names than the relay
  takes is refused with 1008 naming the cap, in one bounded WARNING line;
* agents at the caps, with replicas declaring different names, make every
  model list (the directory, ``/v1/models``, SwiftChat's ``/api/models``)
  weigh a bounded amount, before and after they leave;
* more replicas of one instance than a node takes: 1013;
* pings far faster than a heartbeat: 1008, while an agent flooding tiny
  data frames within the frame budget and a real agent of another instance
  keep working, with the node logging at DEBUG (no line per frame).
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from websockets.exceptions import ConnectionClosed

import wire
from agent.backoff import FatalAgentError
from agent.client import AgentClient
from agent.demo_model import DemoBackend
from tests.bounds import DEADLINE, MiB, relay_process
from tests.helpers import FakeUpstream, chat_ok, online, openai_backend, running_agent, running_upstream, wait_until
from tests.test_hostile_agent import raw_agent

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

#: The defaults of RELAY_AGENT_MAX_MODELS and RELAY_AGENT_MAX_NAME_CHARS.
MAX_MODELS, MAX_NAME = 256, 256


def hello(models: tuple[str, ...], agent_id: str = "raw", **fields: tuple[str, ...]) -> wire.Hello:
    return wire.Hello(wire.PROTOCOL_VERSION, "raw", agent_id, models, 4, **fields)  # type: ignore[arg-type]


def names(prefix: str, n: int, length: int = MAX_NAME) -> tuple[str, ...]:
    return tuple(f"{prefix}-{i:05d}-".ljust(length, "x") for i in range(n))


async def refused(url: str, token: str, event: wire.Hello) -> tuple[int | None, str]:
    """The close code and reason a raw agent sending ``event`` as its hello gets."""
    async with raw_agent(url, token, hello=False) as agent:
        await agent.send(wire.encode(event))
        try:
            async with asyncio.timeout(DEADLINE):
                while True:
                    await agent.ws.recv()
        except ConnectionClosed as exc:
            return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")


async def test_a_hello_past_the_caps_is_refused_naming_the_cap(redis_url):
    """The issue's hello (10,000 names of ~400 characters, 4 MB, five instances) is past the frame limit
    (1 MiB: close 1009 before it is even decoded); one of 2,000 names (800 KB) is under it: 1008 naming
    the cap, one WARNING line each with no name in it, nothing recorded; the real agent stops for good."""
    async with relay_process(redis_url, RELAY_LOG_LEVEL="debug") as node:
        tokens = [await node.register(f"big{i}") for i in range(5)]
        huge = hello(names("m", 10_000, 400))
        assert len(wire.encode(huge)) > 4_000_000
        big = hello(names("m", 2_000, 400))
        assert 700_000 < len(wire.encode(big)) < 1024 * 1024
        async with node.watch() as watch:
            too_large = [await refused(node.url, token, huge) for _, token in tokens]
            outcomes = [await refused(node.url, token, big) for _, token in tokens]
            long_name = await refused(node.url, tokens[0][1], hello(("m" * (MAX_NAME + 1),)))
            split = await refused(node.url, tokens[0][1], hello(names("c", 200, 8), image_models=names("i", 57, 8)))
            unknown_ops = await refused(node.url, tokens[0][1], hello(("m",), capabilities=("embeddings",)))
        watch.assert_within(96 * MiB, "five 4 MB hellos and five of 800 KB")

        assert [code for code, _ in too_large] == [1009] * 5
        assert outcomes == [(1008, "hello declares 2000 models; this relay takes at most 256")] * 5
        assert long_name == (1008, "hello declares a model name of 257 characters; this relay takes at most 256")
        assert split == (1008, "hello declares 257 models; this relay takes at most 256")  # all kinds together
        assert unknown_ops[0] == 1008 and "no operation this relay runs" in unknown_ops[1]
        await node.proc.wait_for_count(r"WARNING relay.gateway .*refused agent", 8)  # (1009 is uvicorn's)
        assert max(len(line) for line in node.proc.lines) < 4096 + 200
        assert not any("m-00000-" in line for line in node.proc.lines)  # no declared name is ever logged in full
        async with node.client() as client:
            for instance_id, _ in tokens:
                view = (await client.get(f"/api/instances/{instance_id}")).json()
                assert view["status"] == "offline" and view["models"] == []

        # The agent itself: a refused hello is final (it would be refused again), and says why.
        client_ = AgentClient(relay_url=node.url, token=tokens[0][1], backend=DemoBackend(rate=0),
                              models=list(names("a", 300, 16)), max_backoff=0.1, on_status=lambda line: None)
        with pytest.raises(FatalAgentError, match=r"refused this agent's hello \(1008\): hello declares 30\d models"):
            await asyncio.wait_for(client_.run(), DEADLINE)


async def test_model_lists_at_the_caps_stay_bounded(redis_url):
    """Twelve instances, each with two agents at the caps declaring different names (so each view's
    union would be 512 names): every list answers under a megabyte, pages end early, and what stays
    after the agents leave is the capped list."""
    async with relay_process(redis_url, RELAY_RATE_REGISTER_PER_IP="0") as node:
        registered = [await node.register(f"full{i}") for i in range(12)]
        async with node.watch() as watch, contextlib.AsyncExitStack() as stack:
            for i, (instance_id, token) in enumerate(registered):
                for replica in ("a", "b"):
                    declared = names(f"{i}{replica}", MAX_MODELS - 16) + names(f"{i}{replica}img", 16)
                    await stack.enter_async_context(raw_agent(
                        node.url, token, agent_id=replica,
                        hello_event=hello(declared[:-16], agent_id=replica, image_models=declared[-16:])))
                await wait_until(lambda iid=instance_id: online(node.url, iid, agents=2), what="both replicas")
            async with node.client() as client:
                view = (await client.get(f"/api/instances/{registered[0][0]}")).json()
                assert len(view["models"]) == 256 and len(view["image_models"]) == 32  # the union, capped
                sizes = {}
                pages = []
                cursor = ""
                while True:
                    response = await client.get(f"/api/instances?limit=500&cursor={cursor}")
                    sizes.setdefault("GET /api/instances?limit=500", len(response.content))
                    page = response.json()
                    pages.append(len(page["data"]))
                    if not page["next_cursor"]:
                        break
                    cursor = page["next_cursor"]
                models = await client.get("/v1/models?limit=500")
                sizes["GET /v1/models?limit=500"] = len(models.content)
                swift = await client.post("/api/models", json={})
                sizes["POST /api/models"] = len(swift.content)
                loads = await asyncio.gather(*(client.get("/api/instances?limit=500") for _ in range(20)))
        watch.assert_within(96 * MiB, "24 agents at the caps and 20 parallel directory loads")
        print(f"\n[sizes] {sizes}, directory pages {pages}")
        assert all(r.status_code == 200 for r in loads)
        assert sum(pages) == 12 and len(pages) > 1  # 12 views of 288 names: past one page's 1024
        assert models.json()["has_more"] is True
        assert all(size < 1 * MiB for size in sizes.values()), sizes

        await wait_until(lambda: _all_offline(node, [iid for iid, _ in registered]), what="the agents gone")
        async with node.client() as client:
            view = (await client.get(f"/api/instances/{registered[0][0]}")).json()
        assert len(view["models"]) <= MAX_MODELS  # models last reported: one agent's capped list


async def _all_offline(node, ids: list[str]) -> bool:
    async with node.client() as client:
        return all([(await client.get(f"/api/instances/{iid}")).json()["status"] == "offline" for iid in ids])


async def test_more_replicas_than_a_node_takes_get_1013(redis_url):
    async with relay_process(redis_url, RELAY_AGENTS_PER_INSTANCE="2") as node:
        instance_id, token = await node.register()
        async with raw_agent(node.url, token, agent_id="one"), raw_agent(node.url, token, agent_id="two"):
            code, reason = await refused(node.url, token, hello(("m",), agent_id="three"))
            assert (code, reason) == (1013, "instance has 2 agents on this relay node; it takes at most 2")
            # The same agent reconnecting replaces its own session: never refused for it.
            async with raw_agent(node.url, token, agent_id="two") as again:
                assert again.welcome is not None


async def test_a_ping_flood_is_closed_and_a_data_flood_within_budget_starves_nobody(redis_url):
    """At DEBUG: one raw agent floods pings (closed 1008), another sends 20,000 one-byte data frames
    paced within the frame budget to its own caller, while a real agent of a third instance answers
    chats throughout.  No line per frame; the node's memory stays flat."""
    upstream = FakeUpstream(chunks=20)
    async with running_upstream(upstream), relay_process(redis_url, RELAY_LOG_LEVEL="debug", RELAY_RATE_PER_CALLER="0",
                                                         RELAY_RATE_PER_INSTANCE="0") as node:
        good_id, good_token = await node.register("good")
        _, ping_token = await node.register("pings")
        data_id, data_token = await node.register("data")
        async with running_agent(node.url, good_token, openai_backend(upstream)), \
                node.client(timeout=DEADLINE) as client:
            await wait_until(lambda: online(node.url, good_id), what="the good agent online")
            lines_before = len(node.proc.lines)
            async with node.watch() as watch, raw_agent(node.url, ping_token, agent_id="pinger") as pinger, \
                    raw_agent(node.url, data_token, agent_id="streamer") as streamer:
                caller = asyncio.create_task(client.post(f"/api/chat/{data_id}", json={
                    "messages": [{"role": "user", "content": "hi"}], "stream": True}))
                request = await streamer.next_event(wire.Request)

                async def flood_pings() -> int | None:
                    with contextlib.suppress(ConnectionClosed):
                        for _ in range(20_000):
                            await pinger.send(wire.encode(wire.Ping(0.0)))
                    return await pinger.close_code(DEADLINE)

                async def flood_data() -> None:
                    # 20,000 frames (one byte each: the whole answer fits the window, no credit needed)
                    # in batches of 500, about 5,000 a second: half the default frame budget.
                    frame = wire.encode_data(request.id, b"x")
                    for _ in range(40):
                        for _ in range(500):
                            await streamer.send(frame)
                        await asyncio.sleep(0.1)
                    await streamer.send(wire.encode(wire.End(request.id)))

                async def chats() -> int:
                    done = 0
                    while not data.done():
                        assert await chat_ok(client, f"/api/chat/{good_id}")
                        done += 1
                    return done

                data = asyncio.create_task(flood_data())
                ping_code, served, _ = await asyncio.gather(flood_pings(), chats(), data)
                answer = await caller
            watch.assert_within(48 * MiB, "a ping flood and 20,000 data frames at DEBUG")
        assert ping_code == 1008
        assert answer.status_code == 200 and answer.content.count(b"x") == 20_000  # every frame, then [DONE]
        print(f"\n[chats] {served} chats of another instance answered during the floods")
        assert served >= 1
        flood_lines = node.proc.lines[lines_before:]
        assert not [line for line in flood_lines if "< TEXT" in line or "BINARY" in line or "> TEXT" in line]
        assert node.proc.count(r"agent pings faster than 10 per second") == 1


async def test_agents_blasting_frames_at_the_size_limit_hold_a_few_frames_each(redis_url):
    """20 agents each push 16 frames of just under 1 MiB without waiting for anything (data for a stream
    never opened: the first one handled closes them with 1002).  What waits to be handled is at most
    ``WS_MAX_QUEUE`` frames a connection (TCP holds the rest back), so the node holds a few MiB each,
    not the 16 MiB each one sent."""
    from relay.server.edge import WS_MAX_QUEUE

    frame = wire.encode_data(1, b"x" * (1024 * 1024 - 64))
    async with relay_process(redis_url, RELAY_RATE_REGISTER_PER_IP="0") as node:
        tokens = [await node.register(f"blast{i}") for i in range(20)]

        async def blast(token: str) -> int | None:
            async with raw_agent(node.url, token) as agent:
                with contextlib.suppress(ConnectionClosed):
                    for _ in range(16):
                        await agent.send(frame)
                return await agent.close_code(timeout=DEADLINE)

        async with node.watch() as watch:
            codes = await asyncio.gather(*(blast(token) for _, token in tokens))
        assert codes == [1002] * 20
        # Each connection: the frame being read plus WS_MAX_QUEUE waiting, of 1 MiB each.
        watch.assert_within(20 * (WS_MAX_QUEUE + 2) * MiB, "20 agents each sending 16 frames of 1 MiB")
        async with node.client() as client:
            assert (await client.get("/readyz")).status_code == 200
