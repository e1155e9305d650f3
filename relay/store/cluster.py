"""redis-py's Redis Cluster client, made to behave as the relay's other clients do.

``connection.connect`` builds a :class:`RelayCluster` for a ``redis+cluster://``
URL.  It is redis-py's asyncio ``RedisCluster`` with these differences, each
found by a test on a real cluster (tests/test_cluster.py):

* **No retries.**  redis-py sends a command again after a timeout or a
  dropped connection, when it may already have run (a token rotation run
  twice locks its owner out) and far past ``RELAY_REDIS_TIMEOUT``.  The error
  goes to the caller instead (503), and the next command reads the slot map
  again (redis-py marks it stale on any connection error).
* **A topology change closes nothing in use.**  redis-py answers a CLUSTERDOWN,
  an uncovered slot, every fifth MOVED and a failed refresh of the slot map
  by closing every connection to every node, commands in flight included:
  during a slot migration a chat failed with "Connection lost".  Here a MOVED
  patches the slot map (``reinitialize_steps=0``), the others only mark the
  map stale (an ``aclose()`` during a command), and a refresh that fails
  leaves it stale; the refresh that succeeds recycles each connection once
  its command is done.  A close outside a command still closes them all.
* **ASKING on the same connection as its command.**  redis-py's asyncio client
  sends ASKING and the redirected command as two commands from the node's pool,
  usually on two connections: the importing node, never told, answers MOVED,
  and the command bounces between the two nodes until "TTL exhausted" for as
  long as the slot moves.  :class:`AskingNode` sends both in one write, also
  to a master the slot map does not list yet (a new one, given its first slot).
* **Split keys waited out.**  While a slot moves key by key, a script whose
  keys are on both shards for a moment is refused (TRYAGAIN); nothing ran.  It
  is sent again, 20 ms apart, for up to ``split_keys_wait`` seconds (the Redis
  timeout), as a slow answer would be waited for.
* **A burst waits its turn.**  Past ``max_connections`` commands in flight,
  redis-py fails at once (MaxConnectionsError); here they queue, as on the
  blocking pool of one server (a pipeline re-sending its redirected commands
  keeps its one place in that queue).
* **Scripts with keys they cannot declare** (:class:`ReachingScript`): sent
  again, like a TRYAGAIN, when Redis refuses them at such a key of a
  migrating slot, which they reach before their first write.
* **One kind of error.**  A cluster nobody answers raises redis-py's
  ``RedisClusterException``, which is not a ``RedisError``: it is raised as a
  connection error, so every part of the relay that rides out a Redis outage
  rides out this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import PRIMARY, ClusterNode, ClusterPipeline
from redis.commands.core import AsyncScript
from redis.exceptions import ClusterError, RedisClusterException, RedisError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError

T = TypeVar("T")


def _split_keys(exc: RedisError) -> bool:
    """A command refused, not run, because a slot migration had split its keys (TRYAGAIN), or
    redirected back and forth ("TTL exhausted": an ASK, then the migration ended before the
    redirected command arrived)."""
    return isinstance(exc, TryAgainError) or (isinstance(exc, ClusterError) and "TTL exhausted" in str(exc))


#: Set while a command (or a pipeline) runs: an ``aclose()`` then comes from redis-py's
#: error handling, a ``get_node`` by name from its redirect loop, and a command sent
#: meanwhile from a pipeline re-sending what was redirected (it holds a permit already).
_in_command: contextvars.ContextVar[bool] = contextvars.ContextVar("in_cluster_command", default=False)


class RelayCluster(RedisCluster):
    """redis-py's cluster client under the rules in this module's docstring."""

    split_keys_wait = 5.0

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **{**kwargs, "reinitialize_steps": 0})
        self.in_flight = asyncio.Semaphore(kwargs.get("max_connections", 100))

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return await self.while_slot_moves(lambda: self._execute_once(args, kwargs), _split_keys)

    async def _execute_once(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        async with self.permit():
            with as_redis_errors():
                return await super().execute_command(*args, **kwargs)

    @contextlib.asynccontextmanager
    async def permit(self) -> AsyncIterator[None]:
        """One of ``in_flight``'s permits, with ``_in_command`` set, for a command or a pipeline.

        Held already within one: a pipeline re-sending its redirected commands
        (MOVED, ASK) one by one would wait forever for a second permit when
        every permit is held by such a pipeline.
        """
        if _in_command.get():
            yield
            return
        async with self.in_flight:
            token = _in_command.set(True)
            try:
                yield
            finally:
                _in_command.reset(token)

    async def while_slot_moves(self, attempt: Callable[[], Awaitable[T]],
                               refused: Callable[[RedisError], bool]) -> T:
        """``attempt()``; again, 20 ms apart, while it fails with an error that says ``refused``
        (nothing ran: a slot was on the move), for up to ``split_keys_wait`` seconds."""
        deadline: float | None = None
        while True:
            try:
                return await attempt()
            except RedisError as exc:
                if not refused(exc):
                    raise
                now = asyncio.get_running_loop().time()
                deadline = deadline or now + self.split_keys_wait
                if now >= deadline:
                    raise
                await asyncio.sleep(0.02)

    async def initialize(self, *args: Any, **kwargs: Any) -> RelayCluster:
        """Read the slot map when it is stale, as redis-py does, except on failure: redis-py
        then closes every connection, commands in flight included (a refresh that fails, or
        whose caller gave up, is no reason to cut them); here the map just stays stale."""
        if self._initialize:
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:
                if self._initialize:
                    await self.nodes_manager.initialize(*args, **kwargs)
                    await self.commands_parser.initialize(self.nodes_manager.default_node)
                    self._initialize = False
        return self

    def get_node(self, host: str | None = None, port: int | None = None,
                 node_name: str | None = None) -> ClusterNode | None:
        node = self.nodes_manager.get_node(host, port, node_name)
        if node is None and node_name is not None and _in_command.get():
            # An ASK to a master the map does not list yet (a new one, filled with its
            # first slot): reached all the same, and kept until a refresh finds it gone.
            where, _, number = node_name.rpartition(":")
            node = AskingNode(where, int(number), PRIMARY, **self.nodes_manager.connection_kwargs)
            self.nodes_manager.nodes_cache[node.name] = node
        elif type(node) is ClusterNode:
            # redis-py makes its nodes itself (at a refresh, on a MOVED to a new master)
            # and keeps each object across refreshes: each gets the class when first asked for.
            node.__class__ = AskingNode
        return node

    async def aclose(self) -> None:
        """Close every connection to every node; called by redis-py during a command (to
        forget the topology), only mark the slot map stale: see the module's docstring."""
        if _in_command.get():
            self._initialize = True
            return
        await super().aclose()
        # redis-py closes nothing when the map is already stale (marked by an error):
        # a stopping relay closes it all the same.
        await self.nodes_manager.aclose()
        await self.nodes_manager.aclose("startup_nodes")

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return RelayClusterPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py makes its own


