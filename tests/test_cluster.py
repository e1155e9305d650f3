"""The relay on a Redis Cluster: the URL, the version it needs, and the faults an operator fears.

A real cluster (``tests/redis_servers.py``: three masters, three replicas,
from Debian's packages) behind two in-process relay nodes, the caller at
node A and the agent at node B, so every stream crosses the bus.  Two places
a fault can hit: the shard holding the instance's keys (access, the pick,
the leases: one slot, its hash tag) and the shard carrying node B's inbox
(a shard channel: the request and the credits A sends to B).  Each is
killed (SIGKILL, its replica promoted) and migrated to another master while
chats flow.  Recovery times are printed with ``-s``, never asserted on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import anyio
import httpx
import orjson
import pytest
from redis.cluster import key_slot
from redis.exceptions import RedisError

from relay.settings import RelaySettings
from relay.store import connection, keys
from relay.store.connection import ClusterURL
from relay.store.embedded import safe_url
from tests.helpers import (
    FakeUpstream,
    Stopwatch,
    assert_serve_refuses_url,
    chat_ok,
    offline,
    online,
    openai_backend,
    running_agent,
    running_relay,
    running_upstream,
    sse_lines,
    stream_in_flight,
    wait_until,
)
from tests.redis_servers import ClusterSet, PartitionableLink

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def test_cluster_urls_parse_and_refuse_clearly():
    url = ClusterURL.parse("redis+cluster://app:s%40cret@10.0.0.1:7000,[::1]:7001")
    assert (url.nodes, url.username, url.password, url.ssl) == (
        [("10.0.0.1", 7000), ("::1", 7001)], "app", "s@cret", False)
    assert ClusterURL.parse("rediss+cluster://r1:7000").ssl
    for bad, says in [("redis+cluster://r1", "not host:port"),
                      ("redis+cluster://r1:7000/2", "one database"),
                      ("redis://r1:7000", "not a cluster URL")]:
        with pytest.raises(ValueError, match=says):
            ClusterURL.parse(bad)
    assert safe_url("redis+cluster://app:pw@r1:7000,r2:7001") == "redis+cluster://***@r1:7000,r2:7001"


@pytest.mark.parametrize("url", ["redis+cluster://r1", "redis+cluster://r1:7000/3"])
def test_relay_serve_refuses_a_bad_cluster_url_clearly(url, capsys, tmp_path):
    assert_serve_refuses_url(url, tmp_path, capsys)


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    servers = ClusterSet(tmp_path_factory.mktemp("cluster")).start()
    yield servers
    servers.stop()


@pytest.fixture
def cluster(shared_cluster):
    """The module's cluster, emptied, its nodes agreeing on the slots (a test that moves
    slots leaves them moved: each test finds its keys' masters from the map)."""
    shared_cluster.wait_converged()
    shared_cluster.flushall()
    return shared_cluster


@pytest.fixture
def fresh_cluster(tmp_path):
    """A cluster of its own, for a test that kills a master or leaves a slot unserved."""
    servers = ClusterSet(tmp_path).start()
    yield servers
    servers.stop()


async def test_the_version_check_asks_every_master_and_wants_7_for_a_cluster(cluster):
    client = connection.connect(cluster.url, RelaySettings())
    try:
        version = await connection.check_version(client)
        assert connection.parse_version(version) >= connection.MINIMUM_CLUSTER_VERSION == (7, 0)
        with pytest.raises(connection.RedisTooOld, match=r"needs 99\.0 or newer as a cluster"):
            await connection.check_version(client, (99, 0))
    finally:
        await connection.close(client)




def where(cluster: ClusterSet, target: str, instance_id: str, node_b_id: str):
    """The master a fault hits: the instance's keys' shard, or node B's inbox channel's."""
    key = keys.instance(instance_id) if target == "instance" else keys.inbox(node_b_id)
    return cluster.master_for_key(key), key_slot(key.encode())


