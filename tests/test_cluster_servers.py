"""The Redis Cluster fixture itself (``tests/redis_servers.ClusterSet``), through redis-py's cluster client.

Before the relay is tested on a cluster, the cluster must be what those
tests assume: keys spread over three masters, a slot that moves while it is
written to loses nothing, and a killed master's replica takes over with its
keys.  The failover comes last, since it leaves a master dead for the
module's other tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from tests.redis_servers import ClusterSet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[ClusterSet]:
    started = time.monotonic()
    servers = ClusterSet(tmp_path_factory.mktemp("cluster")).start()
    print(f"cluster started in {time.monotonic() - started:.2f} s")
    yield servers
    servers.stop()


def cluster_client(cluster: ClusterSet) -> RedisCluster:
    return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", node.port) for node in cluster.masters()],
                        socket_timeout=2, decode_responses=True)


@pytest.fixture
def client(cluster: ClusterSet) -> Iterator[RedisCluster]:
    cluster.flushall()
    client = cluster_client(cluster)
    yield client
    client.close()


def test_keys_spread_over_the_three_masters(cluster: ClusterSet, client: RedisCluster):
    assert cluster.url == "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in cluster.seeds)
    assert len({cluster.replica_of(master).port for master in cluster.masters()}) == 3
    keys = {f"spread:{i}": str(i) for i in range(300)}
    for key, value in keys.items():
        client.set(key, value)
    holders = {key: cluster.master_for_key(key) for key in keys}
    assert {holder.port for holder in holders.values()} == {master.port for master in cluster.masters()}
    for key, value in keys.items():
        assert client.get(key) == value
        # master_for_key names the node that really has it
        assert cluster.client(holders[key]).get(key) == value.encode()


def test_a_slot_moved_while_written_to_loses_nothing(cluster: ClusterSet, client: RedisCluster):
    slot = key_slot(b"{moving}")
    source = cluster.master_for_slot(slot)
    target = next(master for master in cluster.masters() if master is not source)
    expected = {f"{{moving}}:{i}": "before" for i in range(40)}
    for key, value in expected.items():
        client.set(key, value)

    # Another client overwrites old keys and adds new ones as the batches go:
    # old keys still on the source are served there, the rest are asked of the target.
    done = threading.Event()
    writes = 0
    errors: list[Exception] = []

    def write() -> None:
        nonlocal writes
        writer = cluster_client(cluster)
        try:
            while not done.is_set():
                for key in (f"{{moving}}:{writes % 40}", f"{{moving}}:new{writes}"):
                    expected[key] = f"write {writes}"
                    writer.set(key, f"write {writes}")
                writes += 1
                time.sleep(0.005)
        except Exception as error:
            errors.append(error)
        finally:
            writer.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(0.05)
        before = writes
        moved = cluster.migrate_slot(slot, target, batch=5, pause=0.05)
        during = writes - before
    finally:
        done.set()
        writer.join(10)
    cluster.wait_converged()
    print(f"slot migration: {moved} keys moved in batches, {during} writes meanwhile")

    assert not errors
    assert during > 10
    assert 40 <= moved < len(expected)  # the keys created during the move went straight to the target
    assert all(cluster.master_for_slot(slot, seen_by=node) is target for node in cluster.live())
    assert cluster.client(target).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == len(expected)
    assert cluster.client(source).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    assert {key: client.get(key) for key in expected} == expected


def test_a_killed_master_is_replaced_by_its_replica_with_its_keys(cluster: ClusterSet, client: RedisCluster):
    victim = cluster.masters()[0]
    replica = cluster.replica_of(victim)
    keys = {f"failover:{i}": str(i) for i in range(200)}
    keys = {key: value for key, value in keys.items() if cluster.master_for_key(key) is victim}
    assert len(keys) > 20
    for key, value in keys.items():
        client.set(key, value)
    assert cluster.client(victim).execute_command("WAIT", 1, 1000) == 1  # the replica has them all

    killed = time.monotonic()
    cluster.kill(victim)
    assert cluster.wait_failover(victim) is replica
    print(f"failover: {time.monotonic() - killed:.2f} s from SIGKILL to the replica promoted and every node ok")
    cluster.wait_converged()

    assert replica in cluster.masters() and victim not in cluster.masters()
    assert all(cluster.master_for_key(key) is replica for key in keys)
    assert {key: client.get(key) for key in keys} == keys
    key = next(iter(keys))
    client.set(key, "after")
    assert cluster.client(replica).get(key) == b"after"
