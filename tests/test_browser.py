"""The web dashboard in a real browser: Chromium driven by Playwright.

Against a real relay (in-process uvicorn on a port), real agents (in-process,
and one started as a process from the command the page shows) and the demo
model or a fake OpenAI-compatible upstream.  Every page is checked for
script errors and Content-Security-Policy violations as it is used.

Chromium is Debian's (``apt-get install chromium``; ``.ci/run`` installs it);
Playwright's own browser download is not used.  Without a browser these
tests skip, unless ``RELAY_TEST_BROWSER=required`` (``.ci/run`` sets it), in
which case a missing browser fails them.  ``RELAY_SCREENSHOTS=<dir>`` also
saves the screenshots taken along the way there (``docs/screenshots`` in the
README were made so).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.demo_model import DemoBackend
from tests.helpers import (
    FakeUpstream,
    free_port,
    instance_view,
    offline,
    online,
    openai_backend,
    running_agent,
    running_relay,
    running_upstream,
    wait_until,
)

REQUIRED = os.environ.get("RELAY_TEST_BROWSER") == "required"
CHROMIUM = os.environ.get("RELAY_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")

try:
    from playwright.async_api import Page, async_playwright, expect
except ImportError:  # pragma: no cover - the dev extra installs it
    if REQUIRED:
        raise
    pytest.skip("playwright is not installed", allow_module_level=True)

if not CHROMIUM:
    if REQUIRED:
        raise RuntimeError("RELAY_TEST_BROWSER=required but no chromium on PATH (apt-get install chromium)")
    pytest.skip("no chromium on PATH (apt-get install chromium), browser tests skipped", allow_module_level=True)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

#: How the machine's own checks start Chromium as root with no network: without the
#: background-networking flags it keeps trying to reach Google's hosts.
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions",
]
#: Generous deadlines for things that must happen (a loaded 2-core machine is slow), never bounds.
SOON = 20_000  # ms
PHONE = {"width": 375, "height": 740}

XSS_NAME = "<img src=x onerror=alert(1)>"
XSS_DESCRIPTION = '<script>alert("description")</script><b onmouseover=alert(2)>bold?</b>'
XSS_MODEL = "<svg onload=alert(3)>'; touch /tmp/pwned; echo '"

#: Reported by the page to the test: a CSP violation anywhere is a bug of ours.
REPORT_CSP = """
document.addEventListener('securitypolicyviolation', (e) => {
  console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI}`);
});
"""


@dataclass
class Problems:
    """What went wrong in the page: uncaught errors, CSP violations, dialogs (alert() means XSS)."""

    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def check(self) -> None:
        assert not self.dialogs, f"the page opened dialogs: {self.dialogs}"
        assert not self.errors, f"the page reported errors: {self.errors}"


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[Any]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


async def new_page(chromium: Any, problems: Problems, **context: Any) -> Page:
    ctx = await chromium.new_context(**context)
    page = await ctx.new_page()
    await page.add_init_script(REPORT_CSP)
    page.on("pageerror", lambda error: problems.errors.append(f"uncaught: {error}"))

    def console(message: Any) -> None:
        # The only console errors we accept: the live status stream dropping when a test
        # stops the relay, and the 401 the playground is shown on purpose.
        if message.type == "error" and "CSP violation" in message.text:
            problems.errors.append(message.text)

    page.on("console", console)

    async def dialog(d: Any) -> None:
        problems.dialogs.append(d.message)
        await d.dismiss()

    page.on("dialog", dialog)
    return page


def shoot(page: Page, tmp_path: Path, name: str) -> Any:
    """A full-page screenshot in the test's directory, and in RELAY_SCREENSHOTS if set."""

    async def take() -> None:
        path = tmp_path / f"{name}.png"
        await page.screenshot(path=str(path), full_page=True)
        target = os.environ.get("RELAY_SCREENSHOTS")
        if target:
            await asyncio.to_thread(keep, path, Path(target))

    return take()


def keep(path: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, target / path.name)


async def no_horizontal_scroll(page: Page) -> None:
    overflow = await page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"{page.url} scrolls sideways by {overflow}px"


async def register(relay: Any, name: str, description: str = "") -> tuple[str, str]:
    async with relay.client() as client:
        response = await client.post("/api/instances", json={"name": name, "description": description})
        response.raise_for_status()
        data = response.json()
    return data["instance_id"], data["agent_token"]


# -- register -------------------------------------------------------------------------------


async def test_register_then_the_copied_command_brings_the_instance_online(redis_url, tmp_path):
    problems = Problems()
    async with running_relay(redis_url, watch_interval=0.2) as relay, browser() as chromium:
        page = await new_page(chromium, problems, viewport={"width": 1200, "height": 900})
        urls: list[str] = []
        page.on("request", lambda request: urls.append(request.url))
        await page.goto(f"{relay.url}/register")
        await page.get_by_label("Name").fill("my-llama")
        await page.get_by_label("Description").fill("Llama 3.2 on a desk in Lyon")
        await page.get_by_role("button", name="Register").click()
        await expect(page.locator("#result")).to_be_visible()

        token = (await page.locator("[data-snippet=agent-token]").inner_text()).strip()
        instance_id = (await page.locator("[data-field=instance_id]").inner_text()).strip()
        assert token.startswith("ira_")
        assert (await page.locator("[data-field=chat_url]").inner_text()) == f"{relay.url}/api/chat/{instance_id}"
        await expect(page.locator("#result .warning")).to_contain_text("shown only once")
        docker = await page.locator("[data-snippet=agent-docker]").inner_text()
        assert "docker run" in docker and f"AGENT_TOKEN={token}" in docker
        await expect(page.locator("#wait")).to_have_text("Waiting for the agent to connect…")
        await shoot(page, tmp_path, "register")

        # The command exactly as the page shows it, run as a process.
        command = shlex.split(await page.locator("[data-snippet=agent-demo]").inner_text())
        assert command[:2] == ["relay-agent", "run"] and token in command
        program = Path(sys.executable).with_name("relay-agent")
        agent = subprocess.Popen(
            [str(program), *command[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "AGENT_CREDENTIALS": str(tmp_path / "agent.json")})
        try:
            await expect(page.locator("#wait")).to_have_attribute("data-status", "online", timeout=SOON)
            await expect(page.locator("#wait")).to_contain_text("1 agent connected, serving demo")
            await shoot(page, tmp_path, "register-online")

            # The instance page opens with the owner view unlocked: the token is in this tab.
            await page.get_by_role("link", name="Open the instance page").click()
            await expect(page.locator("#instance-status")).to_have_attribute("data-status", "online")
            await expect(page.locator("#owner-panel")).to_be_visible()
            await expect(page.locator("#set-name")).to_have_value("my-llama")
            assert await page.evaluate("localStorage.length") == 0
            assert await page.evaluate(f"sessionStorage.getItem('owner:{instance_id}')") == token
            assert not any(token in url for url in urls), "the agent token appeared in a URL"
        finally:
            agent.terminate()
            agent.wait(15)
        problems.check()


async def test_registration_key_policy_is_honoured(redis_url, tmp_path):
    problems = Problems()
    async with running_relay(redis_url, registration_key="s3cret-registration") as relay, browser() as chromium:
        page = await new_page(chromium, problems)
        await page.goto(f"{relay.url}/register")
        key = page.get_by_label("Registration key")
        await expect(key).to_be_visible()
        await page.get_by_label("Name").fill("keyed")
        await key.fill("wrong")
        await page.get_by_role("button", name="Register").click()
        await expect(page.locator("#register-error")).to_be_visible()
        assert await page.locator("#result").is_hidden()
        await key.fill("s3cret-registration")
        await page.get_by_role("button", name="Register").click()
        await expect(page.locator("#result")).to_be_visible()
        problems.check()


async def test_relay_demo_prints_the_dashboard_which_shows_the_demo_online(tmp_path):
    """The README's first command, as a process on its embedded defaults (its own redis-server)."""
    problems = Problems()
    port = free_port()
    demo = subprocess.Popen(
        [str(Path(sys.executable).with_name("relay")), "demo"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "RELAY_PORT": str(port), "RELAY_DATA_DIR": str(tmp_path / "data"),
                        "PYTHONUNBUFFERED": "1"})
    printed: list[str] = []
    try:
        def dashboard_line() -> str:
            assert demo.stdout is not None
            for line in demo.stdout:
                printed.append(line)
                if "Dashboard:" in line:
                    return line
            raise AssertionError(f"relay demo ended without printing its dashboard: {''.join(printed)}")

        line = await asyncio.wait_for(asyncio.to_thread(dashboard_line), 60)
        # Keep reading what it prints, or its pipe fills and the demo blocks.
        threading.Thread(target=lambda: printed.extend(demo.stdout or ()), daemon=True).start()
        url = line.split("Dashboard:")[1].split()[0]
        assert url == f"http://127.0.0.1:{port}/"
        async with browser() as chromium:
            page = await new_page(chromium, problems)
            await page.goto(url)
            card = page.locator("#online-list li.card", has_text="demo")
            await expect(card).to_have_attribute("data-status", "online", timeout=SOON)
            await card.get_by_role("link", name="demo").click()
            await page.get_by_label("Message").fill("Hello!")
            await page.get_by_role("button", name="Send").click()
            await expect(page.locator("#transcript li.assistant")).to_contain_text("demo model", timeout=SOON)
        problems.check()
    finally:
        demo.terminate()
        demo.wait(30)


# -- directory ---------------------------------------------------------------------------------


async def test_directory_is_live_searchable_and_paged(redis_url, tmp_path):
    problems = Problems()
    async with (running_relay(redis_url, watch_interval=0.2, rate_register_per_ip=0) as relay,
                browser() as chromium):
        alpha, alpha_token = await register(relay, "alpha", "answers in haiku")
        bravo, _ = await register(relay, "bravo", "a model that is never on")
        # Enough offline instances for more than one page (24 a page).
        for n in range(26):
            await register(relay, f"filler-{n:02d}")
        page = await new_page(chromium, problems, viewport={"width": 1200, "height": 900})
        card = page.locator(f'li.card[data-instance="{alpha}"]')
        async with running_agent(relay.url, alpha_token):
            await page.goto(f"{relay.url}/")
            await expect(card).to_have_attribute("data-status", "online")
            await expect(page.locator("#online-list")).to_contain_text("alpha")
            await expect(page.locator("#online-list")).not_to_contain_text("bravo")
            await expect(page.locator("#live-state")).to_contain_text("Live")
            await shoot(page, tmp_path, "directory")
            await page.evaluate("window.notReloaded = true")
        # The agent stopped: the card turns offline and moves to the offline list, no reload.
        await expect(card).to_have_attribute("data-status", "offline", timeout=SOON)
        await expect(card.locator(".badge")).to_have_text("offline")
        await expect(card).to_contain_text("last seen")
        await expect(page.locator("#offline-list li.card").first).to_have_attribute("data-instance", alpha)
        await expect(page.locator("#online-empty")).to_be_visible()
        # And back: an agent connects, the card is online again, first of the online list.
        async with running_agent(relay.url, alpha_token):
            await expect(page.locator("#online-list li.card").first).to_have_attribute(
                "data-instance", alpha, timeout=SOON)
            await expect(card.locator(".badge")).to_have_text("online")
        assert await page.evaluate("window.notReloaded") is True

        # Paged: the first page of offline instances is full, the next one has the rest.
        await wait_until(lambda: offline(relay, alpha), 20, what="alpha offline again")
        await page.reload()
        offline_cards = page.locator("#offline-list li.card")
        await expect(offline_cards).to_have_count(24)
        await page.locator("#offline-pager").get_by_role("button", name="Next").click()
        await expect(offline_cards).to_have_count(28 - 24)
        await page.locator("#offline-pager").get_by_role("button", name="Previous").click()
        await expect(offline_cards).to_have_count(24)

        # Searchable: by name, description or id, ignoring case.
        await page.get_by_label("Search by name").fill("HAIKU")
        await expect(page.locator("li.card")).to_have_count(1)
        await expect(page.locator("li.card")).to_have_attribute("data-instance", alpha)
        await page.get_by_label("Search by name").fill(bravo[:10])
        await expect(page.locator("li.card")).to_have_count(1)
        await expect(page.locator("li.card")).to_have_attribute("data-instance", bravo)
        await page.get_by_label("Search by name").fill("no such thing")
        await expect(page.locator("li.card")).to_have_count(0)
        await expect(page.locator("#online-empty")).to_have_text("No match.")
        problems.check()


# -- playground -------------------------------------------------------------------------------


async def test_playground_streams_and_stop_cancels_upstream(redis_url, tmp_path):
    problems = Problems()
    upstream = FakeUpstream(chunks=40, hold_after=3, delay=0.02)  # about 50 tokens/s
    async with (running_upstream(upstream), running_relay(redis_url, watch_interval=0.2) as relay,
                browser() as chromium):
        instance_id, token = await register(relay, "fake-llm", "a fake upstream behind a real agent")
        async with running_agent(relay.url, token, openai_backend(upstream)):
            page = await new_page(chromium, problems, viewport={"width": 1200, "height": 1000})
            await page.goto(f"{relay.url}/i/{instance_id}")
            await expect(page.locator("#model")).to_have_value("fake-model")
            await page.get_by_label("Message").fill("Tell me a long story")
            await page.get_by_label("Message").press("Control+Enter")  # the keyboard way to send
            answer = page.locator("#transcript li.assistant").last
            await expect(answer).to_contain_text("w0 w1 w2")
            await expect(page.locator("#stats")).to_contain_text("first token")
            await expect(page.get_by_role("button", name="Stop")).to_be_enabled()
            assert upstream.inflight == 1

            await page.get_by_role("button", name="Stop").click()
            # Stop really cancels: the relay tells the agent, which closes its request to the model.
            await wait_until(lambda: upstream.disconnects == 1, 20, what="the upstream to see the stream closed")
            await expect(answer).to_have_attribute("data-state", "stopped")
            await expect(page.get_by_role("button", name="Send")).to_be_enabled()
            assert upstream.completed == 0

            # "New chat" while a turn streams: that turn is cancelled too, and the next
            # conversation starts empty (the old turn, ending late, must not write into it).
            await page.get_by_label("Message").fill("Something else")
            await page.get_by_role("button", name="Send").click()
            await expect(page.locator("#transcript li.assistant").last).to_contain_text("w2")
            await page.get_by_role("button", name="New chat").click()
            await wait_until(lambda: upstream.disconnects == 2, 20, what="the second stream closed upstream")
            await expect(page.locator("#transcript li")).to_have_count(0)

            # The next turns stream to their end; each answer is part of the next one's history.
            upstream.release()
            await page.get_by_label("Message").fill("Tell me a long story")
            await page.get_by_role("button", name="Send").click()
            await expect(page.locator("#transcript li.assistant").last).to_have_attribute(
                "data-state", "done", timeout=SOON)
            assert [m["role"] for m in upstream.requests[-1]["messages"]] == ["user"]
            await page.get_by_label("Message").fill("Go on")
            await page.get_by_role("button", name="Send").click()
            last = page.locator("#transcript li.assistant").last
            await expect(last).to_have_attribute("data-state", "done", timeout=SOON)
            await expect(last).to_contain_text("w39")
            await expect(page.locator("#stats")).to_contain_text("tokens/s")
            await expect(page.locator("#stats")).to_contain_text("40 tokens")  # the usage chunk, asked for
            sent = upstream.requests[-1]["messages"]
            assert [m["role"] for m in sent] == ["user", "assistant", "user"]
            assert sent[1]["content"].startswith("w0 w1 w2 w3")
            await shoot(page, tmp_path, "instance")
        problems.check()


async def test_playground_on_a_phone(redis_url, tmp_path):
    problems = Problems()
    async with running_relay(redis_url, watch_interval=0.2) as relay, browser() as chromium:
        instance_id, token = await register(relay, "pocket", "the demo model, on a phone-sized screen")
        async with running_agent(relay.url, token, DemoBackend(rate=60)):  # a believable tokens/s on screen
            page = await new_page(chromium, problems, viewport=PHONE, is_mobile=True, has_touch=True)
            await page.goto(f"{relay.url}/i/{instance_id}")
            await page.get_by_label("Message").fill("Hello from a phone")
            await page.get_by_role("button", name="Send").click()
            answer = page.locator("#transcript li.assistant").last
            await expect(answer).to_have_attribute("data-state", "done", timeout=SOON)
            await no_horizontal_scroll(page)
            await shoot(page, tmp_path, "instance-phone")
        problems.check()


@pytest.mark.parametrize("visibility", ["public", "private"])
async def test_snippets_run_as_copied(redis_url, tmp_path, visibility):
    """Each snippet the page offers, copied from the page and run: curl, openai (both URLs), LangChain, Dify."""
    problems = Problems()
    async with running_relay(redis_url) as relay, browser() as chromium:
        instance_id, token = await register(relay, "snippets")
        env = {**os.environ}
        if visibility == "private":
            async with relay.client() as client:
                headers = {"Authorization": f"Bearer {token}"}
                await client.patch(f"/api/instances/{instance_id}", json={"visibility": "private"}, headers=headers)
                env["RELAY_API_KEY"] = (await client.post(f"/api/instances/{instance_id}/keys", json={"name": "s"},
                                                          headers=headers)).json()["key"]
        async with running_agent(relay.url, token, DemoBackend(rate=0)):
            page = await new_page(chromium, problems)
            await page.goto(f"{relay.url}/i/{instance_id}")
            snippets = {}
            for name in ("curl", "openai-instance", "openai-global", "langchain", "dify"):
                snippets[name] = await page.locator(f"[data-snippet={name}]").inner_text()

            async def run(args: list[str]) -> str:
                done = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, timeout=60,
                                               env=env)
                assert done.returncode == 0, f"{args[:2]} failed: {done.stderr[-2000:]}"
                return done.stdout

            if shutil.which("curl"):
                # The shell would expand $RELAY_API_KEY: do what it does, then run curl itself.
                words = [w.replace("$RELAY_API_KEY", env.get("RELAY_API_KEY", "")) for w in
                         shlex.split(snippets["curl"].replace("\\\n", " "))]
                out = await run(words)
                assert "I am the instance-relay demo model" in "".join(
                    json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                    for line in out.splitlines() if line.startswith("data: {") and '"choices":[{' in line)
                assert out.rstrip().endswith("data: [DONE]")
            for name in ("openai-instance", "openai-global", "langchain", "dify"):
                out = await run([sys.executable, "-c", snippets[name]])
                assert "I am the instance-relay demo model" in out, (name, out)
        problems.check()


# -- owner view ----------------------------------------------------------------------------------


async def test_owner_view_keys_visibility_rotation_and_delete(redis_url, tmp_path):
    problems = Problems()
    async with running_relay(redis_url, watch_interval=0.2) as relay, browser() as chromium:
        instance_id, token = await register(relay, "owned", "managed from the browser")
        page = await new_page(chromium, problems, viewport={"width": 1200, "height": 1000})
        async with running_agent(relay.url, token, DemoBackend(rate=0)) as old_agent:
            await page.goto(f"{relay.url}/i/{instance_id}")
            # A wrong token is refused and not kept.
            await page.get_by_label("Agent token").fill("ira_wrong")
            await page.get_by_role("button", name="Unlock").click()
            await expect(page.locator("#owner-error")).to_contain_text("does not own this instance")
            assert await page.evaluate(f"sessionStorage.getItem('owner:{instance_id}')") is None
            await page.get_by_label("Agent token").fill(token)
            await page.get_by_role("button", name="Unlock").click()
            await expect(page.locator("#owner-panel")).to_be_visible()

            # Settings: rename, describe, make private, conversation parameters.
            await page.get_by_label("Name", exact=True).fill("owned & renamed")
            await page.locator("#set-description").fill("now private")
            await page.get_by_label("Visibility").select_option("private")
            await page.get_by_label("Opening statement").fill("Ask me anything.")
            await page.get_by_label("Input variables").fill("not json")
            await page.get_by_role("button", name="Save settings").click()
            await expect(page.locator("#settings-error")).to_contain_text("not JSON")
            await page.get_by_label("Input variables").fill(
                json.dumps([{"key": "tone", "type": "select", "options": ["dry", "warm"]}]))
            await page.get_by_role("button", name="Save settings").click()
            await expect(page.locator("#settings-status")).to_have_text("Saved.")
            await expect(page.locator("#instance-name")).to_have_text("owned & renamed")
            view = await instance_view(relay, instance_id)
            assert (view["name"], view["description"], view["visibility"]) == ("owned & renamed", "now private",
                                                                               "private")
            async with relay.client() as client:
                settings = (await client.get(f"/api/instances/{instance_id}/settings",
                                             headers={"Authorization": f"Bearer {token}"})).json()
            assert settings["introduction"] == "Ask me anything."
            assert settings["variables"][0]["key"] == "tone"

            # Private now: the playground without a key gets the relay's 401, and asks for one.
            await page.get_by_label("Message").fill("hello?")
            await page.get_by_role("button", name="Send").click()
            await expect(page.locator("#chat-error")).to_be_visible()
            await expect(page.get_by_label("Caller key", exact=True)).to_be_visible()

            # A new key, shown once, works from the playground.
            await page.get_by_label("New key's name").fill("playground")
            await page.get_by_role("button", name="Create key").click()
            key = (await page.locator("[data-snippet=caller-key]").inner_text()).strip()
            assert key.startswith("irk_") or len(key) > 20
            await expect(page.locator("#keys-table tbody tr")).to_have_count(1)
            await page.get_by_label("Caller key", exact=True).fill(key)
            await page.get_by_label("Message").fill("hello with a key")
            await page.get_by_role("button", name="Send").click()
            answer = page.locator("#transcript li.assistant").last
            await expect(answer).to_have_attribute("data-state", "done", timeout=SOON)
            await expect(page.locator("#chat-error")).to_be_hidden()
            await shoot(page, tmp_path, "owner")

            # Rotate: the new token is shown once, the old agent is disconnected.
            await page.get_by_role("button", name="Rotate token…").click()
            await page.get_by_role("button", name="Rotate now").click()
            new_token = (await page.locator("#new-token [data-snippet=agent-token]").inner_text()).strip()
            assert new_token.startswith("ira_") and new_token != token
            await wait_until(lambda: not old_agent.connected.is_set(), 20, what="the old agent to be kicked")
            await wait_until(lambda: offline(relay, instance_id), 20, what="the instance to go offline")
            await expect(page.locator("#instance-status")).to_have_attribute("data-status", "offline", timeout=SOON)
            # The owner view goes on with the new token (kept in the tab).
            assert await page.evaluate(f"sessionStorage.getItem('owner:{instance_id}')") == new_token
        async with running_agent(relay.url, new_token, DemoBackend(rate=0)):
            await wait_until(lambda: online(relay, instance_id), 20, what="the agent with the new token")
            await expect(page.locator("#instance-status")).to_have_attribute("data-status", "online", timeout=SOON)

        # Revoke the key: it stops working.
        await page.get_by_role("button", name="Revoke key playground").click()
        await expect(page.locator("#keys-table")).to_contain_text("No caller keys.")
        async with httpx.AsyncClient(base_url=relay.url) as client:
            response = await client.post(f"/api/chat/{instance_id}/chat/completions",
                                         headers={"Authorization": f"Bearer {key}"},
                                         json={"messages": [{"role": "user", "content": "hi"}]})
            assert response.status_code == 401

        # Delete, two steps: gone, and the page says so.
        await page.get_by_role("button", name="Delete this instance…").click()
        await page.get_by_role("button", name="Delete permanently").click()
        await page.wait_for_url(f"{relay.url}/")
        async with httpx.AsyncClient(base_url=relay.url) as client:
            assert (await client.get(f"/api/instances/{instance_id}")).status_code == 404
        await page.goto(f"{relay.url}/i/{instance_id}")
        await expect(page.locator("#missing")).to_be_visible()
        problems.check()


# -- hostile strings ------------------------------------------------------------------------------


async def test_instance_supplied_strings_show_as_text(redis_url, tmp_path):
    problems = Problems()
    async with running_relay(redis_url, watch_interval=0.2) as relay, browser() as chromium:
        instance_id, token = await register(relay, XSS_NAME, XSS_DESCRIPTION)
        async with running_agent(relay.url, token, DemoBackend(rate=0), models=[XSS_MODEL]):
            page = await new_page(chromium, problems, viewport={"width": 1200, "height": 900})
            await page.goto(f"{relay.url}/")
            card = page.locator(f'li.card[data-instance="{instance_id}"]')
            await expect(card.locator("h3")).to_have_text(XSS_NAME)
            await expect(card.locator(".desc")).to_have_text(XSS_DESCRIPTION)
            await expect(card.locator(".chips li")).to_have_text(XSS_MODEL)
            assert await page.locator("main img, main svg, main script, main b").count() == 0

            await page.goto(f"{relay.url}/i/{instance_id}")
            await expect(page.locator("#instance-name")).to_have_text(XSS_NAME)
            await expect(page.locator("#instance-description")).to_have_text(XSS_DESCRIPTION)
            assert await page.locator("main img, main svg, main script, main b").count() == 0
            assert await page.title() == f"{XSS_NAME} · instance-relay"
            # The copied curl line is one safe shell command: the model name stays inside the JSON.
            curl = shlex.split(await page.locator("[data-snippet=curl]").inner_text())
            assert json.loads(curl[curl.index("-d") + 1])["model"] == XSS_MODEL
            await shoot(page, tmp_path, "xss-as-text")
        problems.check()


async def test_markdown_in_answers_is_rendered_safely(redis_url):
    problems = Problems()
    async with running_relay(redis_url) as relay, browser() as chromium:
        page = await new_page(chromium, problems)
        await page.goto(f"{relay.url}/")
        rendered = await page.evaluate("""async () => {
          const { render } = await import('/static/js/markdown.js');
          const out = (text) => render(text).innerHTML;
          return {
            rich: out('# Title\\n\\nSome **bold**, *em* and `code`.\\n\\n- one\\n- two\\n\\n'
                      + '```py\\nprint(1 < 2)\\n```\\n[docs](https://example.org/a?b=1)'),
            hostile: out('<img src=x onerror=alert(1)> **<script>alert(2)</script>** '
                         + '[click](javascript:alert(3)) [data](data:text/html,x) `<b>`'),
          };
        }""")
        rich = rendered["rich"]
        assert "<h3>Title</h3>" in rich and "<strong>bold</strong>" in rich and "<em>em</em>" in rich
        assert "<code>code</code>" in rich and "<li>one</li><li>two</li>" in rich
        assert 'print(1 &lt; 2)' in rich and 'data-lang="py"' in rich
        assert 'href="https://example.org/a?b=1"' in rich and 'rel="noopener noreferrer nofollow"' in rich
        # Inputs that used to overflow the stack or backtrack for seconds: rendered, as text.
        for text in ('>' * 5000 + ' deep', '# a' + ' ' * 4000 + 'b', '**a ' * 50000, 'x\n' + ' ' * 5000 + 'y'):
            assert await page.evaluate("""async (text) => {
              const { render } = await import('/static/js/markdown.js');
              return render(text).textContent.length > 0;
            }""", text)
        headings = await page.evaluate("""async () => {
          const { render } = await import('/static/js/markdown.js');
          return ['# Title ##', '## a #b', '### #', '#nospace'].map((t) => render(t).innerHTML);
        }""")
        assert headings == ["<h3>Title</h3>", "<h4>a #b</h4>", "<h5></h5>", "<p>#nospace</p>"]
        hostile = rendered["hostile"]
        assert "<img" not in hostile and "<script" not in hostile and "<b>" not in hostile
        assert "&lt;img src=x onerror=alert(1)&gt;" in hostile
        assert "javascript:" not in hostile.replace("[click](javascript:alert(3))", "") and "href" not in hostile
        problems.check()


async def test_answers_are_read_as_the_event_stream_rules_say(redis_url):
    """The playground's SSE reader, in the browser: every line ending, split anywhere between reads."""
    problems = Problems()
    async with running_relay(redis_url) as relay, browser() as chromium:
        page = await new_page(chromium, problems)
        await page.goto(f"{relay.url}/")
        result = await page.evaluate("""async () => {
          const { sseEvents, parseAll } = await import('/static/js/sse.js');
          const whole = 'event: x\\r\\ndata: a\\r\\ndata: b\\r\\n\\r\\n: note\\ndata: c\\n\\r\\ndata: d\\r\\r'
                        + 'data:e\\n\\ndata: [DONE]\\n\\n';
          const read = async (pieces) => {
            const body = new ReadableStream({ start(c) {
              for (const p of pieces) c.enqueue(new TextEncoder().encode(p));
              c.close();
            } });
            const out = [];
            for await (const e of sseEvents(body)) out.push(e);
            return JSON.stringify(out);
          };
          const expected = JSON.stringify(parseAll(whole));
          const bad = [];
          for (let i = 0; i <= whole.length; i++) {
            if (await read([whole.slice(0, i), whole.slice(i)]) !== expected) bad.push(i);
          }
          return { expected: JSON.parse(expected), bad, bytewise: await read([...whole]) === expected };
        }""")
        assert result["expected"] == [{"event": "x", "data": "a\nb"}, {"event": "message", "data": "c"},
                                      {"event": "message", "data": "d"}, {"event": "message", "data": "e"},
                                      {"event": "message", "data": "[DONE]"}]
        assert result["bad"] == [] and result["bytewise"]
        problems.check()


async def test_live_status_comes_back_after_the_relay_refused_the_stream(redis_url):
    """EventSource gives up on a 429; the page opens the stream again (backing off) and is live once let in."""
    problems = Problems()
    async with (running_relay(redis_url, watch_interval=0.2, watchers_per_address=1) as relay,
                browser() as chromium):
        instance_id, token = await register(relay, "contested")
        async with running_agent(relay.url, token, DemoBackend(rate=0)):
            first = await new_page(chromium, problems)
            await first.goto(f"{relay.url}/i/{instance_id}")
            await wait_until(lambda: len(relay.services.watch.watchers) == 1, what="the first tab's stream")
            second = await new_page(chromium, problems)
            refused: list[int] = []
            second.on("response", lambda r: refused.append(r.status) if "/events" in r.url else None)
            await second.goto(f"{relay.url}/i/{instance_id}")
            await wait_until(lambda: 429 in refused, what="the second tab refused")
            await first.close()  # its place frees
            await wait_until(lambda: refused.count(200) == 1, 30, what="the second tab let in")
            await expect(second.locator("#instance-status")).to_have_attribute("data-status", "online")
        await expect(second.locator("#instance-status")).to_have_attribute("data-status", "offline", timeout=SOON)
        problems.check()


# -- layout and accessibility ----------------------------------------------------------------------


async def test_phone_layout_has_no_horizontal_scroll(redis_url, tmp_path):
    problems = Problems()
    async with running_relay(redis_url, watch_interval=0.2) as relay, browser() as chromium:
        long_name = "a-very-long-instance-name-without-any-space-" + "x" * 50
        instance_id, token = await register(relay, long_name, "y" * 300)
        async with running_agent(relay.url, token, DemoBackend(rate=0), models=["z" * 120]):
            page = await new_page(chromium, problems, viewport=PHONE, is_mobile=True, has_touch=True)
            await page.goto(f"{relay.url}/")
            await expect(page.locator("li.card")).to_have_count(1)
            await no_horizontal_scroll(page)
            await shoot(page, tmp_path, "directory-phone")

            await page.goto(f"{relay.url}/register")
            await page.get_by_label("Name").fill("phone")
            await page.get_by_role("button", name="Register").click()
            await expect(page.locator("#result")).to_be_visible()
            await no_horizontal_scroll(page)

            await page.evaluate(f"sessionStorage.setItem('owner:{instance_id}', {json.dumps(token)})")
            await page.goto(f"{relay.url}/i/{instance_id}")
            await expect(page.locator("#owner-panel")).to_be_visible()
            await expect(page.locator("#keys-table")).to_be_visible()
            await no_horizontal_scroll(page)
        problems.check()


async def test_keyboard_and_labels(redis_url):
    problems = Problems()
    async with running_relay(redis_url) as relay, browser() as chromium:
        instance_id, _ = await register(relay, "keyboard")
        page = await new_page(chromium, problems)
        for path in ("/", "/register", f"/i/{instance_id}"):
            await page.goto(f"{relay.url}{path}")
            # The first Tab reaches the skip link, which jumps to the content.
            await page.keyboard.press("Tab")
            assert await page.evaluate("document.activeElement.textContent") == "Skip to content"
            # Every visible form control has a label.
            unlabelled = await page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
                .filter((c) => c.offsetParent !== null && !(c.labels && c.labels.length) && !c.ariaLabel)
                .map((c) => c.id || c.outerHTML)""")
            assert unlabelled == [], f"{path}: controls without a label: {unlabelled}"
        # Tab order on the directory: skip link, then navigation, then the search box.
        await page.goto(f"{relay.url}/")
        for _ in range(6):
            await page.keyboard.press("Tab")
            if await page.evaluate("document.activeElement.id") == "q":
                break
        else:
            raise AssertionError("the search box is not reachable with Tab")
        problems.check()