@pytest.mark.parametrize("target", ["instance", "inbox"])
async def test_a_master_killed_mid_stream_then_chats_across_nodes_work_again(fresh_cluster, target):
    cluster = fresh_cluster
    upstream = FakeUpstream(chunks=20, hold_after=2)
    async with running_upstream(upstream), running_relay(cluster.url, redis_timeout=1.0) as node_a, \
            running_relay(cluster.url, redis_timeout=1.0) as node_b:
        instance_id, token = await node_a.register()
        async with running_agent(node_b.url, token, openai_backend(upstream)), node_a.client() as client:
            await wait_until(lambda: online(node_a, instance_id), what="the agent online, seen from A")
            url = f"/api/chat/{instance_id}"
            assert await chat_ok(client, url)
            master, _ = where(cluster, target, instance_id, node_b.services.node.node_id)
            # What is on the master is on its replica before it dies (replication is asynchronous).
            assert cluster.client(master).execute_command("WAIT", 1, 5000) == 1
            clock = Stopwatch(f"cluster failover, the {target}'s master SIGKILLed, a stream across nodes in flight")
            async with stream_in_flight(client, url, {**CHAT, "stream": True}) as stream:
                cluster.kill(master)
                upstream.release()
                events = await stream.rest(60)
            clock.lap("the stream in flight ended")
            assert events[-1] == "[DONE]"
            whole = len(events) == 20 + 2  # 20 words, the finish chunk, [DONE]
            assert whole or "error" in orjson.loads(events[-2]), events[-3:]
            await asyncio.to_thread(cluster.wait_failover, master)
            clock.lap("replica promoted, cluster ok")
            await wait_until(lambda: chat_ok(client, url), 60, 0.1, "a chat across nodes after the failover")
            clock.lap("chats across nodes work again")
            # No instance stuck offline: seen online from both nodes (each node may have
            # been taken for dead while the shard holding the liveness was down, and
            # says so again on its next heartbeat).
            await wait_until(lambda: online(node_a, instance_id), 30, what="online at A after the failover")
            await wait_until(lambda: online(node_b, instance_id), 30, what="online at B after the failover")
            clock.lap("online at both nodes")
        # No instance stuck online: the agent leaves, and both nodes see it offline.
        await wait_until(lambda: offline(node_a, instance_id), 30, what="offline after its agent left")
        await wait_until(lambda: offline(node_b, instance_id), 30, what="offline at B too")


@pytest.mark.parametrize("target", ["instance", "inbox"])
async def test_a_slot_migrated_while_chats_flow(cluster, target):
    # Chats across nodes one after another while the slot moves to another
    # master key by key (ASK redirects, TRYAGAIN for a script whose keys are
    # split for a moment): none is refused.  An inbox's shard channel is
    # dropped by Redis when its slot moves (SUNSUBSCRIBE): node B subscribes
    # again on the new owner, and a stream crossing at that moment may end
    # with an error event, but never hangs; chats after it work.
    upstream = FakeUpstream(chunks=5)
    async with running_upstream(upstream), running_relay(cluster.url) as node_a, \
            running_relay(cluster.url) as node_b:
        instance_id, token = await node_a.register()
        # A few caller keys and conversations, so the slot has keys to move.
        owner = {"Authorization": f"Bearer {token}"}
        node_b_id = node_b.services.node.node_id
        async with running_agent(node_b.url, token, openai_backend(upstream)), node_a.client() as client:
            for n in range(3):
                assert (await client.post(f"/api/instances/{instance_id}/keys", headers=owner,
                                          json={"name": f"k{n}"})).status_code == 201
            await wait_until(lambda: online(node_a, instance_id), what="the agent online, seen from A")
            url = f"/api/chat/{instance_id}"
            source, slot = where(cluster, target, instance_id, node_b_id)
            destination = next(m for m in cluster.masters() if m is not source)
            outcomes: list[str] = []
            moving = True

            async def chat_forever() -> None:
                while moving:
                    try:
                        async with client.stream("POST", url, json={**CHAT, "stream": True}) as response:
                            if response.status_code != 200:
                                error = orjson.loads(await response.aread())["error"]
                                outcomes.append(f"{response.status_code} {error['code']}")
                                continue
                            events = await sse_lines(response)
                            outcomes.append("whole" if events[-1] == "[DONE]" and len(events) == 5 + 2
                                            else "error event" if events[-1] == "[DONE]" else "cut")
                    except httpx.HTTPError as exc:
                        outcomes.append(f"http error {exc!r}")

            clock = Stopwatch(f"cluster slot migration of the {target}'s slot while chats flow")
            async with anyio.create_task_group() as tg:
                tg.start_soon(chat_forever)
                await wait_until(lambda: len(outcomes) >= 3, 30, what="chats flowing before the move")
                moved = await asyncio.to_thread(cluster.migrate_slot, slot, destination, batch=2, pause=0.05)
                clock.lap(f"slot {slot} moved ({moved} keys) with {len(outcomes)} chats done")
                await asyncio.to_thread(cluster.wait_converged)
                settled = len(outcomes)
                await wait_until(lambda: len(outcomes) >= settled + 3, 30, what="chats after the move")
                moving = False
            assert cluster.master_for_slot(slot) is destination
            print(f"outcomes of the chats during the {target}'s move: {sorted(set(outcomes))} "
                  f"({outcomes.count('whole')} whole of {len(outcomes)})")
            if target == "instance":
                assert set(outcomes) == {"whole"}, outcomes  # the move is invisible to callers
                assert moved >= 4  # the record, the agents, the caller keys, ...
            else:
                # For the moment node B is not subscribed (on neither shard), node A
                # cannot reach it: a stream crossing then ends with an error event (or,
                # before its first byte, a 503 relay_unavailable), a new one is refused
                # with 503 (retry), nothing else.
                refused = [o for o in outcomes
                           if o not in ("whole", "error event", "503 instance_offline", "503 relay_unavailable")]
                assert not refused, refused
            assert outcomes[-3:] == ["whole"] * 3
            if target == "inbox":
                # Node B follows its inbox to the new owner.
                deadline = time.monotonic() + 10
                shard = cluster.client(destination)
                while shard.execute_command("PUBSUB", "SHARDNUMSUB", keys.inbox(node_b_id))[1] != 1:
                    assert time.monotonic() < deadline, "node B did not subscribe on the new owner"
                    await asyncio.sleep(0.05)


