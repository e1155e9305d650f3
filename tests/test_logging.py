"""Log lines: ``RELAY_LOG_FORMAT=json`` gives one JSON object per line with the
request, instance and node ids; no prompt, token or key above DEBUG."""

from __future__ import annotations

import io
import json
import logging
import signal

import httpx
import pytest

from relay.telemetry import logs
from tests.helpers import free_port, online, running_agent, running_relay, spawn, wait_until
from wire.redaction import REDACTED

pytestmark = pytest.mark.anyio

SECRET_PROMPT = "my-private-prompt-7f3a9c"


@pytest.fixture
def json_log():
    """Route every logger through the relay's JSON handler into a buffer."""
    root = logging.getLogger()
    saved_level = root.level
    buffer = io.StringIO()
    handler = logs.configure("info", "json", buffer)
    yield buffer
    root.removeHandler(handler)
    root.setLevel(saved_level)


def parse(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_line_carries_bound_ids(json_log):
    logs.bind(request_id="req-1", instance_id="inst-1", node_id="node-1")
    try:
        logging.getLogger("relay.test").warning("something %s", "happened")
    finally:
        logs.bind(request_id=None, instance_id=None, node_id=None)
    (line,) = parse(json_log.getvalue())
    assert line["msg"] == "something happened"
    assert line["level"] == "warning" and line["logger"] == "relay.test"
    assert (line["request_id"], line["instance_id"], line["node_id"]) == ("req-1", "inst-1", "node-1")
    assert line["ts"].endswith("Z")


def test_plain_format_shows_ids():
    buffer = io.StringIO()
    handler = logs.make_handler("plain", buffer)
    logger = logging.getLogger("relay.test.plain")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logs.bind(request_id="r9", instance_id="i9", node_id="n9")
        logger.error("boom")
    finally:
        logs.bind(request_id=None, instance_id=None, node_id=None)
        logger.removeHandler(handler)
        logger.propagate = True
    assert "ERROR relay.test.plain [node=n9 req=r9 inst=i9]: boom" in buffer.getvalue()


def test_secrets_are_redacted_above_debug(json_log):
    token = "ira_" + "A1b2C3d4" * 6
    log = logging.getLogger("relay.test.secrets")
    log.warning("agent sent %s", token)
    log.warning("header Authorization: Bearer %s", "sk-" + "z" * 30)
    log.warning("caller key irk_%s", "k" * 30)
    try:
        raise ValueError(f"bad token {token}")
    except ValueError:
        log.exception("failed")
    text = json_log.getvalue()
    assert token not in text and "sk-zzzz" not in text and "irk_kkkk" not in text
    assert text.count(REDACTED) >= 4


async def test_request_lines_carry_ids_in_process(redis_url, json_log):
    async with running_relay(redis_url) as relay:
        instance_id, token = await relay.register()
        node_id = relay.services.node.node_id
        async with running_agent(relay.url, token), relay.client() as client:
            response = await client.post(
                f"/api/chat/{instance_id}/chat/completions",
                json={"messages": [{"role": "user", "content": SECRET_PROMPT}]},
                headers={"X-Request-Id": "trace-abc123"},
            )
            assert response.status_code == 200 and response.headers["x-request-id"] == "trace-abc123"
            await wait_until(lambda: _logged(json_log, "trace-abc123"), what="the access line")
    lines = parse(json_log.getvalue())
    (access,) = [line for line in lines if line["request_id"] == "trace-abc123"]
    assert access["logger"] == "relay.access"
    assert access["msg"].startswith(f"POST /api/chat/{instance_id}/chat/completions 200 ")
    assert access["instance_id"] == instance_id and access["node_id"] == node_id
    connected = [line for line in lines if "connected: instance" in line["msg"]]
    assert connected and connected[0]["instance_id"] == instance_id and connected[0]["node_id"] == node_id
    assert connected[0]["request_id"].startswith("ws-")  # the agent connection's own id
    text = json_log.getvalue()
    assert SECRET_PROMPT not in text and token not in text
    assert "You said" not in text  # nor the answer


async def _logged(buffer: io.StringIO, marker: str) -> bool:
    return marker in buffer.getvalue()


@pytest.mark.slow
async def test_relay_serve_writes_json_lines(redis_url, tmp_path):
    """The real command, as a process: every line it writes is JSON with the ids."""
    port = free_port()
    relay = spawn(["relay.server.cli", "serve", "--port", str(port)],
                  env={"REDIS_URL": redis_url, "RELAY_LOG_FORMAT": "json", "RELAY_DATA_DIR": str(tmp_path)})
    agent = None
    try:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            await wait_until(lambda: _answers(client), timeout=20, what="relay serve to start")
            node_id = (await client.get("/healthz")).json()["node_id"]
            registered = (await client.post("/api/instances", json={"name": "logs"})).json()
            instance_id, token = registered["instance_id"], registered["agent_token"]
            agent = spawn(["agent.cli", "run", "--backend", "demo", "--demo-rate", "0"],
                          env={"AGENT_RELAY_URL": base, "AGENT_TOKEN": token,
                               "AGENT_CREDENTIALS": str(tmp_path / "agent.json")})
            await wait_until(lambda: online(client, instance_id), timeout=20, what="agent online")
            response = await client.post(f"/api/chat/{instance_id}", headers={"X-Request-Id": "proc-42"},
                                         json={"messages": [{"role": "user", "content": SECRET_PROMPT}]})
            assert response.status_code == 200
            bad = await client.post(f"/api/chat/{instance_id}", content=b"{not json")
            assert bad.status_code == 400
            bad_id = bad.headers["x-request-id"]
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            agent.communicate(timeout=10)
        relay.send_signal(signal.SIGTERM)
        output, _ = relay.communicate(timeout=20)
    lines = parse(output.decode())  # every line must parse
    assert lines
    assert all(set(line) >= {"ts", "level", "logger", "msg", "request_id", "instance_id", "node_id"}
               for line in lines)
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's lines too
    assert all(line["node_id"] == node_id for line in lines if line["logger"].startswith("relay."))
    chat = [line for line in lines if line["request_id"] == "proc-42"]
    assert chat and all(line["instance_id"] == instance_id for line in chat)
    failed = [line for line in lines if line["request_id"] == bad_id]
    assert failed and failed[0]["msg"].startswith(f"POST /api/chat/{instance_id} 400")
    connected = [line for line in lines if "connected: instance" in line["msg"]]
    assert connected and connected[0]["instance_id"] == instance_id
    text = output.decode()
    assert SECRET_PROMPT not in text and token not in text


async def _answers(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/readyz")).status_code == 200
    except httpx.TransportError:
        return False


def test_log_format_setting_is_validated(monkeypatch):
    from relay.settings import RelaySettings

    monkeypatch.setenv("RELAY_LOG_FORMAT", "json")
    assert RelaySettings().log_format == "json"
    monkeypatch.setenv("RELAY_LOG_FORMAT", "xml")
    with pytest.raises(ValueError):
        RelaySettings()


def test_uvicorn_incomplete_response_line_is_hidden_only_when_the_relay_ended_it_on_purpose():
    import contextvars

    record = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1,
                               "ASGI callable returned without completing response.", None, None)
    quiet = logs.DeliberateEndings()
    # A response that stopped by accident (the bug this once hid) stays visible...
    assert contextvars.copy_context().run(quiet.filter, record) is True

    def cut_short() -> bool:
        logs.ended_on_purpose()
        return quiet.filter(record)

    # ... one the relay cut short itself (a client that stopped reading) does not.
    assert contextvars.copy_context().run(cut_short) is False


@pytest.mark.parametrize("level", [logging.DEBUG, logging.WARNING])
def test_a_message_is_cut_at_its_bound_whatever_it_quotes(level):
    """A log line quoting something huge (a 4 MB model list, say) is cut, at every level."""
    buffer = io.StringIO()
    root = logging.getLogger()
    saved_level = root.level
    handler = logs.configure("debug", "plain", buffer)
    try:
        logging.getLogger("relay.test").log(level, "agent declared %s", "m" * 4_000_000)
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
    line = buffer.getvalue()
    assert len(line) < logs.MAX_MESSAGE_CHARS + 200
    assert f"[{4_000_000 + len('agent declared ') - logs.MAX_MESSAGE_CHARS} more characters]" in line
