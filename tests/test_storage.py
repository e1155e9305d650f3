"""The relay's Redis connections (relay/store/connection.py): sends bounded without a task per send."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from redis.asyncio.connection import UnixDomainSocketConnection
from redis.exceptions import TimeoutError as RedisTimeout

from relay.settings import RelaySettings
from relay.store import connection
from relay.store.embedded import EmbeddedRedis

pytestmark = pytest.mark.anyio


async def test_commands_run_and_the_timeout_is_kept(redis_url, monkeypatch):
    def no_task_per_send(*args, **kwargs):
        raise AssertionError("a send went through asyncio.wait_for")

    client = connection.connect(redis_url, RelaySettings(redis_timeout=2.0))
    monkeypatch.setattr(asyncio, "wait_for", no_task_per_send)
    try:
        connection_class = client.connection_pool.connection_class
        assert issubclass(connection_class, connection.TimedSends)
        assert issubclass(connection_class, UnixDomainSocketConnection)  # the URL's kind, kept
        async with client.pipeline(transaction=False) as pipe:
            pipe.set("k", "v").get("k")
            assert await pipe.execute() == [True, b"v"]
        conn = await client.connection_pool.get_connection()
        try:
            await conn.send_command("PING")
            assert await conn.read_response() == b"PONG"
            assert conn.socket_timeout == 2.0  # unset only for the length of a send
        finally:
            await client.connection_pool.release(conn)
    finally:
        await client.aclose()


async def test_a_write_to_a_stalled_redis_times_out_as_a_redis_error(tmp_path):
    # A Redis that stops reading (SIGSTOP): a write bigger than the socket's
    # buffers blocks, and must end at the timeout with redis-py's own error,
    # which the relay answers with 503.
    server = EmbeddedRedis(tmp_path, persist=False).start()
    client = connection.connect(server.url, RelaySettings(redis_timeout=0.5))
    try:
        assert await client.ping()
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(RedisTimeout):
                await client.set("big", b"x" * (32 * 1024 * 1024))
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert await client.ping()  # the stalled connection was dropped; a new one works
    finally:
        await client.aclose()
        server.stop()


async def test_close_closes_the_pool(redis_url):
    client = connection.connect(redis_url, RelaySettings())
    await client.ping()
    pool = client.connection_pool
    conn = await pool.get_connection()
    await pool.release(conn)
    assert conn.is_connected
    await connection.close(client)
    assert not conn.is_connected


def test_versions_are_compared_as_numbers():
    assert connection.parse_version("7.0.15") == (7, 0, 15)
    assert connection.parse_version("6.2.14") >= connection.MINIMUM_VERSION > connection.parse_version("6.0.20")
    assert connection.parse_version("7.2.4-rc1") == (7, 2, 4)
    assert connection.parse_version("10.0.0") > connection.parse_version("9.9.9")
    assert connection.parse_version("") == ()


async def test_the_server_version_is_checked(redis_url):
    client = connection.connect(redis_url, RelaySettings())
    try:
        assert connection.parse_version(await connection.check_version(client)) >= connection.MINIMUM_VERSION
        with pytest.raises(connection.RedisTooOld, match=r"is too old: the relay needs 99\.0 or newer"):
            await connection.check_version(client, (99, 0))
    finally:
        await connection.close(client)


def test_relay_serve_refuses_a_redis_too_old(redis_server, tmp_path, monkeypatch, capsys):
    # The real server and the real command; only the bar is raised above it.
    from relay.server.cli import main

    monkeypatch.setattr(connection, "MINIMUM_VERSION", (99, 0))
    handler = signal.getsignal(signal.SIGTERM)  # main() installs its own
    try:
        assert main(["serve", "--redis-url", redis_server.url, "--data-dir", str(tmp_path)]) == 1
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert "is too old: the relay needs 99.0 or newer" in capsys.readouterr().err
