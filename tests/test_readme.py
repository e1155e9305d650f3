"""The README's examples run against a real relay, so the docs cannot drift.

Every ``curl`` command in a ```` ```bash ```` block of README.md is executed
with the real curl, in document order (deletions last), against a running
relay with a connected demo agent: the host is replaced by the test relay's,
``$INSTANCE_ID`` and ``$AGENT_TOKEN`` are set.  As a reader would, the test
keeps what an example hands back for the next ones: a new caller key
(``$API_KEY``, ``$KEY_ID``), a rotated agent token (``$AGENT_TOKEN``), a Dify
conversation and message (``$CONVERSATION_ID``, ``$MESSAGE_ID``).  A
``# → 404 instance_not_found`` comment under a command states the status (and
error code) it must answer; without one, any 2xx will do.  The API and
configuration tables are checked against the routes and settings that exist.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.settings import AgentSettings
from relay.settings import RelaySettings
from tests.helpers import running_agent, running_relay

pytestmark = pytest.mark.anyio

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
HOST = re.compile(r"http://127\.0\.0\.1:\d+")
EXPECT = re.compile(r"^#\s*→\s*(\d{3})(?:\s+([a-z]+_[a-z_]+)\b)?")
STATUS_MARK = "@@status="


@dataclass
class Example:
    command: str
    status: int | None
    code: str | None
    line: int

    @property
    def deletes(self) -> bool:
        return "-X DELETE" in self.command and "Authorization" in self.command


def bash_blocks(text: str) -> list[tuple[int, list[str]]]:
    blocks, current, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if current is None and line.strip() == "```bash":
            current, start = [], number + 1
        elif current is not None and line.strip() == "```":
            blocks.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def curl_examples(text: str = README) -> list[Example]:
    examples = []
    for start, lines in bash_blocks(text):
        i = 0
        while i < len(lines):
            first = i
            command = lines[i]
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            i += 1
            if command.lstrip().startswith("#") or not re.search(r"(^|[|;&(]\s*)curl\s", command.strip()):
                continue
            status = code = None
            if i < len(lines) and (match := EXPECT.match(lines[i].strip())):
                status, code = int(match.group(1)), match.group(2)
            examples.append(Example(command.strip(), status, code, start + first))
    return examples


def test_examples_are_found():
    examples = curl_examples()
    assert len(examples) >= 15
    assert any(e.status == 404 for e in examples) and any(e.deletes for e in examples)


def test_every_http_endpoint_has_a_curl_example():
    rows = re.findall(r"^\| `(GET|POST|DELETE|PATCH|PUT) (/[^`]*)`", README, re.M)
    assert len(rows) >= 9
    commands = [e.command for e in curl_examples()]
    for method, path in rows:
        if path == "/api/agent/connect":
            continue  # a websocket: the agent's, not curl's
        segment = r"[^/\s'\"?]+"
        pattern = re.sub(r"\\\{[a-z_]+\\\}", lambda _: segment, re.escape(path.split("?")[0]))
        regex = re.compile(r"http://127\.0\.0\.1:\d+" + pattern + r"(?:['\"?\s]|$)")

        def uses_method(command: str) -> bool:
            if method == "GET":
                return " -X " not in command and " -d " not in command
            if method == "POST":
                return " -d " in command or "-X POST" in command
            return f"-X {method}" in command

        assert any(regex.search(c) and uses_method(c) for c in commands), f"no curl example for {method} {path}"


def test_configuration_table_lists_every_setting():
    for cls, prefix in ((RelaySettings, "RELAY_"), (AgentSettings, "AGENT_")):
        for name in cls.model_fields:
            assert f"`{prefix}{name.upper()}`" in README, f"README's configuration table lacks {prefix}{name.upper()}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl command")
async def test_readme_curl_examples_run(redis_url):
    examples = curl_examples()
    ordered = [e for e in examples if not e.deletes] + [e for e in examples if e.deletes]
    async with running_relay(redis_url) as relay:
        instance_id, token = await relay.register("readme")
        async with running_agent(relay.url, token):
            env = {**os.environ, "INSTANCE_ID": instance_id, "AGENT_TOKEN": token}
            for example in ordered:
                status, output = await run_curl(example.command, relay.url, env)
                where = f"README.md line {example.line}: {example.command}\n{output}"
                if example.status is not None:
                    assert status == example.status, where
                else:
                    assert 200 <= status < 300, where
                if example.code is not None:
                    assert f'"code":"{example.code}"' in output.replace(" ", ""), where
                # The per-instance URL streams unless told not to; /v1 only when told to.
                command = example.command
                streamed = ('"stream": true' in command or ("/api/chat/" in command and "/chat/completions" in command
                            and '"stream": false' not in command))
                if streamed and status == 200:
                    assert output.rstrip().endswith("data: [DONE]"), where
                env.update(handed_back(example.command, output))
            async with relay.client() as client:
                gone = await client.get(f"/api/instances/{instance_id}")
    assert gone.status_code == 404  # the README's delete example really deleted it


def handed_back(command: str, output: str) -> dict[str, str]:
    """Values an example returns that later examples use, as a reader would copy them."""
    try:
        body = json.loads(output)
    except ValueError:
        return {}
    if not isinstance(body, dict):
        return {}
    if re.search(r"-X POST \S+/keys\b", command) and "key" in body:
        return {"API_KEY": body["key"], "KEY_ID": body["key_id"]}
    if re.search(r"-X POST \S+/token\b", command) and "agent_token" in body:
        return {"AGENT_TOKEN": body["agent_token"]}
    if "/chat-messages" in command and "conversation_id" in body:
        return {"CONVERSATION_ID": body["conversation_id"], "MESSAGE_ID": body["message_id"]}
    return {}


async def run_curl(command: str, base_url: str, env: dict[str, str]) -> tuple[int, str]:
    script = (
        # The status goes after the body on its own line; the command itself is run verbatim.
        f"curl() {{ command curl --max-time 30 -w '\\n{STATUS_MARK}%{{http_code}}\\n' \"$@\"; }}\n"
        + HOST.sub(base_url, command)
    )
    proc = await asyncio.create_subprocess_exec("bash", "-c", script, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"curl failed ({proc.returncode}): {command}\n{text}{err.decode(errors='replace')}"
    body, _, status = text.rpartition(STATUS_MARK)
    return int(status.strip()), body.rstrip()