async def test_each_shard_channel_is_followed_on_its_own(cluster):
    # The registry-events channel's shard failing must not cost this node its inbox:
    # on a cluster each channel has its own connection, lost and rebuilt on its own.
    from relay.serving.subscriber import Subscriber

    events = keys.EVENTS_CHANNEL
    shard_of_events = cluster.master_for_key(events)
    inbox = next(keys.inbox(f"n{i}") for i in range(100)
                 if cluster.master_for_key(keys.inbox(f"n{i}")) is not shard_of_events)
    lost: list[frozenset[str]] = []
    subscribed: list[tuple[frozenset[str], bool]] = []

    async def on_subscribed(channels: frozenset[str], again: bool) -> None:
        subscribed.append((channels, again))

    client = connection.connect(cluster.url, RelaySettings())
    watch = Subscriber(client, {events: lambda data: None, inbox: lambda data: None},
                       on_subscribed=on_subscribed, on_lost=lost.append)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch.run)
            await watch.listening.wait()
            assert {c for c, _ in subscribed} == {frozenset([events]), frozenset([inbox])}
            cluster.client(shard_of_events).client_kill_filter(_type="pubsub")
            await wait_until(lambda: (frozenset([events]), True) in subscribed, 30, what="events resubscribed")
            assert lost == [frozenset([events])]  # the inbox never noticed
            await watch.listening.wait()
            tg.cancel_scope.cancel()
    finally:
        await connection.close(client)


def keys_on(cluster: ClusterSet, master, count: int, prefix: str = "k") -> list[str]:
    """``count`` keys held by ``master``, each in a slot of its own."""
    found: dict[int, str] = {}
    for n in range(100_000):
        key = f"{prefix}{n}"
        slot = key_slot(key.encode())
        if slot not in found and cluster.master_for_slot(slot) is master:
            found[slot] = key
            if len(found) == count:
                return list(found.values())
    raise LookupError(f"fewer than {count} slots on the master on port {master.port}")


