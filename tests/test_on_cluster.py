"""The multi-node suite again, on a Redis Cluster instead of one Redis.

The same test functions as in their own modules (imported, so pytest collects
them here too), with this module's ``redis_url`` and ``redis`` fixtures: the
relays get a ``redis+cluster://`` URL naming a real cluster of three masters
and three replicas (``tests/redis_servers.py``), and direct Redis access is
the relay's own cluster client.  Cross-node streams (on shard channels),
presence, limits shared across nodes, token rotation, conversations across
nodes, every door: each with its keys spread over three shards, so a script
or transaction touching two slots would fail here.
"""

from __future__ import annotations

import pytest

from relay.settings import RelaySettings
from relay.store import connection
from tests.redis_servers import ClusterSet
from tests.test_crossnode import (  # noqa: F401
    test_callers_hanging_up_leave_nothing_running_on_the_agents_node,
    test_nodes_with_different_windows_still_stream,
    test_the_frames_on_the_bus_are_the_agent_frames,
)
from tests.test_dify import test_a_conversation_started_on_one_node_continues_on_the_other  # noqa: F401
from tests.test_doors import test_every_door_reaches_an_agent_on_another_node  # noqa: F401
from tests.test_limits import (  # noqa: F401
    test_concurrent_streams_per_caller_and_per_instance_across_nodes,
    test_rate_limits_hold_across_two_nodes,
)
from tests.test_multinode import (  # noqa: F401
    test_request_at_node_a_served_by_agent_on_node_b,
    test_two_replicas_share_load_and_survive_one_killed,
)
from tests.test_security import (  # noqa: F401
    test_rotation_missed_while_unsubscribed_is_caught_on_resubscribe,
    test_rotation_stops_the_old_token_and_closes_its_agents_on_every_node,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster_set(tmp_path_factory):
    servers = ClusterSet(tmp_path_factory.mktemp("cluster")).start()
    yield servers
    servers.stop()


@pytest.fixture
async def redis_url(cluster_set) -> str:
    cluster_set.flushall()
    return cluster_set.url


@pytest.fixture
async def redis(redis_url):
    client = connection.connect(redis_url, RelaySettings())
    yield client
    await connection.close(client)