class RelayClusterPipeline(ClusterPipeline):
    """A cluster pipeline under the same rules as :class:`RelayCluster`'s commands."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        client = self.cluster_client
        assert isinstance(client, RelayCluster)
        async with client.permit():
            with as_redis_errors():
                return await super().execute(raise_on_error, allow_redirections)


@contextlib.contextmanager
def as_redis_errors() -> Iterator[None]:
    """redis-py's cluster errors that are not ``RedisError`` (no node answers, a slot not
    covered), raised as a connection error."""
    try:
        yield
    except RedisClusterException as exc:
        raise RedisConnectionError(f"Redis Cluster unavailable: {exc}") from exc


#: The node a task has just sent ASKING to (see :class:`AskingNode`).
_asked: contextvars.ContextVar[ClusterNode | None] = contextvars.ContextVar("asked_cluster_node", default=None)


class AskingNode(ClusterNode):
    """A cluster node that sends an ASKING together with the command that follows it.

    redis-py's redirect loop awaits ``node.execute_command("ASKING")``, then
    ``node.execute_command(*command)``, in the same task with nothing in
    between.  Here the first only notes the node; the second sends ``ASKING``
    and the command in one write on one connection, which is what the
    importing node needs to serve it.  redis-py builds its nodes itself, so
    :meth:`RelayCluster.get_node`, where its redirect loop finds the ASK's
    target, gives them this class (the same slots, one method more).
    """

    __slots__ = ()

    async def execute_command(self, *args: Any, asking: bool = False, **kwargs: Any) -> Any:
        if args == ("ASKING",):
            _asked.set(self)
            return b"OK"
        if _asked.get() is not self:
            return await super().execute_command(*args, asking=asking, **kwargs)
        _asked.set(None)
        connection = self.acquire_connection()
        try:
            await self.disconnect_if_needed(connection)
            await connection.send_packed_command(connection.pack_commands([("ASKING",), args]))
            with contextlib.suppress(ResponseError):  # the command's own answer says what went wrong
                await connection.read_response()
            return await self.parse_response(connection, args[0], **kwargs)
        except ResponseError:
            raise  # an answer like any other (MOVED, a script's error): read in full
        except BaseException:
            # Its answers may still be on the way: the connection starts afresh.
            await connection.disconnect(nowait=True)
            raise
        finally:
            self.release(connection)


#: Redis's answer to a script that reached a key it did not declare, of a slot migrating
#: away, where that key is not (moved already, or never created).
NON_LOCAL_KEY = "Script attempted to access a non local key"


class ReachingScript:
    """A Lua script that reaches keys it does not declare (found inside it, from an index).

    Redis checks a script's declared keys before running it (a slot on the
    move: ASK or TRYAGAIN, and nothing runs); an undeclared key is checked
    when the script reaches it, and a script that fails there keeps what it
    wrote before.  So such a script must touch every undeclared key it will
    need before its first write (only writes that a rerun repeats harmlessly
    may come earlier): then that failure means nothing changed, and it is sent
    again like a TRYAGAIN until the slot has moved.
    """

    def __init__(self, redis: Any, text: str):
        self._redis = redis
        self._script: AsyncScript = redis.register_script(text)

    async def __call__(self, *, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        if not isinstance(self._redis, RelayCluster):
            return await self._script(keys=keys, args=args)
        return await self._redis.while_slot_moves(lambda: self._script(keys=keys, args=args), _not_here)


def _not_here(exc: RedisError) -> bool:
    return isinstance(exc, ResponseError) and NON_LOCAL_KEY in str(exc)