async def test_a_key_already_moved_is_served_by_the_importing_node_at_once(cluster):
    # Mid-migration the source answers ASK for a key it has handed over; the
    # target serves it only to a connection that has just said ASKING.
    # redis-py's asyncio client sent ASKING and the command from the node's pool,
    # on two connections once it had several: MOVED back, and the command
    # bounced until "TTL exhausted" for as long as the slot moved.
    source, target, _ = cluster.masters()
    key = keys_on(cluster, source, 1)[0]
    slot = key_slot(key.encode())
    client = connection.connect(cluster.url, RelaySettings())
    client.split_keys_wait = 0  # a bounce is an error here, not waited out
    try:
        await client.set(key, "handed over")
        # Several idle connections to the target, as a busy relay has.
        await asyncio.gather(*(client.get(k) for k in keys_on(cluster, target, 8)))
        await asyncio.to_thread(cluster.begin_migration, slot, target)
        assert await asyncio.to_thread(cluster.move_keys, slot, source, target) == 1
        for _ in range(5):
            assert await client.get(key) == b"handed over"
        # A new key of the migrating slot goes to the target too (ASK: the source lacks it).
        sibling = next(k for n in range(100_000) if key_slot((k := f"{{{key}}}{n}").encode()) == slot)
        assert await client.set(sibling, "new") and await client.get(sibling) == b"new"
        counts = [cluster.client(m).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) for m in (source, target)]
        assert counts == [0, 2]
    finally:
        await connection.close(client)
        await asyncio.to_thread(cluster.migrate_slot_rest, slot, source, target)  # the next test's cluster whole


async def test_slots_moved_elsewhere_do_not_cut_commands_in_flight(cluster):
    # redis-py closed every connection to every node on each fifth MOVED, commands
    # in flight included ("Connection lost"): during a slot migration, chats on
    # other shards failed.  A MOVED now only corrects the slot map.
    source, target, bystander = cluster.masters()
    moved_keys = keys_on(cluster, source, 6)
    queue = keys_on(cluster, bystander, 1, prefix="queue")[0]
    client = connection.connect(cluster.url, RelaySettings(redis_timeout=10))
    try:
        for key in moved_keys:
            await client.set(key, key)
        for key in moved_keys:  # the client's map is now wrong for six slots
            await asyncio.to_thread(cluster.migrate_slot, key_slot(key.encode()), target)
        await asyncio.to_thread(cluster.wait_converged)
        waiting = asyncio.create_task(client.blpop([queue], timeout=0))
        await wait_until(lambda: int(cluster.client(bystander).info("clients")["blocked_clients"]) == 1,
                         30, what="the BLPOP waiting on the third master")
        assert [await client.get(key) for key in moved_keys] == [key.encode() for key in moved_keys]
        cluster.client(bystander).lpush(queue, "done")
        assert tuple(await waiting) == (queue.encode(), b"done")
    finally:
        await connection.close(client)


def script_errors(cluster: ClusterSet, master) -> int:
    """Error replies starting "ERR" the master has sent (a script refused for a key not there is one)."""
    stats = cluster.client(master).info("errorstats")
    return int(stats.get("errorstat_ERR", {}).get("count", 0))


async def test_conversation_scripts_wait_out_their_slot_migrating(cluster):
    # A turn's script reaches keys it cannot declare (each message's index entry, found
    # through the conversation, and the new message's).  While the slot migrates, Redis
    # refuses a script at the first such key not on the master, keeping what it wrote
    # before: each script reaches them all before it writes, so the refusal means
    # nothing changed, and it is sent again until the slot has moved.  The turn then
    # completes whole: its message finished, its index entry written (feedback finds it).
    from relay.store.conversations import ConversationStore, Scope

    client = connection.connect(cluster.url, RelaySettings(redis_timeout=30.0))
    store = ConversationStore(client, retention_seconds=3600, max_messages=100, max_conversations=100,
                              max_message_bytes=10_000, stale_after=60)
    scope = Scope("3f9c0a7e5d1b2c48", "key:k1", "u1")
    try:
        first = await store.start_turn(scope, None, "my name is Ada", {}, now=1.0)
        assert await store.finish(first, "hello Ada", "normal", now=2.0)
        cid = first.conversation_id
        slot = key_slot(keys.conversation(scope.instance_id, cid).encode())
        source = cluster.master_for_slot(slot)
        target = next(m for m in cluster.masters() if m is not source)
        await asyncio.to_thread(cluster.begin_migration, slot, target)
        refused_before = script_errors(cluster, source)
        turn = asyncio.create_task(store.start_turn(scope, cid, "what is my name?", {}, now=3.0))
        await wait_until(lambda: script_errors(cluster, source) > refused_before, 30,
                         what="the turn's script refused while its slot migrates")
        assert not turn.done()  # the new message's index entry cannot be written until the slot has moved
        await asyncio.to_thread(cluster.migrate_slot_rest, slot, source, target)
        second = await turn
        assert [m["query"] for m in second.history] == ["my name is Ada"]
        assert await store.finish(second, "you are Ada", "normal", now=4.0)
        await store.feedback(scope, second.message_id, "like", now=5.0)
        page, more = await store.messages(scope, cid, None, 10, now=6.0)
        assert [(m["query"], m["status"], m["feedback"]) for m in page] == [
            ("what is my name?", "normal", {"rating": "like"}), ("my name is Ada", "normal", None)]
        assert not more
    finally:
        await connection.close(client)


