"""Real Redis topologies for the high-availability tests, from Debian's packages.

``SentinelSet`` starts a master, one replica and three sentinels
(``redis-server`` and ``redis-sentinel``, as ``.ci/run`` installs them) on
loopback ports in a temporary directory, and kills them all at the end.  The
sentinels declare the master down after ``down_after_ms`` of silence, so a
failover takes about that plus an election.  Where the binaries are missing
the tests skip, unless ``RELAY_TEST_SENTINEL=required`` (set by ``.ci/run``)
says they must run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.helpers import free_port

MASTER_NAME = "relaymaster"


def require_binaries(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return
    reason = f"{', '.join(missing)} not installed (apt-get install redis-server redis-sentinel)"
    if os.environ.get("RELAY_TEST_SENTINEL") == "required":
        pytest.fail(reason)
    pytest.skip(reason)


class Server:
    """One redis-server or redis-sentinel process on a loopback port."""

    def __init__(self, binary: str, directory: Path, port: int, extra: list[str]):
        self.port = port
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "redis.conf"
        lines = [f"port {port}", "bind 127.0.0.1", f"dir {directory}", "save \"\"", "appendonly no",
                 "protected-mode no", f"logfile {directory / 'log.txt'}", *extra]
        self.config.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen([binary, str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / "log.txt")
                raise RuntimeError(f"redis on port {self.port} did not start:\n"
                                   f"{log.read_text()[-2000:] if log.exists() else ''}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def alive(self) -> bool:
        return self.process.poll() is None


class SentinelSet:
    def __init__(self, directory: Path, *, down_after_ms: int = 1000):
        require_binaries("redis-server", "redis-sentinel")
        self.directory = directory
        self.down_after_ms = down_after_ms
        # No delay before the first sync (Redis waits 5 s by default for more
        # replicas): until it is done, everything written is on the master alone.
        sync = ["repl-diskless-sync-delay 0"]
        self.master = Server("redis-server", directory / "master", free_port(), sync)
        self.replica = Server("redis-server", directory / "replica", free_port(),
                              [*sync, f"replicaof 127.0.0.1 {self.master.port}"])
        self.sentinels: list[Server] = []

    def start(self) -> SentinelSet:
        self.master.wait_ready()
        self.replica.wait_ready()
        self.wait_for(self.replica_in_sync, "the replica's first sync")
        for i in range(3):
            self.sentinels.append(Server("redis-sentinel", self.directory / f"sentinel{i}", free_port(), [
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2",
                f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
                f"sentinel failover-timeout {MASTER_NAME} 10000",
                f"sentinel parallel-syncs {MASTER_NAME} 1",
            ]))
        for sentinel in self.sentinels:
            sentinel.wait_ready()
        self.wait_for(lambda: self.master_port() == self.master.port and self.replicas_known() >= 1,
                      "the sentinels to see the master and its replica")
        # A sentinel that has not heard of the others yet cannot reach the
        # quorum, and no failover would happen: wait until each knows both.
        self.wait_for(lambda: all(self.peers_known(sentinel) == 2 for sentinel in self.sentinels),
                      "the sentinels to find each other")
        return self

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}"

    def master_port(self) -> int | None:
        for sentinel in self.sentinels:
            try:
                address = sentinel.client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
            except redis.RedisError:
                continue
            if address:
                return int(address[1])
        return None

    def replica_in_sync(self) -> bool:
        try:
            return self.replica.client().info("replication").get("master_link_status") == "up"
        except redis.RedisError:
            return False

    def peers_known(self, sentinel: Server) -> int:
        try:
            return len(sentinel.client().execute_command("SENTINEL", "SENTINELS", MASTER_NAME))
        except redis.RedisError:
            return 0

    def replicas_known(self) -> int:
        try:
            return len(self.sentinels[0].client().execute_command("SENTINEL", "REPLICAS", MASTER_NAME))
        except redis.RedisError:
            return 0

    def current_master(self) -> Server:
        port = self.master_port()
        return self.master if port == self.master.port else self.replica

    def wait_for(self, predicate, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"gave up waiting for {what}")
            time.sleep(0.05)

    def stop(self) -> None:
        for server in (*self.sentinels, self.replica, self.master):
            server.kill()


class PartitionableLink:
    """A TCP front for a Redis on a unix socket, that a test can cut like a network.

    One relay node reaches Redis through it (``url``), the others directly, so
    cutting it isolates that node alone.  ``cut()`` drops every connection and
    leaves new ones hanging (connected, never answered: packets going nowhere);
    ``heal()`` forwards again.  ``silence()`` is the nastier fault: the
    connections open now stay open but carry nothing more, ever (a host gone
    without a reset, a frozen server), while new ones work.
    """

    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self.port = 0
        self.severed = False
        self._generation = 0  # connections accepted before generation ``_silent_below`` carry nothing
        self._silent_below = 0
        self._server: asyncio.base_events.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> PartitionableLink:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            if self.severed:
                await reader.read()  # hold it open, answer nothing, until the client gives up
                return
            up_reader, up_writer = await asyncio.open_unix_connection(self.socket_path)
            self._open.add(up_writer)
            generation = self._generation

            async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
                while data := await source.read(65536):
                    if self.severed:
                        return
                    if generation < self._silent_below:
                        continue  # swallowed: the connection looks alive and says nothing
                    sink.write(data)
                    await sink.drain()

            await asyncio.wait([asyncio.ensure_future(pump(reader, up_writer)),
                                asyncio.ensure_future(pump(up_reader, writer))],
                               return_when=asyncio.FIRST_COMPLETED)
            up_writer.close()
        except OSError:
            pass
        finally:
            self._open.discard(writer)
            writer.close()

    def cut(self) -> None:
        self.severed = True
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    def silence(self) -> None:
        self._generation += 1
        self._silent_below = self._generation

    def heal(self) -> None:
        self.severed = False

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
