"""Slot counters in Redis follow the streams: reserved on pick, cleared when agents go idle."""

from __future__ import annotations

import pytest

from relay.store import keys
from tests.helpers import running_agent, running_relay, sse_lines

pytestmark = pytest.mark.anyio


async def test_a_finished_stream_marks_its_agent_for_reconciliation(redis_url, redis):
    # The node's own ticks far apart: the tick below is the one that reconciles (one of
    # its own, between the finished stream and the counter set by hand, cleared the mark
    # first and left the counter: a flake).
    async with running_relay(redis_url, heartbeat_interval=60.0, heartbeat_timeout=180.0) as relay:
        instance_id, token = await relay.register()
        async with running_agent(relay.url, token), relay.client() as client:
            async with client.stream("POST", f"/api/chat/{instance_id}",
                                     json={"messages": [{"role": "user", "content": "hi"}]}) as response:
                assert (await sse_lines(response))[-1] == "[DONE]"
            (session,) = relay.services.sessions.of(instance_id)
            assert session.load_dirty and not session.streams
            # Simulate a node that died before giving its slot back.
            await redis.hincrby(keys.load(instance_id), session.session_id, 3)
            await relay.services.presence.tick()
            assert await redis.hget(keys.load(instance_id), session.session_id) is None
            assert not session.load_dirty
