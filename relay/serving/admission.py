"""Admission: what every door checks before an operation reaches an agent.

:meth:`Admission.admit` refuses new work on an overloaded node (503, ``overload.py``),
then checks who may call (404/401/403) and how often (429); the door then
reads and validates its body (413/400/422); :meth:`~Admission.leased` takes a slot in
the concurrent-stream limits (429) for as long as the answer is being sent.
Every operation on an agent (chat, images, transcription, a
Dify turn), whatever its door, passes both, so limits and access rules
cannot differ between doors.  Where the instance is named in the body
(``/v1``, SwiftChat: :meth:`~Admission.admit_named`) the body is read first, bounded
by ``RELAY_MAX_BODY_BYTES``; audio forms are read holding a per-address
upload slot (``doors/transcription.py``, ``read_audio``).  Reads that run nothing on an agent
(model lists, Dify's lists and parameters) check access only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from relay.errors import NotFound, RateLimited, ServiceNotReady
from relay.inputs import bearer_token, client_ip, read_json
from relay.node import NodeState
from relay.serving.claims import Claim
from relay.serving.inflight import cleanup_scope
from relay.serving.overload import LoadMonitor
from relay.serving.targets import Target, resolve, unknown_model
from relay.settings import RelaySettings
from relay.store import keys
from relay.store.access import AccessControl, Caller
from relay.store.leases import Slot, StreamLeases
from relay.telemetry import logs


@dataclass(frozen=True, slots=True)
class Admitted:
    instance_id: str
    caller: Caller


class Admission:
    """The checks every door runs, with the node's parts they read (built by the composition root)."""

    def __init__(self, settings: RelaySettings, node: NodeState, overload: LoadMonitor, access: AccessControl,
                 stream_leases: StreamLeases):
        self.settings, self.node, self.overload = settings, node, overload
        self.access, self.stream_leases = access, stream_leases

    async def admit(self, request: Request, instance_id: str, *, named_by_model: str | None = None) -> Admitted:
        """Check access and rates for a call on ``instance_id``.

        ``named_by_model``: the instance came from a global door's ``model``, so
        an unknown one is ``404 model_not_found`` rather than "instance not found".
        """
        settings = self.settings
        # A node past what it can carry refuses new work first (503 node_overloaded), before
        # any Redis round trip: the streams it holds slow down, and are not cut (overload.py).
        self.overload.check()
        if not self.node.layout_ready:  # the data may be in the previous key layout (relay.store.migrate)
            raise ServiceNotReady("relay storage not ready, retry shortly", headers={"Retry-After": "1"})
        try:
            # Access and both rate buckets (this caller's, this instance's): one script, one round trip.
            caller = await self.access.authorize_caller(
                instance_id, bearer_token(request), client_ip(request),
                per_minute=(settings.rate_per_caller, settings.rate_per_instance))
        except NotFound:
            if named_by_model is None:
                raise
            raise unknown_model(named_by_model) from None
        except RateLimited:
            logs.instance_id.set(instance_id)  # a real instance: its 429 is logged with it
            raise
        logs.instance_id.set(instance_id)  # a global door learns it only now
        return Admitted(instance_id, caller)

    async def admit_named(self, request: Request, field: str = "model") -> tuple[Any, Target, Admitted]:
        """For a global door: read the body, find the instance its ``field`` (or the caller key) names, admit.

        Returns the parsed body (not validated yet: the door does that), the target and the admission.
        """
        data = await read_json(request, self.settings.max_body_bytes, self.settings.max_json_depth)
        named = data.get(field) if isinstance(data, dict) else None
        target, admitted = await self.admit_model(request, named, field)
        return data, target, admitted

    async def admit_model(self, request: Request, named: Any, field: str = "model") -> tuple[Target, Admitted]:
        """Find the instance a global door's ``named`` model (or the caller key) names, and admit the call."""
        target = await resolve(self.access, named, bearer_token(request), field=field)
        return target, await self.admit(request, target.instance_id, named_by_model=named or target.instance_id)

    async def leased(self, admitted: Admitted, run: Callable[[Claim], Awaitable[Response]]) -> Response:
        """Run ``run(claim)`` holding a concurrent-stream lease until its response is sent.

        The lease is taken by the router's first pick, in the same script (so a
        request costs one round trip less, and a refusal, 429, comes before
        anything the request would store: a Dify turn is stored only after the
        pick), and given back with the agent slot that pick took, in one script too:
        ``run`` passes the ``Claim`` on to ``operations.run_op``.
        """
        settings = self.settings
        pending = self.stream_leases.prepare([
            Slot(keys.instance_streams(admitted.instance_id), settings.max_streams_per_instance, "this instance"),
            Slot(keys.caller_streams(admitted.instance_id, admitted.caller.identity), settings.max_streams_per_caller,
                 "this caller"),
        ])
        lease = pending.lease
        claim = Claim(pending)

        async def release() -> None:
            claim.settled = True  # from here on, a late release goes on its own
            await self.stream_leases.release(lease, [(keys.load(iid), session) for iid, session in claim.agents])

        try:
            response = await run(claim)
        except BaseException:
            with cleanup_scope():
                await release()
            raise
        return ThenResponse(response, release)


class ThenResponse(Response):
    """A response that runs ``then()`` once it is fully sent, or abandoned by its caller.

    What must happen after the last byte, whatever ended it: a stream lease
    given back (``leased``), a Dify turn stored (``doors/dify.py``).
    """

    def __init__(self, inner: Response, then: Callable[[], Awaitable[object]]):
        self.inner, self.then = inner, then
        self.status_code = inner.status_code
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.inner(scope, receive, send)
        finally:
            with cleanup_scope():
                await self.then()


