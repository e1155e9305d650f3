"""``/openapi.json``: complete, well-formed, and true — schemathesis checks the relay against it.

A relay (with a connected demo agent, so chat calls really stream) runs in a
background thread on 127.0.0.1; schemathesis generates requests for every
operation from the relay's own document, with bounded examples, and checks
that no response is a 5xx and that every status, content type, header and
body matches what the document says.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Iterator

import httpx
import pytest
import redis as sync_redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route, WebSocketRoute

from relay.app import create_app
from relay.openapi import build_openapi, operations
from relay.settings import RelaySettings
from tests.helpers import running_agent, running_relay

NO_LIMITS = dict(rate_per_caller=0, rate_per_instance=0, rate_register_per_ip=0,
                 max_streams_per_caller=0, max_streams_per_instance=0)


def test_every_route_is_documented():
    app = create_app(RelaySettings(), redis_url="redis://127.0.0.1:1")  # never connected: routes only
    documented = operations()
    websockets = build_openapi("http://x")["x-websockets"]
    for route in app.routes:
        if isinstance(route, WebSocketRoute):
            assert route.path in websockets
            continue
        assert isinstance(route, Route)
        for method in route.methods - {"HEAD"}:
            assert method.lower() in documented.get(route.path, {}), f"{method} {route.path} is not in /openapi.json"
    # ... and nothing is documented that does not exist.
    real = {(r.path, m.lower()) for r in app.routes if isinstance(r, Route) for m in r.methods}
    for path, methods in documented.items():
        for method in methods:
            assert (path, method) in real, f"/openapi.json documents {method.upper()} {path}, which does not exist"


def test_document_is_self_consistent():
    doc = build_openapi("http://x")
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for item in node:
                yield from refs(item)

    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    ids = [op["operationId"] for methods in doc["paths"].values() for op in methods.values()]
    assert len(ids) == len(set(ids))
    # Request bodies are the very models the handlers validate with.
    assert "ChatRequest" in schemas and "messages" in schemas["ChatRequest"]["properties"]


# -- schemathesis against a live relay --------------------------------------------------------


@pytest.fixture(scope="module")
def live_relay(redis_server) -> Iterator[dict[str, str]]:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    info: dict[str, Any] = {}
    ready = threading.Event()

    async def main() -> None:
        stop = asyncio.Event()
        info["stop"] = (asyncio.get_running_loop(), stop)
        try:
            async with running_relay(redis_server.url, **NO_LIMITS) as relay:
                instance_id, token = await relay.register("fuzzed")
                async with running_agent(relay.url, token):
                    info.update(url=relay.url, instance_id=instance_id)
                    ready.set()
                    await stop.wait()
        finally:
            ready.set()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(30) and "url" in info, "relay did not start"
    yield info
    loop, stop = info["stop"]
    loop.call_soon_threadsafe(stop.set)
    thread.join(15)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
EXAMPLES_PER_OPERATION = 25


def test_relay_conforms_to_its_openapi_document(live_relay):
    # Driven through hypothesis directly (one property per operation) rather
    # than schemathesis' pytest plugin, which lags behind pytest releases.
    schema = schemathesis.openapi.from_url(f"{live_relay['url']}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    documented = {f"{m.upper()} {path}" for path, methods in build_openapi("x")["paths"].items() for m in methods}
    # schemathesis leaves out the document's own URL.
    assert {o.label for o in operations} == documented - {"GET /openapi.json"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def conforms(case):
            params = case.path_parameters or {}
            # Random ids only ever find 404s: use the live instance's id half of the time.
            if "instance_id" in params and params["instance_id"][:1] < "V":
                params["instance_id"] = live_relay["instance_id"]
            case.call_and_validate(base_url=live_relay["url"], checks=CHECKS, timeout=30)

        conforms()


def test_the_fuzzed_instance_survived(live_relay):
    """After the fuzzing, the instance still answers (no fuzzed request broke it)."""
    response = httpx.post(f"{live_relay['url']}/api/chat/{live_relay['instance_id']}",
                          json={"messages": [{"role": "user", "content": "still there?"}], "stream": False},
                          timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"