def open_connections(client) -> int:
    return sum(c.is_connected for node in client.nodes_manager.nodes_cache.values() for c in node._connections)


async def test_a_slot_left_uncovered_cuts_nothing_in_flight_and_close_still_closes_all(fresh_cluster):
    cluster = fresh_cluster
    # redis-py answered CLUSTERDOWN (a slot no master serves) by closing every connection
    # to every node, and a refresh that then failed ("All slots are not covered") the
    # same way: a command waiting on another master died.  And once the map was marked
    # stale, closing the client closed nothing.
    source, _, bystander = cluster.masters()
    key = keys_on(cluster, source, 1)[0]
    queue = keys_on(cluster, bystander, 1, prefix="queue")[0]
    client = connection.connect(cluster.url, RelaySettings(redis_timeout=10))
    try:
        await asyncio.gather(*(client.get(k) for m in cluster.masters() for k in keys_on(cluster, m, 3)))
        waiting = asyncio.create_task(client.blpop([queue], timeout=0))
        await wait_until(lambda: int(cluster.client(bystander).info("clients")["blocked_clients"]) == 1,
                         30, what="the BLPOP waiting on the third master")
        for node in cluster.live():
            cluster.client(node).config_set("cluster-require-full-coverage", "no")
        for master in cluster.masters():
            cluster.client(master).execute_command("CLUSTER", "DELSLOTS", key_slot(key.encode()))
        for _ in range(2):  # CLUSTERDOWN, then a refresh that fails
            with pytest.raises(RedisError):
                await client.get(key)
        cluster.client(bystander).lpush(queue, "done")
        assert tuple(await waiting) == (queue.encode(), b"done")
        assert open_connections(client) > 0
    finally:
        await connection.close(client)
    assert open_connections(client) == 0


async def test_a_redirected_pipeline_does_not_wait_for_a_second_connection(cluster):
    # A pipeline holds one of the client's permits (redis_max_connections) and re-sends
    # its redirected commands one by one: each wanted a permit of its own, and with
    # every permit held by such a pipeline, all waited forever.
    source, target, _ = cluster.masters()
    key = keys_on(cluster, source, 1)[0]
    client = connection.connect(cluster.url, RelaySettings(redis_max_connections=1))
    try:
        await client.set(key, "moved")
        await asyncio.to_thread(cluster.migrate_slot, key_slot(key.encode()), target)
        await asyncio.to_thread(cluster.wait_converged)
        async with client.pipeline(transaction=False) as pipe:
            pipe.get(key)
            assert await asyncio.wait_for(pipe.execute(), 30) == [b"moved"]
    finally:
        await connection.close(client)


async def answered(client: httpx.AsyncClient, url: str) -> int | str:
    """A streamed chat's status (200 only when it ended with [DONE]), or "no answer"."""
    try:
        async with client.stream("POST", url, json={**CHAT, "stream": True}, timeout=30) as response:
            if response.status_code != 200:
                await response.aread()
                return response.status_code
            return 200 if (await sse_lines(response))[-1] == "[DONE]" else "cut"
    except httpx.HTTPError as exc:
        return f"no answer ({exc!r})"


