"""Shared fixtures: a real Redis server for the whole session, cleaned per test."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from relay.store.embedded import EmbeddedRedis


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """The same redis-server binary the relay embeds, on a private unix socket."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False).start()
    yield server
    server.stop()


@pytest.fixture
async def redis_url(redis_server) -> str:
    client = Redis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    return redis_server.url


@pytest.fixture
async def redis(redis_url):
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()
