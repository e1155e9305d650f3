"""End to end with the real relay and agent: the paths a newcomer uses first."""

from __future__ import annotations

import orjson
import pytest

from tests.helpers import running_agent, running_relay, sse_lines

pytestmark = pytest.mark.anyio


async def test_stream_through_demo_agent(redis_url):
    async with running_relay(redis_url) as relay:
        instance_id, token = await relay.register()
        async with running_agent(relay.url, token):
            async with relay.client() as client:
                async with client.stream("POST", f"/api/chat/{instance_id}",
                                         json={"messages": [{"role": "user", "content": "hi"}]}) as response:
                    assert response.status_code == 200
                    assert response.headers["content-type"].startswith("text/event-stream")
                    assert response.headers["cache-control"] == "no-cache"
                    assert response.headers["x-accel-buffering"] == "no"
                    events = await sse_lines(response)
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert "You said: hi" in text