@contextlib.asynccontextmanager
async def two_nodes_one_behind_links(cluster: ClusterSet):
    """Node B on the cluster directly; node A through a link per master (its URL names the
    links, its slot map too): yields (node A, node B, {master port: its link})."""
    links = {m.port: await PartitionableLink(("127.0.0.1", m.port)).start() for m in cluster.masters()}
    by_link = {("127.0.0.1", port): ("127.0.0.1", link.port) for port, link in links.items()}
    real_connect = connection.connect

    def through_links(url, settings, **options):
        client = real_connect(url, settings, **options)  # both of node A's clients, the patient one too
        client.nodes_manager.address_remap = lambda address: by_link.get(tuple(address), address)
        return client

    url_a = "redis+cluster://" + ",".join(f"127.0.0.1:{link.port}" for link in links.values())
    try:
        async with contextlib.AsyncExitStack() as stack:
            # Registrations until one lands on the spare shard, over several tries: no per-address limit.
            node_b = await stack.enter_async_context(running_relay(cluster.url, redis_timeout=1.0,
                                                                   rate_register_per_ip=0))
            connection.connect = through_links  # for node A's client only, made as it starts
            try:
                node_a = await stack.enter_async_context(running_relay(url_a, redis_timeout=1.0))
            finally:
                connection.connect = real_connect
            yield node_a, node_b, links
    finally:
        for link in links.values():
            await link.stop()


async def test_a_node_cut_off_from_one_shard_then_back(cluster):
    # Node A loses one master (its link cut: connections dropped, new ones never
    # answered); node B and the other masters are fine; the agents are on B.  The
    # master cut off holds one instance's keys and nothing else A needs for another
    # instance's chats (the node list, the events channel, either node's inbox).
    # While cut off: B serves both instances; at A the first instance gets a prompt
    # 503, never a hang, and the other is served as before.  Once the link is back,
    # A serves both again, and presence is right at both nodes.
    upstream = FakeUpstream(chunks=3)
    async with running_upstream(upstream):
        for _ in range(30):  # node ids are random: until one master holds none of the shared keys
            async with two_nodes_one_behind_links(cluster) as (node_a, node_b, links):
                shared = {keys.NODES, keys.EVENTS_CHANNEL,
                          *(keys.inbox(node.services.node.node_id) for node in (node_a, node_b))}
                spare = [m for m in cluster.masters() if all(cluster.master_for_key(k) is not m for k in shared)]
                if not spare:
                    continue
                await cut_off_from_one_shard(cluster, node_a, node_b, links[spare[0].port], spare[0], upstream)
                return
        raise AssertionError("no master was ever free of the shared keys")


async def cut_off_from_one_shard(cluster, node_a, node_b, link, shard, upstream) -> None:
    registered: dict[bool, tuple[str, str]] = {}
    while len(registered) < 2:
        instance_id, token = await node_b.register()
        registered.setdefault(cluster.master_for_key(keys.instance(instance_id)) is shard, (instance_id, token))
    async with contextlib.AsyncExitStack() as stack:
        for _, token in registered.values():
            await stack.enter_async_context(running_agent(node_b.url, token, openai_backend(upstream)))
        at_a = await stack.enter_async_context(node_a.client())
        at_b = await stack.enter_async_context(node_b.client())
        cut_off, elsewhere = (f"/api/chat/{registered[side][0]}" for side in (True, False))
        for instance_id, _ in registered.values():
            await wait_until(lambda iid=instance_id: online(node_a, iid), 30, what="the agents online, seen from A")
        assert [await answered(at_a, url) for url in (cut_off, elsewhere)] == [200, 200]

        link.cut()
        clock = Stopwatch("node A cut off from one shard")
        assert await answered(at_a, cut_off) == 503
        clock.lap("a chat at A with the instance on that shard: 503")
        for _ in range(3):
            assert await answered(at_a, elsewhere) == 200
            assert await answered(at_a, cut_off) == 503
        clock.lap("chats at A with the other instance served throughout")
        for _ in range(3):
            assert [await answered(at_b, url) for url in (cut_off, elsewhere)] == [200, 200]

        link.heal()
        clock = Stopwatch("link back")
        await wait_until(lambda: chat_ok(at_a, cut_off), 30, what="chats at A with the first instance again")
        clock.lap("chats at A again")
        assert await answered(at_a, elsewhere) == 200
        for instance_id, _ in registered.values():
            assert await online(node_a, instance_id) and await online(node_b, instance_id)
