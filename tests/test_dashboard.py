"""The web dashboard's server side, over HTTP: pages, search, live status, relay info, owner settings.

Real relays (in-process, a short ``watch_interval`` so the live status poller
turns quickly) and real agents; the pages' scripts are ``test_browser``'s.
The live status stream is read as a browser's EventSource reads it, line by
line from a streaming response, and every wait on it is a wait for an event
(a generous deadline turns a stream that never says it into a failure).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

import wire
from relay.bodies.instances import InstanceDeleted, InstanceSettings, InstanceView, RelayInfo
from relay.doors import relay_api
from relay.store import keys
from relay.web import pages
from tests.helpers import (
    assert_openai_error,
    offline,
    running_agent,
    running_relay,
    wait_until,
)

pytestmark = pytest.mark.anyio

#: The poller's interval in these tests: quick turns, no timing is asserted on.
WATCH = dict(watch_interval=0.1)
WEB = Path(pages.__file__).parent
PAGES = {"/": "index.html", "/register": "register.html", "/i/0123456789abcdef": "instance.html"}
ASSETS = sorted(f"/static/{p.relative_to(WEB / 'static').as_posix()}" for p in (WEB / "static").rglob("*")
                if p.is_file())
UNKNOWN_ID = "00000000deadbeef"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_secured(response: httpx.Response) -> None:
    """Every header of ``pages.SECURITY_HEADERS``, as the module states them, and no cookie."""
    for name, value in pages.SECURITY_HEADERS:
        assert response.headers.get(name.decode()) == value.decode(), (response.url, name)
    csp = response.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "frame-ancestors 'none'"):
        assert directive in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "set-cookie" not in response.headers


# -- pages and assets ------------------------------------------------------------------


async def test_pages_and_assets_are_the_files_with_every_security_header(redis_url):
    async with running_relay(redis_url) as relay, relay.client() as client:
        assert ASSETS, "no assets found under relay/web/static"
        for path, name in PAGES.items():
            page = await client.get(path)
            assert page.status_code == 200, (path, page.text)
            assert page.headers["content-type"] == "text/html; charset=utf-8"
            assert page.headers["cache-control"] == "no-cache"
            assert_secured(page)
            # Fixed files: nothing of the relay's or an instance's is written into them.
            assert page.content == (WEB / name).read_bytes()
            head = await client.head(path)
            assert head.status_code == 200 and head.content == b""
            assert_secured(head)
        for path in ASSETS:
            asset = await client.get(path)
            assert asset.status_code == 200, (path, asset.text)
            assert asset.headers["cache-control"] == "no-cache"
            assert_secured(asset)
            assert asset.content == (WEB / path.removeprefix("/")).read_bytes()
            kind = asset.headers["content-type"]
            assert ("javascript" in kind) if path.endswith(".js") else kind.startswith("text/css"), (path, kind)
            # Revalidated, not refetched: the ETag answers 304 (with the headers still on).
            again = await client.get(path, headers={"If-None-Match": asset.headers["etag"]})
            assert again.status_code == 304, path
            assert_secured(again)


async def test_an_instance_page_is_the_same_file_whatever_the_instance_is_called(redis_url):
    async with running_relay(redis_url) as relay, relay.client() as client:
        hostile = "<img src=x onerror=alert(1)>"
        registered = await client.post("/api/instances", json={"name": hostile, "description": hostile})
        iid = registered.json()["instance_id"]
        page = await client.get(f"/i/{iid}")
        assert page.status_code == 200
        assert page.content == (WEB / "instance.html").read_bytes()
        assert b"onerror" not in page.content
        # An instance that does not exist gets the page too: the script finds out, and says so.
        assert (await client.get(f"/i/{UNKNOWN_ID}")).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("instance_id", ["not-hex", "0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0",
                                         "%3Cscript%3E"])
async def test_an_instance_page_for_a_malformed_id_is_404_with_the_page(redis_url, instance_id):
    """No instance can have that id: 404, and the page itself (secured like the others), which says so."""
    async with running_relay(redis_url) as relay, relay.client() as client:
        page = await client.get(f"/i/{instance_id}")
        assert page.status_code == 404
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.content == (WEB / "instance.html").read_bytes()  # nothing of the path written into it
        assert_secured(page)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/i/", "/i/0123456789abcdef/x", "/index.html", "/web/index.html"])
async def test_what_is_not_a_page_is_404(redis_url, path):
    async with running_relay(redis_url) as relay, relay.client() as client:
        response = await client.get(path)
        assert_openai_error(response, 404)
        assert b"import " not in response.content  # not a file of the relay's, whatever the path says


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/static/nope.js", "/static/../pages.py", "/static/%2e%2e/pages.py",
                                  "/static/", "/static/js/../../pages.py"])
async def test_a_missing_asset_is_404_with_the_dashboard_headers(redis_url, path):
    async with running_relay(redis_url) as relay, relay.client() as client:
        response = await client.get(path)
        assert response.status_code == 404
        assert b"import " not in response.content  # not a file of the relay's, whatever the path says
        if response.url.path.startswith("/static/"):  # (httpx itself folds some "../" away)
            assert_secured(response)


async def test_without_the_dashboard_there_are_no_pages_and_the_api_works(redis_url):
    async with running_relay(redis_url, dashboard=False, **WATCH) as relay, relay.client() as client:
        for path in [*PAGES, *ASSETS[:2]]:
            assert_openai_error(await client.get(path), 404)
        iid, token = await relay.register("no pages")
        listed = await client.get("/api/instances")
        assert listed.status_code == 200 and [v["instance_id"] for v in listed.json()["data"]] == [iid]
        assert (await client.get("/api/relay")).status_code == 200
        assert (await client.get(f"/api/instances/{iid}/settings", headers=bearer(token))).status_code == 200
        async with status_stream(client, [iid]) as stream:
            assert (await stream.event()) == ("instance", (await client.get(f"/api/instances/{iid}")).json())


# -- directory search ---------------------------------------------------------------------


def ids_of(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [view["instance_id"] for view in response.json()["data"]]


async def test_search_finds_name_description_id_and_model_ignoring_case(redis_url):
    async with running_relay(redis_url) as relay, relay.client() as client:
        async def register(name: str, description: str = "") -> tuple[str, str]:
            created = await client.post("/api/instances", json={"name": name, "description": description})
            return created.json()["instance_id"], created.json()["agent_token"]

        alpha, _ = await register("Alpha Bot", "answers questions")
        beta, _ = await register("beta", "Knows about VOLCANOES and lava")
        gamma, gamma_token = await register("gamma")
        street, _ = await register("STRASSE", "")
        hidden, hidden_token = await register("Alpha the private one", "volcanoes too")
        await client.patch(f"/api/instances/{hidden}", headers=bearer(hidden_token), json={"visibility": "private"})
        everyone = [alpha, beta, gamma, street]

        async def search(q: str, **params: Any) -> list[str]:
            return ids_of(await client.get("/api/instances", params={"q": q, **params}))

        assert await search("alpha") == [alpha]  # the private "Alpha" is never listed
        assert await search("ALPHA bot") == [alpha]
        assert await search("volcano") == [beta]  # the description
        assert await search("straße") == [street]  # casefolded: ß is ss
        assert await search(gamma.upper()) == [gamma]  # the id
        assert await search(gamma[4:12]) == [gamma]
        assert await search("  beta ") == [beta]  # leading and trailing whitespace aside
        assert await search("nothing like it") == []
        assert await search("") == everyone  # empty: no search
        assert ids_of(await client.get("/api/instances?q=")) == everyone
        assert ids_of(await client.get("/api/instances?q=&status=&limit=&cursor=")) == everyone
        # ... while the private one is still there for whoever has its id.
        assert (await client.get(f"/api/instances/{hidden}")).json()["name"] == "Alpha the private one"

        # A model an agent serves; and the search with a status.
        async with running_agent(relay.url, gamma_token, models=["Zephyr-Special-7B", "tiny"]):
            assert await search("special-7b") == [gamma]
            assert await search("a", status="online") == [gamma]  # "gamma", and its models
            assert await search("a", status="offline") == [alpha, beta, street]
            async with running_agent(relay.url, hidden_token, models=["zephyr-special-7b"]):
                assert await search("zephyr", status="online") == [gamma]  # private, online or not
        await wait_until(lambda: offline(relay, gamma), what="gamma's agent gone")
        # An offline instance is found by the models its agents last served.
        assert await search("zephyr", status="offline") == [gamma]
        assert await search("zephyr", status="online") == []

        # Paged like the rest of the list.
        first = (await client.get("/api/instances", params={"q": "a", "limit": 2})).json()
        assert [v["instance_id"] for v in first["data"]] == [alpha, beta] and first["next_cursor"]
        rest = await client.get("/api/instances", params={"q": "a", "limit": 2, "cursor": first["next_cursor"]})
        assert ids_of(rest) == [gamma, street]


async def test_a_search_longer_than_100_characters_is_refused(redis_url):
    async with running_relay(redis_url) as relay, relay.client() as client:
        assert ids_of(await client.get("/api/instances", params={"q": "x" * relay_api.MAX_QUERY_CHARS})) == []
        assert ids_of(await client.get("/api/instances", params={"q": "é" * relay_api.MAX_QUERY_CHARS})) == []
        for q in ("x" * (relay_api.MAX_QUERY_CHARS + 1), "é" * 101, "a" + " " * 99 + "b"):
            assert_openai_error(await client.get("/api/instances", params={"q": q}), 422,
                                code="invalid_parameter", param="q")


@pytest.mark.slow
async def test_a_search_examines_at_most_scan_limit_instances_per_call_and_the_cursor_goes_on(redis_url):
    """A search that matches little returns short pages, each with the cursor to go on from; all are found."""
    async with running_relay(redis_url, rate_register_per_ip=0) as relay:
        ids = [(await relay.register(f"{'needle' if i in (1, 6, 7, 11) else 'hay'} {i}"))[0] for i in range(12)]
        wanted = [ids[i] for i in (1, 6, 7, 11)]
        registry = relay.registry

        data, cursor = await registry.list(query="NEEDLE", limit=10, scan_limit=4)
        assert [v["instance_id"] for v in data] == [ids[1]]  # 4 examined, 1 found: a short page ...
        assert cursor is not None  # ... that says there is more
        found, pages = [v["instance_id"] for v in data], 1
        while cursor is not None:
            data, cursor = await registry.list(query="needle", limit=10, scan_limit=4, cursor=int(cursor))
            found += [v["instance_id"] for v in data]
            pages += 1
        assert found == wanted
        assert pages == 3  # 12 instances, 4 a call

        # A page may be empty and still go on; a full page stops early; the last one has no cursor.
        data, cursor = await registry.list(query="needle", limit=10, scan_limit=3, cursor=2)
        assert data == [] and cursor is not None
        data, cursor = await registry.list(query="needle", limit=2, scan_limit=100)
        assert [v["instance_id"] for v in data] == wanted[:2] and cursor is not None
        data, cursor = await registry.list(query="needle", limit=2, scan_limit=100, cursor=int(cursor))
        assert [v["instance_id"] for v in data] == wanted[2:] and cursor is None
        # A status is a filter too.
        data, cursor = await registry.list(status="online", limit=10, scan_limit=5)
        assert data == [] and cursor is not None
        # Without a filter, every instance examined is on the page.
        data, cursor = await registry.list(limit=5, scan_limit=5)
        assert [v["instance_id"] for v in data] == ids[:5] and cursor is not None


# -- the live status stream -----------------------------------------------------------------


class StatusStream:
    """A live status stream being read, as EventSource reads it.

    Each item is what one block of lines dispatches: ``(event name, data)``,
    ``("retry", milliseconds)`` for a block that only sets the reconnection
    time, or ``("comment", text)`` for a comment line.
    """

    def __init__(self, response: httpx.Response):
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self, deadline: float = 30) -> tuple[str, Any]:
        name, data, retry = "message", [], None
        async with asyncio.timeout(deadline):  # a stream that never says it fails, however slow the machine
            async for line in self._lines:
                if line.startswith(":"):
                    return "comment", line[1:].strip()
                if line:
                    field, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if field == "retry":
                        retry = int(value)
                    elif field == "event":
                        name = value
                    elif field == "data":
                        data.append(value)
                    continue
                if data:
                    return name, orjson.loads("\n".join(data))
                if retry is not None:
                    return "retry", retry
        raise EOFError("the stream ended")

    async def event(self) -> tuple[str, Any]:
        """The next event; a comment (a keep-alive) on the way is skipped."""
        while True:
            item = await self.next()
            if item[0] != "comment":
                return item

    async def events(self, n: int) -> dict[str, tuple[str, Any]]:
        """The next ``n`` events, by instance id: each about a different one."""
        out: dict[str, tuple[str, Any]] = {}
        for _ in range(n):
            name, data = await self.event()
            assert name in ("instance", "deleted"), (name, data)
            assert data["instance_id"] not in out, f"two events about {data['instance_id']}: {out}, {data}"
            out[data["instance_id"]] = (name, data)
        return out

    async def end(self) -> list[tuple[str, Any]]:
        """What comes until the stream ends, cleanly (a connection cut mid-body raises instead)."""
        rest = []
        with contextlib.suppress(EOFError):
            while True:
                rest.append(await self.next())
        return rest


@contextlib.asynccontextmanager
async def status_stream(client: httpx.AsyncClient, ids: list[str]) -> AsyncIterator[StatusStream]:
    """``GET /api/instances/events`` accepted and its ``retry`` read; leaving the block hangs up."""
    async with client.stream("GET", "/api/instances/events", params={"ids": ",".join(ids)}) as response:
        assert response.status_code == 200, (await response.aread()).decode(errors="replace")
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert "set-cookie" not in response.headers
        stream = StatusStream(response)
        assert await stream.next() == ("retry", 2000)  # EventSource comes back quickly after a node goes
        yield stream


def same_view(event: tuple[str, Any], view: dict[str, Any]) -> bool:
    """An ``instance`` event with this view (an online instance's ``last_seen`` is "now" at every read)."""
    name, data = event
    InstanceView.model_validate(data)
    assert set(data) == set(view), (data, view)
    if view["status"] == "online":
        data, view = {**data, "last_seen": None}, {**view, "last_seen": None}
    return name == "instance" and data == view


async def view_of(client: httpx.AsyncClient, instance_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/instances/{instance_id}")
    assert response.status_code == 200, response.text
    return response.json()


def count_reads(relay: Any) -> list[list[str]]:
    """The ids of each read the node's poller makes from now on (``registry.views``, this relay's only)."""
    reads: list[list[str]] = []
    registry = relay.registry
    views = registry.views

    async def counted(ids: list[str]) -> dict[str, Any]:
        reads.append(list(ids))
        return await views(ids)

    registry.views = counted
    return reads


async def watchers(relay: Any, n: int) -> None:
    await wait_until(lambda: len(relay.services.watch.watchers) == n, what=f"{n} watchers on the node")


@pytest.mark.slow
async def test_a_stream_follows_instances_through_their_lives(redis_url):
    """A snapshot first; then an event for each change, and only then (polls of unchanged views say nothing)."""
    async with running_relay(redis_url, **WATCH) as relay, relay.client() as client:
        first, first_token = await relay.register("first")
        second, second_token = await relay.register("second")
        reads = count_reads(relay)
        async with status_stream(client, [first, second, UNKNOWN_ID]) as stream:
            snapshot = await stream.events(3)
            assert same_view(snapshot[first], await view_of(client, first))
            assert same_view(snapshot[second], await view_of(client, second))
            assert snapshot[first][1]["status"] == "offline" and snapshot[first][1]["last_seen"] is None
            # An id that is well formed but not registered: deleted, at once.
            assert snapshot[UNKNOWN_ID] == ("deleted", {"instance_id": UNKNOWN_ID})
            InstanceDeleted.model_validate(snapshot[UNKNOWN_ID][1])

            async with running_agent(relay.url, first_token):
                came = await stream.event()
                assert came[1]["instance_id"] == first and came[1]["status"] == "online", came
                assert came[1]["agents"] == 1 and came[1]["models"] == ["demo"], came
                assert same_view(came, await view_of(client, first))
                # The poller reads the online view again and again (its last_seen is new each time): the
                # next event is the agent leaving, not the same view again.
                polls = len(reads)
                await wait_until(lambda: len(reads) >= polls + 3, what="three more polls")
            went = await stream.event()
            assert went[1]["instance_id"] == first and went[1]["status"] == "offline", went
            assert went[1]["agents"] == 0 and went[1]["last_seen"] is not None
            assert same_view(went, await view_of(client, first))

            # The owner's changes are changes too; a private instance is followed by its id all the same.
            changed = await client.patch(f"/api/instances/{second}", headers=bearer(second_token),
                                         json={"name": "second, renamed", "visibility": "private"})
            assert changed.status_code == 200, changed.text
            renamed = await stream.event()
            assert renamed[1]["instance_id"] == second, renamed
            assert renamed[1]["name"] == "second, renamed" and renamed[1]["visibility"] == "private"
            assert same_view(renamed, await view_of(client, second))

            assert (await client.delete(f"/api/instances/{second}", headers=bearer(second_token))).status_code == 204
            assert await stream.event() == ("deleted", {"instance_id": second})
            assert (await client.delete(f"/api/instances/{first}", headers=bearer(first_token))).status_code == 204
            assert await stream.event() == ("deleted", {"instance_id": first})
        await watchers(relay, 0)


async def test_a_quiet_stream_says_keep_alive(redis_url, monkeypatch):
    monkeypatch.setattr(relay_api, "KEEPALIVE_SECONDS", 0.05)
    async with running_relay(redis_url, **WATCH) as relay, relay.client() as client:
        iid, _ = await relay.register("quiet")
        async with status_stream(client, [iid]) as stream:
            assert same_view(await stream.event(), await view_of(client, iid))
            for _ in range(3):  # nothing changes: comments only, never the same view again
                assert await stream.next() == ("comment", "keep-alive")


@pytest.mark.slow
async def test_two_watchers_share_one_read_and_each_hears_of_its_own(redis_url):
    async with running_relay(redis_url, **WATCH) as relay, relay.client() as client:
        shared, shared_token = await relay.register("shared")
        mine, _ = await relay.register("mine")
        theirs, _ = await relay.register("theirs")
        reads = count_reads(relay)
        async with status_stream(client, [mine, shared]) as one, status_stream(client, [shared, theirs]) as two:
            assert set(await one.events(2)) == {mine, shared}
            assert set(await two.events(2)) == {shared, theirs}
            reads.clear()
            async with running_agent(relay.url, shared_token):
                for stream in (one, two):
                    came = await stream.event()
                    assert came[1]["instance_id"] == shared and came[1]["status"] == "online", came
            await wait_until(lambda: reads, what="a poll")
            # One read per poll, of the union, whatever the number of watchers.
            assert all(ids == sorted({mine, shared, theirs}) for ids in reads), reads
        await watchers(relay, 0)
        reads.clear()
        # Nobody watching, nothing is read; then a newcomer's ids alone.
        async with status_stream(client, [mine]) as stream:
            assert (await stream.event())[1]["instance_id"] == mine
        assert reads and all(ids == [mine] for ids in reads), reads


QUERIES_REFUSED = {
    "no ids": {},
    "empty": {"ids": ""},
    "commas only": {"ids": ",,,"},
    "101 ids": {"ids": ",".join(f"{i:016x}" for i in range(101))},
    "not hex": {"ids": "not-an-instance!!"},
    "upper case": {"ids": "0123456789ABCDEF"},
    "15 digits": {"ids": "0123456789abcde"},
    "17 digits": {"ids": "0123456789abcdef0"},
    "a space": {"ids": f"{UNKNOWN_ID}, 0123456789abcdef"},
    "one bad of two": {"ids": f"{UNKNOWN_ID},nothex"},
}


@pytest.mark.slow
@pytest.mark.parametrize("params", QUERIES_REFUSED.values(), ids=QUERIES_REFUSED.keys())
async def test_ids_that_are_not_1_to_100_instance_ids_are_refused(redis_url, params):
    async with running_relay(redis_url, **WATCH) as relay, relay.client() as client:
        refused = await client.get("/api/instances/events", params=params)
        assert_openai_error(refused, 422, type_="invalid_request_error", code="invalid_parameter", param="ids")
        assert not relay.services.watch.watchers


async def test_up_to_100_ids_are_followed_repeats_and_empty_ones_aside(redis_url):
    async with running_relay(redis_url, **WATCH) as relay, relay.client() as client:
        iid, _ = await relay.register("among many")
        many = [iid, *(f"{i:016x}" for i in range(99))]
        async with status_stream(client, [*many, iid, "", many[5]]) as stream:  # 102 parts, 100 distinct ids
            found = await stream.events(100)
        assert set(found) == set(many)
        assert found[iid][0] == "instance"
        assert all(found[other] == ("deleted", {"instance_id": other}) for other in many[1:])


@pytest.mark.slow
async def test_past_watchers_per_address_429_until_one_hangs_up(redis_url):
    async with running_relay(redis_url, watchers_per_address=2, **WATCH) as relay, relay.client() as client:
        iid, _ = await relay.register("popular")
        async with status_stream(client, [iid]) as kept:
            async with status_stream(client, [UNKNOWN_ID]) as second:
                await kept.event(), await second.event()
                for _ in range(2):
                    refused = await client.get("/api/instances/events", params={"ids": iid})
                    assert_openai_error(refused, 429, type_="rate_limit_error", code="rate_limited")
                    assert refused.headers["retry-after"] == "5"
                assert len(relay.services.watch.watchers) == 2  # the refused ones hold nothing
            await watchers(relay, 1)  # the second hung up: its place is free again
            async with status_stream(client, [iid]) as third:
                assert same_view(await third.event(), await view_of(client, iid))
                assert_openai_error(await client.get("/api/instances/events", params={"ids": iid}), 429)


@pytest.mark.slow
async def test_a_client_that_hangs_up_frees_its_place(redis_url):
    async with running_relay(redis_url, watchers_per_address=1, **WATCH) as relay, relay.client() as client:
        iid, _ = await relay.register("popular")
        for _ in range(3):  # each in turn: the one before hung up, its place is free again
            async with status_stream(client, [iid]) as stream:
                assert (await stream.event())[0] == "instance"
                assert_openai_error(await client.get("/api/instances/events", params={"ids": iid}), 429)
            await watchers(relay, 0)


@pytest.mark.slow
async def test_past_max_watchers_503(redis_url):
    async with running_relay(redis_url, max_watchers=1, **WATCH) as relay, relay.client() as client:
        iid, _ = await relay.register("popular")
        async with status_stream(client, [iid]) as stream:
            assert (await stream.event())[0] == "instance"
            refused = await client.get("/api/instances/events", params={"ids": iid})
            assert_openai_error(refused, 503, type_="service_unavailable", code="not_ready")
            assert refused.headers["retry-after"] == "5"
        await watchers(relay, 0)
        async with status_stream(client, [iid]) as stream:
            assert (await stream.event())[0] == "instance"


async def test_close_ends_every_stream_and_a_draining_node_takes_none(redis_url):
    async with running_relay(redis_url, **WATCH) as relay, relay.client() as client:
        iid, _ = await relay.register("closing")
        async with status_stream(client, [iid]) as one, status_stream(client, [UNKNOWN_ID]) as two:
            await one.event(), await two.event()
            relay.services.watch.close()
            assert await one.end() == [] and await two.end() == []
        await watchers(relay, 0)
        relay.services.node.draining = True
        try:
            refused = await client.get("/api/instances/events", params={"ids": iid})
            assert_openai_error(refused, 503, code="not_ready")
            assert refused.headers["retry-after"] == "1"
        finally:
            relay.services.node.draining = False
        async with status_stream(client, [iid]) as again:  # closing is not draining: streams are taken again
            assert (await again.event())[0] == "instance"


async def test_the_servers_drain_ends_an_open_stream(redis_url):
    async with running_relay(redis_url, **WATCH) as relay, relay.client() as client:
        iid, _ = await relay.register("draining")
        async with status_stream(client, [iid]) as stream:
            assert (await stream.event())[0] == "instance"
            relay.server.should_exit = True  # what SIGTERM does: RelayServer.shutdown, the drain
            assert await stream.end() == []
        assert relay.services.node.draining
        await watchers(relay, 0)


async def test_head_answers_the_headers_and_ends(redis_url):
    """Bug: a HEAD (Starlette answers one on every GET route) held its watcher and connection forever."""
    async with running_relay(redis_url, **WATCH) as relay, relay.client() as client:
        iid, _ = await relay.register("headed")
        head = await client.head("/api/instances/events", params={"ids": iid})
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-type"] == "text/event-stream; charset=utf-8"
        await watchers(relay, 0)
        assert (await client.get("/healthz")).status_code == 200  # the same connection, free again
        assert (await client.head("/api/instances/events")).status_code == 422


@pytest.mark.slow
async def test_a_poll_that_fails_leaves_the_node_and_its_streams_running(redis_url, redis, caplog):
    """Bug: the poller shares the task group of the node's heartbeat and subscriber, and a poll that raised
    (here: an agent entry that does not decode) ended them all: every stream closed, /readyz 503."""
    async with running_relay(redis_url, **WATCH) as relay, relay.client() as client:
        broken, _ = await relay.register("broken")
        fine, fine_token = await relay.register("fine")
        async with status_stream(client, [broken, fine]) as stream:
            assert set(await stream.events(2)) == {broken, fine}
            await redis.hset(keys.agents(broken), "agent-x", b"not json")
            await wait_until(lambda: any("a poll failed" in r.getMessage() for r in caplog.records),
                             what="a failed poll")
            assert (await client.get("/readyz")).status_code == 200
            await redis.hdel(keys.agents(broken), "agent-x")
            async with running_agent(relay.url, fine_token):
                came = await stream.event()
                assert came[1]["instance_id"] == fine and came[1]["status"] == "online", came


@pytest.mark.slow
async def test_a_watcher_on_one_node_sees_an_agent_on_another_come_and_go(redis_url):
    async with (running_relay(redis_url, **WATCH) as node_a, running_relay(redis_url, **WATCH) as node_b,
                node_a.client() as client_a, node_b.client() as client_b):
        iid, token = await node_a.register("elsewhere")
        async with status_stream(client_a, [iid]) as stream:
            assert same_view(await stream.event(), await view_of(client_a, iid))
            async with running_agent(node_b.url, token):
                came = await stream.event()
                assert came[1]["status"] == "online" and came[1]["agents"] == 1, came
                assert same_view(came, await view_of(client_a, iid))  # (each node's chat_url is its own)
                assert not node_a.services.sessions  # the agent is B's
            went = await stream.event()
            assert went[1]["status"] == "offline" and went[1]["agents"] == 0, went
            assert same_view(went, await view_of(client_a, iid))
            assert (await client_b.delete(f"/api/instances/{iid}", headers=bearer(token))).status_code == 204
            assert await stream.event() == ("deleted", {"instance_id": iid})


# -- the relay, and an owner's settings -----------------------------------------------------------


@pytest.mark.slow
async def test_relay_info_says_whether_registering_takes_a_key(redis_url):
    async with running_relay(redis_url) as relay, relay.client() as client:
        info = (await client.get("/api/relay")).json()
        RelayInfo.model_validate(info)
        assert info == {"base_url": relay.settings.base_url(), "version": wire.__version__, "registration": "open"}
        assert "set-cookie" not in (await client.get("/api/relay")).headers
    secret = "registration-secret-1234"
    async with (running_relay(redis_url, registration_key=secret, public_url="https://relay.example/") as relay,
                relay.client() as client):
        answer = await client.get("/api/relay")
        assert answer.json() == {"base_url": "https://relay.example", "version": wire.__version__,
                                 "registration": "key_required"}
        assert secret not in answer.text
        # ... and what it says is so.
        assert (await client.post("/api/instances", json={"name": "x"})).status_code == 401
        assert (await client.post("/api/instances", json={"name": "x"}, headers=bearer(secret))).status_code == 201


async def test_an_owner_reads_the_settings_and_they_follow_patch_and_the_agents_suggestion(redis_url):
    async with running_relay(redis_url) as relay, relay.client() as client:
        created = await client.post("/api/instances", json={"name": "tuned", "description": "about books"})
        iid, token = created.json()["instance_id"], created.json()["agent_token"]

        async def settings() -> dict[str, Any]:
            response = await client.get(f"/api/instances/{iid}/settings", headers=bearer(token))
            assert response.status_code == 200, response.text
            InstanceSettings.model_validate(response.json())
            return response.json()

        assert await settings() == {"name": "tuned", "description": "about books", "visibility": "public",
                                    "introduction": "", "variables": [], "conversations": True}
        suggestion = {"introduction": "Hi, I read books.", "variables": [{"key": "book", "required": True}]}
        async with running_agent(relay.url, token, parameters=suggestion):
            found = await settings()
            assert found["introduction"] == "Hi, I read books."
            assert [(v["key"], v["required"]) for v in found["variables"]] == [("book", True)]

            variables = [{"key": "city", "name": "City", "type": "select", "options": ["Paris", "Oslo"],
                          "required": True},
                         {"key": "notes", "type": "paragraph", "max_length": 500, "default": "none"}]
            patched = await client.patch(f"/api/instances/{iid}", headers=bearer(token), json={
                "name": "retuned", "description": "", "visibility": "private", "introduction": "Ask me.",
                "variables": variables, "conversations": False})
            assert patched.status_code == 200, patched.text
            found = await settings()  # the owner's win over the agent's
            assert {k: v for k, v in found.items() if k != "variables"} == {
                "name": "retuned", "description": "", "visibility": "private", "introduction": "Ask me.",
                "conversations": False}
            assert [{k: v for k, v in var.items() if k in given} for var, given in
                    zip(found["variables"], variables, strict=True)] == variables
            # The public view still does not show them.
            assert not {"introduction", "variables", "conversations"} & set(await view_of(client, iid))
        await client.patch(f"/api/instances/{iid}", headers=bearer(token), json={"conversations": True,
                                                                                  "variables": []})
        found = await settings()
        assert found["conversations"] is True and found["variables"] == [] and found["introduction"] == "Ask me."


async def test_settings_are_refused_as_every_owner_route_refuses(redis_url):
    """401 without a token, 403 with another's, 404 for no instance; the same answers as GET …/keys gives."""
    async with running_relay(redis_url) as relay, relay.client() as client:
        iid, token = await relay.register("mine")
        other, other_token = await relay.register("someone else's")
        cases = [
            (iid, {}, 401, "authentication_error"),
            (iid, {"Authorization": "Basic eDp5"}, 401, "authentication_error"),
            (iid, bearer("ira_" + "x" * 43), 403, "permission_error"),
            (iid, bearer(other_token), 403, "permission_error"),
            (UNKNOWN_ID, bearer(token), 404, "not_found_error"),
            (UNKNOWN_ID, {}, 404, "not_found_error"),
            ("not-an-id", bearer(token), 404, "not_found_error"),
        ]
        for instance_id, headers, status, type_ in cases:
            answer = await client.get(f"/api/instances/{instance_id}/settings", headers=headers)
            error = assert_openai_error(answer, status, type_=type_)
            same = assert_openai_error(await client.get(f"/api/instances/{instance_id}/keys", headers=headers),
                                       status)
            assert (error["type"], error["code"], error["param"]) == (same["type"], same["code"], same["param"])
            assert token not in answer.text and other_token not in answer.text
        # A credential in the URL is refused before anything is looked up, as everywhere.
        in_url = await client.get(f"/api/instances/{iid}/settings", params={"token": token})
        assert_openai_error(in_url, 400, code="credentials_in_url")
        # The other's own token reads its own.
        assert (await client.get(f"/api/instances/{other}/settings", headers=bearer(other_token))).status_code == 200


# -- what a stream costs the node --------------------------------------------------------


async def test_a_newcomer_first_reads_only_its_own_ids(redis_url):
    # A long interval: any read that happens at once is a newcomer's.
    async with running_relay(redis_url, watch_interval=30) as relay, relay.client() as client:
        old, _ = await relay.register("old")
        new, _ = await relay.register("new")
        reads = count_reads(relay)
        async with status_stream(client, [old]) as first:
            assert (await first.event())[1]["instance_id"] == old
            async with status_stream(client, [new]) as second:
                assert (await second.event())[1]["instance_id"] == new
        assert reads == [[old], [new]], reads


@pytest.mark.slow
async def test_an_id_that_is_gone_is_told_once_then_no_longer_read(redis_url):
    async with running_relay(redis_url, **WATCH) as relay, relay.client() as client:
        real, _ = await relay.register("real")
        reads = count_reads(relay)
        async with status_stream(client, [real, UNKNOWN_ID]) as stream:
            told = await stream.events(2)
            assert told[UNKNOWN_ID][0] == "deleted" and told[real][0] == "instance"
            reads.clear()
            await wait_until(lambda: len(reads) >= 3, what="three more polls")
            assert all(ids == [real] for ids in reads), reads
            assert dict(relay.services.watch._refs) == {real: 1}
        await watchers(relay, 0)
        assert not relay.services.watch._refs  # nothing left counted once everyone hung up


@pytest.mark.slow
async def test_past_the_nodes_distinct_ids_503(redis_url):
    async with running_relay(redis_url, **WATCH) as relay, relay.client() as client:
        relay.services.watch.max_ids = 3
        ids = [(await relay.register(f"i{n}"))[0] for n in range(4)]  # registered: followed until hung up
        async with status_stream(client, ids[:2]) as stream:
            await stream.events(2)
            # Ids already followed cost nothing more; two new ones would make four.
            async with status_stream(client, ids[:2]) as again:
                await again.events(2)
            refused = await client.get("/api/instances/events", params={"ids": ",".join(ids[1:])})
            assert_openai_error(refused, 503, type_="service_unavailable")


@pytest.mark.parametrize(("address", "group"), [
    ("203.0.113.7", "203.0.113.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("::ffff:203.0.113.7", "203.0.113.7"),
    ("not an address", "not an address"),
])
def test_the_per_address_cap_counts_an_ipv6_host_by_its_64(address, group):
    from relay.web.live import address_group

    assert address_group(address) == group


@pytest.mark.slow
async def test_a_stream_ends_when_it_is_old_and_says_retry(redis_url, monkeypatch):
    monkeypatch.setattr("relay.web.live.MAX_AGE", 0.5)
    async with running_relay(redis_url, **WATCH) as relay, relay.client() as client:
        iid, _ = await relay.register("aged")
        async with status_stream(client, [iid]) as stream:
            assert (await stream.event())[0] == "instance"
            assert all(item[0] == "comment" for item in await stream.end())  # then a clean end
        await watchers(relay, 0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_a_page_refuses_other_methods_with_the_headers(redis_url, method):
    async with running_relay(redis_url) as relay, relay.client() as client:
        for path in ("/", "/register", f"/i/{UNKNOWN_ID}"):
            response = await client.request(method, path, content=b"name=x")
            assert response.status_code == 405 and response.headers["allow"] == "GET, HEAD"
            assert_secured(response)
