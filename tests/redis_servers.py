"""Real Redis topologies for the high-availability tests, from Debian's packages.

``SentinelSet`` starts a master, one replica and three sentinels
(``redis-server`` and ``redis-sentinel``, as ``.ci/run`` installs them) on
loopback ports in a temporary directory, and kills them all at the end.  The
sentinels declare the master down after ``down_after_ms`` of silence, so a
failover takes about that plus an election.  Where the binaries are missing
the tests skip, unless ``RELAY_TEST_SENTINEL=required`` (set by ``.ci/run``)
says they must run.

``ClusterSet`` starts a Redis Cluster of three masters and three replicas
(``redis-server`` with ``cluster-enabled``, joined by ``redis-cli --cluster
create``), and can kill a master and wait for its replica to take over, or
move a slot to another master live, key batch by key batch, the way
``redis-cli --cluster reshard`` does, so a test can send traffic meanwhile.
It skips likewise, unless ``RELAY_TEST_CLUSTER=required``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from tests.helpers import free_port

MASTER_NAME = "relaymaster"


# Debian's package for each binary: redis-cli is not in redis-server's own.
PACKAGES = {"redis-server": "redis-server", "redis-sentinel": "redis-sentinel", "redis-cli": "redis-tools"}


def require_binaries(*names: str, env: str = "RELAY_TEST_SENTINEL") -> None:
    """Skip without the binaries, or fail where ``env=required`` says the tests must run."""
    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return
    packages = " ".join(dict.fromkeys(PACKAGES.get(name, name) for name in names))
    reason = f"{', '.join(missing)} not installed (apt-get install {packages})"
    if os.environ.get(env) == "required":
        pytest.fail(reason)
    pytest.skip(reason)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.05)


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

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        wait_for(predicate, what, timeout)

    def stop(self) -> None:
        for server in (*self.sentinels, self.replica, self.master):
            server.kill()


class ClusterSet:
    """Three masters with a replica each, all 16384 slots covered: a real Redis Cluster.

    A silent master is failing once most masters have not heard from it for
    ``node_timeout_ms``; its replica then waits half a second to a second
    before it asks to be elected, so a failover takes about twice the timeout
    (2.1 to 2.8 s at 1000 ms).  Replicas may take over however long they have
    been cut off from their master (``cluster-replica-validity-factor 0``): a
    test kills masters on purpose.  ``start()`` takes about 2 s, as a master
    does not report ``cluster_state:ok`` in its first 2 s after boot.
    """

    def __init__(self, directory: Path, *, node_timeout_ms: int = 1000):
        require_binaries("redis-server", "redis-cli", env="RELAY_TEST_CLUSTER")
        self.directory = directory
        self.node_timeout_ms = node_timeout_ms
        ports: list[int] = []
        while len(ports) < 12:
            if (port := free_port()) not in ports:
                ports.append(port)
        self.nodes: list[Server] = []
        for i in range(6):
            home = directory / f"node{i}"
            self.nodes.append(Server("redis-server", home, ports[2 * i], [
                "cluster-enabled yes",
                f"cluster-config-file {home / 'nodes.conf'}",
                f"cluster-node-timeout {node_timeout_ms}",
                # The bus is at port + 10000 unless told, past 65535 for a high free port.
                f"cluster-port {ports[2 * i + 1]}",
                "cluster-replica-validity-factor 0",
                "repl-diskless-sync-delay 0",
            ]))
        self.seeds: list[Server] = []  # the masters as created, named by ``url``
        self._by_port = {node.port: node for node in self.nodes}
        self._ids: dict[int, bytes] = {}
        self._replica_at_kill: dict[int, Server] = {}
        self._clients: dict[int, redis.Redis] = {}

    def start(self) -> ClusterSet:
        for node in self.nodes:
            node.wait_ready()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        try:
            subprocess.run(["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "1",
                            "--cluster-yes"], check=True, capture_output=True, text=True, timeout=60)
        except subprocess.CalledProcessError as error:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{error.stdout}{error.stderr}") from None
        for node in self.nodes:
            self._ids[node.port] = self.client(node).execute_command("CLUSTER", "MYID")
        # redis-cli returns once the nodes have met, not once each has heard of
        # all the others, nor before any replica has its master's data: a
        # master killed before its replica's first sync takes its keys with it.
        self._wait(lambda: all(self._formed(node) for node in self.nodes), "the cluster to form")
        self.seeds = self.masters()
        if len(self.seeds) != 3:
            raise RuntimeError(f"expected 3 masters, got {len(self.seeds)}\n{self.describe()}")
        return self

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.seeds)

    def client(self, server: Server) -> redis.Redis:
        """An admin connection to one node (no cluster redirections), kept for the set's life."""
        if server.port not in self._clients:
            self._clients[server.port] = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2,
                                                     socket_connect_timeout=1)
        return self._clients[server.port]

    def node_id(self, server: Server) -> bytes:
        return self._ids[server.port]

    def live(self) -> list[Server]:
        return [node for node in self.nodes if node.alive()]

    def _role(self, server: Server) -> list | None:
        try:
            return self.client(server).execute_command("ROLE")
        except redis.RedisError:
            return None

    def is_master(self, server: Server) -> bool:
        role = self._role(server) if server.alive() else None
        return role is not None and role[0] == b"master"

    def masters(self) -> list[Server]:
        return [node for node in self.live() if self.is_master(node)]

    def replica_of(self, master: Server) -> Server:
        for node in self.live():
            role = self._role(node)
            if role is not None and role[0] == b"slave" and int(role[2]) == master.port:
                return node
        raise LookupError(f"no replica of the node on port {master.port}")

    def cluster_info(self, server: Server) -> dict[str, str]:
        """CLUSTER INFO as a dict; empty when the node does not answer."""
        try:
            text = self.client(server).execute_command("CLUSTER", "INFO").decode()
        except redis.RedisError:
            return {}
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def slot_ranges(self, server: Server) -> list[tuple[int, int, int]] | None:
        """(first slot, last slot, master's port) as one node sees them, or None if it does not answer."""
        try:
            reply = self.client(server).execute_command("CLUSTER", "SLOTS")
        except redis.RedisError:
            return None
        return sorted((int(first), int(last), int(master[1])) for first, last, master, *_ in reply)

    def master_for_slot(self, slot: int, *, seen_by: Server | None = None) -> Server:
        """The slot's master as ``seen_by`` (or the first live node) sees it; after ``wait_converged`` all agree."""
        for node in [seen_by] if seen_by is not None else self.live():
            for first, last, port in self.slot_ranges(node) or []:
                if first <= slot <= last:
                    return self._by_port[port]
        raise LookupError(f"no master known for slot {slot}")

    def master_for_key(self, key: str | bytes) -> Server:
        return self.master_for_slot(key_slot(key.encode() if isinstance(key, str) else key))

    def _formed(self, node: Server) -> bool:
        info = self.cluster_info(node)
        if (info.get("cluster_state") != "ok" or info.get("cluster_known_nodes") != "6"
                or info.get("cluster_slots_ok") != str(REDIS_CLUSTER_HASH_SLOTS)):
            return False
        role = self._role(node)
        if role is None:
            return False
        if role[0] == b"master":
            return True
        try:
            return self.client(node).info("replication").get("master_link_status") == "up"
        except redis.RedisError:
            return False

    def kill(self, server: Server) -> None:
        if self.is_master(server):
            # Remembered now: once the master is gone, nothing names its replica.
            try:
                self._replica_at_kill[server.port] = self.replica_of(server)
            except LookupError:
                pass
        server.kill()

    def wait_failover(self, dead_master: Server, timeout: float = 30.0) -> Server:
        """Wait for the dead master's replica to take over and every live node to be ok; return it."""
        replica = self._replica_at_kill.get(dead_master.port) or self.replica_of(dead_master)
        self._wait(lambda: self.is_master(replica)
                   and all(self.cluster_info(node).get("cluster_state") == "ok" for node in self.live()),
                   f"the replica on port {replica.port} to replace the master on port {dead_master.port}", timeout)
        return replica

    def migrate_slot(self, slot: int, target: Server, *, batch: int = 10, pause: float = 0.0) -> int:
        """Move one slot's keys to ``target`` while the cluster serves it; return how many were moved.

        Meanwhile the source answers ASK for keys it no longer has, so new
        keys land on the target and existing ones move with the batches.
        """
        return self.migrate_slot_rest(slot, self.begin_migration(slot, target), target, batch=batch, pause=pause)

    def migrate_slot_rest(self, slot: int, source: Server, target: Server, *, batch: int = 10,
                          pause: float = 0.0) -> int:
        """The rest of a migration ``begin_migration`` started: every key moved, then the slot given."""
        moved = 0
        while batch_moved := self.move_keys(slot, source, target, batch):
            moved += max(batch_moved, 0)
            if pause:
                time.sleep(pause)
        self.finish_migration(slot, target)
        return moved

    def begin_migration(self, slot: int, target: Server) -> Server:
        """Mark ``slot`` importing on ``target``, migrating on its master; return that master."""
        source = self.master_for_slot(slot)
        if source is target:
            raise ValueError(f"slot {slot} is already on the node on port {target.port}")
        self.client(target).execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        self.client(source).execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target))
        return source

    def move_keys(self, slot: int, source: Server, target: Server, batch: int = 10) -> int:
        """MIGRATE up to ``batch`` of the slot's keys; 0 when none is left (-1: all gone meanwhile)."""
        keys = self.client(source).execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
        if not keys:
            return 0
        # No REPLACE: a key already on the target would mean a client wrote it
        # there while the source still had it, which ASK should prevent.
        reply = self.client(source).execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 1000, "KEYS", *keys)
        return -1 if reply == b"NOKEY" else len(keys)  # NOKEY: all deleted since GETKEYSINSLOT

    def finish_migration(self, slot: int, target: Server) -> None:
        """Give ``slot`` to ``target`` on every master."""
        source = self.master_for_slot(slot)
        # The target first: it takes the slot with a new epoch, which then wins
        # over any older claim the others gossip about.
        for node in [target, source, *(m for m in self.masters() if m is not target and m is not source)]:
            self.client(node).execute_command("CLUSTER", "SETSLOT", slot, "NODE", self.node_id(target))

    def converged(self) -> bool:
        views = []
        for node in self.live():
            if self.cluster_info(node).get("cluster_state") != "ok":
                return False
            views.append(self.slot_ranges(node))
        return all(view is not None and view == views[0] for view in views)

    def wait_converged(self, timeout: float = 30.0) -> None:
        """Wait until every live node is ok and all name the same master for every slot."""
        self._wait(self.converged, "every node to agree on the slots", timeout)

    def describe(self) -> str:
        """CLUSTER NODES from the first node that answers, for error messages."""
        for node in self.live():
            try:
                return self.client(node).execute_command("CLUSTER", "NODES").decode()
            except redis.RedisError:
                continue
        return "(no node answers)"

    def _wait(self, predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        try:
            wait_for(predicate, what, timeout)
        except TimeoutError as error:
            raise TimeoutError(f"{error}\n{self.describe()}") from None

    def flushall(self) -> None:
        for master in self.masters():
            self.client(master).flushall()

    def stop(self) -> None:
        for client in self._clients.values():
            client.close()
        for node in self.nodes:
            node.kill()


class PartitionableLink:
    """A TCP front for a Redis (on a unix socket, or at a TCP address), that a test can cut like a network.

    One relay node reaches Redis through it (``url``), the others directly, so
    cutting it isolates that node alone.  ``cut()`` drops every connection and
    leaves new ones hanging (connected, never answered: packets going nowhere);
    ``heal()`` forwards again.  ``silence()`` is the nastier fault: the
    connections open now stay open but carry nothing more, ever (a host gone
    without a reset, a frozen server), while new ones work.
    """

    def __init__(self, target: str | tuple[str, int]):
        self.target = target
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
            up_reader, up_writer = await (asyncio.open_unix_connection(self.target) if isinstance(self.target, str)
                                          else asyncio.open_connection(*self.target))
            self._open.add(up_writer)
            generation = self._generation

            async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
                try:
                    while data := await source.read(65536):
                        if self.severed:
                            return
                        if generation < self._silent_below:
                            continue  # swallowed: the connection looks alive and says nothing
                        sink.write(data)
                        await sink.drain()
                except OSError:
                    pass  # an end reset (a cut aborts both): this direction is over

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
