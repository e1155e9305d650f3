"""The agent's chat path to the model server (aiohttp): connections kept alive, proxies as httpx reads them."""

from __future__ import annotations

import pytest

from agent.backends import BackendError
from agent.upstream import OpenAIBackend, _env_proxy
from tests.helpers import FakeUpstream, running_upstream, wait_until

pytestmark = pytest.mark.anyio

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


async def test_streams_and_completions_reuse_one_connection():
    upstream = FakeUpstream(chunks=3)
    async with running_upstream(upstream):
        backend = OpenAIBackend(upstream.url)
        try:
            for _ in range(3):
                batches = [batch async for batch in backend.stream(CHAT)]
                events = [event for batch in batches for event in batch]
                assert len(events) == 3 + 1  # three words and the finish chunk; [DONE] is not an event
            assert b'"object":"chat.completion"' in await backend.complete(CHAT)
            assert len(set(upstream.peers)) == 1  # read to its end, each answer left the connection reusable
            await backend.aclose()  # closes its connections; the backend stays usable (a new one is made)
            assert [event async for batch in backend.stream(CHAT) for event in batch]
            assert await backend.models() == ["fake-model"]
        finally:
            await backend.aclose()
    assert [body["stream"] for body in upstream.requests] == [True, True, True, False, True]
    assert len(set(upstream.peers)) == 2


async def test_a_stream_left_early_closes_its_connection():
    # The consumer stops after the first batch (the relay cancelled): the model server must see it.
    upstream = FakeUpstream(chunks=50, hold_after=1)
    async with running_upstream(upstream):
        backend = OpenAIBackend(upstream.url)
        try:
            stream = backend.stream(CHAT)
            assert await anext(stream)
            await stream.aclose()
            # What tells the model server to stop: it sees its client gone, mid-answer.
            await wait_until(lambda: upstream.disconnects == 1, what="the model server seeing the request closed")
            upstream.release()
            # The next request cannot be on the abandoned connection.
            assert [event async for batch in backend.stream(CHAT) for event in batch]
        finally:
            await backend.aclose()
    assert len(set(upstream.peers)) == 2


async def test_upstream_errors_keep_their_mapping_on_the_chat_path():
    upstream = FakeUpstream(fail_status=400)
    async with running_upstream(upstream):
        backend = OpenAIBackend(upstream.url)
        try:
            with pytest.raises(BackendError) as bad:
                [batch async for batch in backend.stream(CHAT)]
            assert bad.value.status == 400 and "fake failure" in bad.value.message
            upstream.fail_status = 503
            with pytest.raises(BackendError) as down:
                await backend.complete(CHAT)
            assert down.value.status == 502
        finally:
            await backend.aclose()
    gone = OpenAIBackend(upstream.url)  # the server has stopped: nothing listens there now
    try:
        with pytest.raises(BackendError) as unreachable:
            [batch async for batch in gone.stream(CHAT)]
        assert unreachable.value.status == 502 and "unreachable" in unreachable.value.message
    finally:
        await gone.aclose()


def test_the_environment_proxy_is_read_as_httpx_reads_it(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert _env_proxy("http://127.0.0.1:11434/v1") is None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.lan:3128")
    assert _env_proxy("http://models.lan:8000/v1") == "http://proxy.lan:3128"
    assert _env_proxy("https://models.lan/v1") is None  # no HTTPS_PROXY
    monkeypatch.setenv("NO_PROXY", "models.lan,localhost")
    assert _env_proxy("http://models.lan:8000/v1") is None
    assert _env_proxy("http://other.lan/v1") == "http://proxy.lan:3128"
    monkeypatch.setenv("ALL_PROXY", "http://all.lan:8080")  # for any scheme without its own
    assert _env_proxy("https://other.lan/v1") == "http://all.lan:8080"
    # A proxy aiohttp cannot speak is refused when the backend is made, not on every chat.
    monkeypatch.setenv("HTTPS_PROXY", "socks5://proxy.lan:1080")
    with pytest.raises(BackendError, match="not an HTTP proxy"):
        OpenAIBackend("https://other.lan/v1")


async def test_a_completion_that_takes_longer_than_the_timeout_is_504():
    upstream = FakeUpstream(hang=True)
    async with running_upstream(upstream):
        backend = OpenAIBackend(upstream.url, timeout=0.3)
        try:
            with pytest.raises(BackendError) as slow:
                await backend.complete(CHAT)
            assert slow.value.status == 504 and slow.value.code == "upstream_timeout"
        finally:
            await backend.aclose()
