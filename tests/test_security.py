"""Who may do what: registration policy, owner rights, caller keys, private instances, CORS.

All against the real relay and agent on a real Redis (``relay/store/access.py``
and ``relay/doors/cors.py``, and their wiring in the doors).
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import orjson
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from agent.backoff import FatalAgentError
from agent.cli import registration_headers
from agent.registration import RelayHTTPError, register
from agent.settings import AgentSettings
from tests.helpers import kill_subscriptions, running_agent, running_relay, sse_lines, wait_until

pytestmark = pytest.mark.anyio

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error_code(response: httpx.Response) -> str:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]["code"]


async def chat(client: httpx.AsyncClient, instance_id: str, headers: dict | None = None, **body) -> httpx.Response:
    return await client.post(f"/api/chat/{instance_id}", json={**CHAT, "stream": False, **body},
                             headers=headers or {})


# -- registration --------------------------------------------------------------------


async def test_registration_is_open_by_default(redis_url):
    async with running_relay(redis_url) as relay, relay.client() as client:
        response = await client.post("/api/instances", json={"name": "open"})
        assert response.status_code == 201
        assert response.json()["agent_token"].startswith("ira_")


async def test_registration_key_protects_registration(redis_url):
    async with running_relay(redis_url, registration_key="let-me-in") as relay, relay.client() as client:
        missing = await client.post("/api/instances", json={"name": "x"})
        assert missing.status_code == 401 and error_code(missing) == "registration_key_required"
        wrong = await client.post("/api/instances", json={"name": "x"}, headers=bearer("let-me-out"))
        assert wrong.status_code == 403 and error_code(wrong) == "invalid_registration_key"
        right = await client.post("/api/instances", json={"name": "x"}, headers=bearer("let-me-in"))
        assert right.status_code == 201
        # The agent registers the same way (--registration-key / AGENT_REGISTRATION_KEY).
        with pytest.raises(RelayHTTPError, match="401"):
            await register(relay.url, "agent")
        settings = AgentSettings(registration_key="let-me-in")
        creds = await register(relay.url, "agent", headers=registration_headers(settings))
        assert creds.agent_token.startswith("ira_")


# -- owner rights --------------------------------------------------------------------

OWNER_ACTIONS = [
    ("DELETE", "/api/instances/{id}", None),
    ("POST", "/api/instances/{id}/token", None),
    ("PATCH", "/api/instances/{id}", {"name": "renamed"}),
    ("POST", "/api/instances/{id}/keys", {"name": "k"}),
    ("GET", "/api/instances/{id}/keys", None),
    ("DELETE", "/api/instances/{id}/keys/key_0123456789abcdef", None),
]


@pytest.mark.parametrize(("method", "path", "body"), OWNER_ACTIONS, ids=lambda v: str(v))
async def test_owner_actions_need_the_owner_token(redis_url, method, path, body):
    async with running_relay(redis_url) as relay, relay.client() as client:
        instance_id, token = await relay.register("mine")
        _, other_token = await relay.register("theirs")
        url = path.format(id=instance_id)
        kwargs = {"json": body} if body is not None else {}
        missing = await client.request(method, url, **kwargs)
        assert missing.status_code == 401, missing.text
        for wrong in (other_token, token + "x", "not-a-token", token.upper()):
            response = await client.request(method, url, headers=bearer(wrong), **kwargs)
            assert response.status_code == 403, (wrong, response.text)
        # A token sent in the URL is refused, not used.
        in_url = await client.request(method, url, params={"token": token}, **kwargs)
        assert in_url.status_code == 400 and error_code(in_url) == "credentials_in_url"
        unknown = await client.request(method, path.format(id="0000000000000000"), headers=bearer(token), **kwargs)
        assert unknown.status_code == 404
        # Nothing changed.
        view = (await client.get(f"/api/instances/{instance_id}")).json()
        assert view["name"] == "mine"


async def test_update_instance(redis_url):
    async with running_relay(redis_url) as relay, relay.client() as client:
        instance_id, token = await relay.register("before")
        response = await client.patch(f"/api/instances/{instance_id}", headers=bearer(token),
                                      json={"name": "after", "description": "d", "visibility": "private"})
        assert response.status_code == 200
        view = response.json()
        assert (view["name"], view["description"], view["visibility"]) == ("after", "d", "private")
        for bad in ({}, {"visibility": "secret"}, {"name": ""}, {"name": "x" * 101}, {"owner": "me"},
                    {"name": 5}, [], "x"):
            response = await client.patch(f"/api/instances/{instance_id}", headers=bearer(token), json=bad)
            assert response.status_code == 422, bad
        # Private instances are not advertised in the public list, but their page exists.
        listed = (await client.get("/api/instances")).json()["data"]
        assert instance_id not in [v["instance_id"] for v in listed]
        assert (await client.get(f"/api/instances/{instance_id}")).json()["visibility"] == "private"


@pytest.mark.slow
async def test_rotation_stops_the_old_token_and_closes_its_agents_on_every_node(redis_url):
    async with running_relay(redis_url) as node_a, running_relay(redis_url) as node_b:
        instance_id, old = await node_a.register()
        async with running_agent(node_b.url, old) as agent, node_a.client() as client:
            response = await client.post(f"/api/instances/{instance_id}/token", headers=bearer(old))
            assert response.status_code == 200
            new = response.json()["agent_token"]
            assert new != old and new.startswith("ira_")
            # The agent connected to the *other* node with the old token is closed (4003: final).
            await wait_until(lambda: _no_sessions(node_b), what="old-token agent closed")
            await wait_until(lambda: not agent.connected.is_set(), what="agent noticed")
            # The old token is dead everywhere at once; the new one works.
            for node in (node_a, node_b):
                with pytest.raises(InvalidStatus) as refused:
                    await websockets.connect(node.url.replace("http", "ws") + "/api/agent/connect",
                                             additional_headers=bearer(old))
                assert refused.value.response.status_code == 401
            again = await client.post(f"/api/instances/{instance_id}/token", headers=bearer(old))
            assert again.status_code == 403
            async with running_agent(node_a.url, new):
                response = await chat(client, instance_id)
                assert response.status_code == 200


async def _no_sessions(relay) -> bool:
    return len(relay.services.sessions) == 0


async def test_rotated_agent_stops_retrying(redis_url):
    """The agent treats close 4003 as final instead of hammering the relay."""
    from agent.client import AgentClient
    from agent.demo_model import DemoBackend

    async with running_relay(redis_url) as relay, relay.client() as client:
        instance_id, token = await relay.register()
        agent = AgentClient(relay_url=relay.url, token=token, backend=DemoBackend(rate=0), models=["demo"],
                            max_backoff=0.1, on_status=lambda line: None)
        task = asyncio.create_task(agent.run())
        await asyncio.wait_for(agent.connected.wait(), 10)
        await client.post(f"/api/instances/{instance_id}/token", headers=bearer(token))
        with pytest.raises(FatalAgentError, match="4003"):
            await asyncio.wait_for(task, 10)


async def test_delete_closes_agents_and_forgets_keys(redis_url, redis):
    async with running_relay(redis_url) as relay, relay.client() as client:
        instance_id, token = await relay.register()
        await client.post(f"/api/instances/{instance_id}/keys", headers=bearer(token), json={"name": "k"})
        async with running_agent(relay.url, token):
            response = await client.delete(f"/api/instances/{instance_id}", headers=bearer(token))
            assert response.status_code == 204
            await wait_until(lambda: _no_sessions(relay), what="agent closed")
        assert [k async for k in redis.scan_iter("ir:ckey*")] == []
        assert (await client.get(f"/api/instances/{instance_id}")).status_code == 404


# -- caller keys and private instances ----------------------------------------------------


async def test_caller_keys_are_shown_once_and_listed_without_secrets(redis_url, redis):
    async with running_relay(redis_url) as relay, relay.client() as client:
        instance_id, token = await relay.register()
        created = await client.post(f"/api/instances/{instance_id}/keys", headers=bearer(token),
                                    json={"name": "web app"})
        assert created.status_code == 201
        key = created.json()
        assert key["key"].startswith("irk_") and key["name"] == "web app" and key["key_id"].startswith("key_")
        listed = await client.get(f"/api/instances/{instance_id}/keys", headers=bearer(token))
        assert listed.status_code == 200
        assert listed.json() == {"data": [{"key_id": key["key_id"], "name": "web app",
                                           "created_at": key["created_at"]}]}
        assert key["key"] not in listed.text
        for bad in ({}, {"name": ""}, {"name": "k", "key": "mine"}):
            response = await client.post(f"/api/instances/{instance_id}/keys", headers=bearer(token), json=bad)
            assert response.status_code == 422, bad
        revoked = await client.delete(f"/api/instances/{instance_id}/keys/{key['key_id']}", headers=bearer(token))
        assert revoked.status_code == 204
        again = await client.delete(f"/api/instances/{instance_id}/keys/{key['key_id']}", headers=bearer(token))
        assert again.status_code == 404 and error_code(again) == "key_not_found"
        assert (await client.get(f"/api/instances/{instance_id}/keys", headers=bearer(token))).json() == {"data": []}


async def test_private_instance_needs_a_valid_key(redis_url):
    async with running_relay(redis_url) as relay, relay.client() as client:
        instance_id, token = await relay.register("private")
        other_id, other_token = await relay.register("other")
        await client.patch(f"/api/instances/{instance_id}", headers=bearer(token), json={"visibility": "private"})
        key = (await client.post(f"/api/instances/{instance_id}/keys", headers=bearer(token),
                                 json={"name": "k"})).json()
        other_key = (await client.post(f"/api/instances/{other_id}/keys", headers=bearer(other_token),
                                       json={"name": "k"})).json()
        async with running_agent(relay.url, token):
            for path in (f"/api/chat/{instance_id}", f"/api/chat/{instance_id}/models"):
                method = "POST" if not path.endswith("models") else "GET"
                kwargs = {"json": {**CHAT, "stream": False}} if method == "POST" else {}
                cases = [
                    ({}, 401, "api_key_required"),
                    (bearer("irk_" + "x" * 43), 401, "invalid_api_key"),
                    (bearer("sk-whatever"), 401, "invalid_api_key"),
                    (bearer(token), 401, "invalid_api_key"),  # the agent token is not a caller key
                    (bearer(other_key["key"]), 403, "key_not_for_instance"),
                ]
                for headers, status, code in cases:
                    response = await client.request(method, path, headers=headers, **kwargs)
                    assert response.status_code == status, (headers, response.text)
                    assert error_code(response) == code
                in_url = await client.request(method, path, params={"api_key": key["key"]}, **kwargs)
                assert in_url.status_code == 400
                ok = await client.request(method, path, headers=bearer(key["key"]), **kwargs)
                assert ok.status_code == 200, ok.text

            # The official SDK, with the key as its api_key, streams.
            sdk = openai.AsyncOpenAI(base_url=f"{relay.url}/api/chat/{instance_id}", api_key=key["key"])
            stream = await sdk.chat.completions.create(model="demo", messages=CHAT["messages"], stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert "hi" in text
            await sdk.close()

            # Revoked: refused at once.
            await client.delete(f"/api/instances/{instance_id}/keys/{key['key_id']}", headers=bearer(token))
            revoked = await chat(client, instance_id, bearer(key["key"]))
            assert revoked.status_code == 401 and error_code(revoked) == "invalid_api_key"

            # Back to public: anyone, whatever bearer the SDK sends.
            await client.patch(f"/api/instances/{instance_id}", headers=bearer(token), json={"visibility": "public"})
            for headers in ({}, bearer("sk-anything"), bearer(key["key"]), bearer(other_key["key"])):
                assert (await chat(client, instance_id, headers)).status_code == 200


async def test_no_secret_is_stored_in_clear(redis_url, redis):
    async with running_relay(redis_url, registration_key="reg-secret-123") as relay, relay.client() as client:
        response = await client.post("/api/instances", json={"name": "x"}, headers=bearer("reg-secret-123"))
        instance_id, token = response.json()["instance_id"], response.json()["agent_token"]
        key = (await client.post(f"/api/instances/{instance_id}/keys", headers=bearer(token),
                                 json={"name": "k"})).json()["key"]
        new = (await client.post(f"/api/instances/{instance_id}/token", headers=bearer(token))).json()["agent_token"]
        dump = bytearray()
        async for name in redis.scan_iter("*"):
            dump += name
            kind = (await redis.type(name)).decode()
            if kind == "string":
                dump += await redis.get(name) or b""
            elif kind == "hash":
                dump += orjson.dumps({k.decode(): v.decode() for k, v in (await redis.hgetall(name)).items()})
        for secret in (token, new, key, "reg-secret-123"):
            assert secret.encode() not in dump


# -- browsers -----------------------------------------------------------------------------


@pytest.mark.slow
async def test_cors_on_chat_and_models_only(redis_url):
    async with running_relay(redis_url) as relay, relay.client() as client:
        instance_id, token = await relay.register()
        origin = {"Origin": "https://some-web-app.example"}
        preflight = await client.options(
            f"/api/chat/{instance_id}/chat/completions",
            headers={**origin, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"},
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in preflight.headers
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        # Actual responses, errors included (a browser must be able to read a 503).
        offline = await client.post(f"/api/chat/{instance_id}", json=CHAT, headers=origin)
        assert offline.status_code == 503
        assert offline.headers["access-control-allow-origin"] == "*"
        assert "retry-after" in offline.headers["access-control-expose-headers"].lower()
        models = await client.get(f"/api/chat/{instance_id}/models", headers=origin)
        assert models.headers["access-control-allow-origin"] == "*"
        # Owner endpoints: no CORS at all, so other sites' pages cannot drive them.
        owner = await client.get(f"/api/instances/{instance_id}/keys", headers={**origin, **bearer(token)})
        assert "access-control-allow-origin" not in owner.headers


@pytest.mark.slow
async def test_cors_origins_configurable(redis_url):
    async with running_relay(redis_url, cors_origins="https://good.example, https://also.example") as relay, \
            relay.client() as client:
        instance_id, _ = await relay.register()
        good = await client.get(f"/api/chat/{instance_id}/models", headers={"Origin": "https://good.example"})
        assert good.headers["access-control-allow-origin"] == "https://good.example"
        bad = await client.get(f"/api/chat/{instance_id}/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in bad.headers
        preflight = await client.options(f"/api/chat/{instance_id}", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 400


@pytest.mark.slow
async def test_streaming_chat_through_private_instance(redis_url):
    async with running_relay(redis_url) as relay, relay.client() as client:
        instance_id, token = await relay.register()
        await client.patch(f"/api/instances/{instance_id}", headers=bearer(token), json={"visibility": "private"})
        key = (await client.post(f"/api/instances/{instance_id}/keys", headers=bearer(token),
                                 json={"name": "k"})).json()["key"]
        async with running_agent(relay.url, token), \
                client.stream("POST", f"/api/chat/{instance_id}", json=CHAT, headers=bearer(key)) as response:
            assert response.status_code == 200
            events = await sse_lines(response)
        assert events[-1] == "[DONE]"


def hold_resubscription(relay, monkeypatch) -> asyncio.Event:
    """Hold the relay's next SUBSCRIBE until the returned event is set.

    The relay resubscribes on its own shortly after losing its subscription;
    holding it makes "the rotation happened while it was down" certain instead
    of a race against that delay.  Nothing else changes: once released, the
    relay's own subscriber subscribes and runs its own after-resubscribe steps.
    """
    from relay.serving.subscriber import Subscriber

    real_subscribe = Subscriber._subscribe
    released = asyncio.Event()

    async def subscribe(self, *args, **kwargs):
        await released.wait()
        return await real_subscribe(self, *args, **kwargs)

    # On the class: the relay's subscriber is built inside create_app (one relay in these tests).
    monkeypatch.setattr(Subscriber, "_subscribe", subscribe)
    return released


@pytest.mark.slow
async def test_rotation_missed_while_unsubscribed_is_caught_on_resubscribe(redis_url, redis, monkeypatch):
    """The relay's pub/sub connection is killed on the Redis server; the token is
    rotated while it is down (its event reaches no one); once the relay has
    resubscribed on its own, it re-checks its agents and closes the one still
    on the old token, and only that one."""
    from relay.store import keys

    async with running_relay(redis_url) as relay, relay.client() as client:
        bus, sessions = relay.services.bus, relay.services.sessions
        instance_id, token = await relay.register()
        other_id, other_token = await relay.register()
        async with running_agent(relay.url, token) as rotated, running_agent(relay.url, other_token):
            await wait_until(lambda: bus.subscribed, what="the relay subscribed")
            resubscribe = hold_resubscription(relay, monkeypatch)
            assert await kill_subscriptions(redis) >= 1
            await wait_until(lambda: not bus.subscribed, what="the relay to notice its subscription is gone")
            assert await redis.pubsub_numsub(keys.EVENTS_CHANNEL) == [(keys.EVENTS_CHANNEL.encode(), 0)]

            response = await client.post(f"/api/instances/{instance_id}/token", headers=bearer(token))
            assert response.status_code == 200
            # Nobody could hear the rotation event: the old-token agent is still here.
            assert await redis.pubsub_numsub(keys.EVENTS_CHANNEL) == [(keys.EVENTS_CHANNEL.encode(), 0)]
            assert sorted(s.instance_id for s in sessions.all()) == sorted([instance_id, other_id])
            assert rotated.connected.is_set()

            resubscribe.set()
            await wait_until(lambda: bus.subscribed, what="the relay to resubscribe")
            await wait_until(lambda: _only(relay, other_id), what="rotated agent closed, other kept")
            await wait_until(lambda: not rotated.connected.is_set(), what="the rotated agent to notice")


async def _only(relay, instance_id: str) -> bool:
    sessions = relay.services.sessions.all()
    return [s.instance_id for s in sessions] == [instance_id]


async def test_agent_token_in_the_url_is_not_accepted(redis_url):
    async with running_relay(redis_url) as relay:
        _, token = await relay.register()
        url = relay.url.replace("http", "ws") + f"/api/agent/connect?token={token}"
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(url)
        assert refused.value.response.status_code == 401
