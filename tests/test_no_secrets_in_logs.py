"""No token or key in any log line, DEBUG included, on either side.

An end-to-end run exercises every credential the relay knows (registration
key, agent tokens before and after rotation, caller keys, wrong ones) with the
relay's loggers, uvicorn's and websockets' all at DEBUG — websockets logs
every handshake header there — plus an agent subprocess run with ``-v``.
Then every captured line is searched for every secret.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.helpers import offline, online, running_agent, running_relay, spawn, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


#: The test's own HTTP client plays the third-party caller: its log (which
#: prints the URL it was told to call, credential included) is not the relay's.
CALLER_LOGGERS = ("httpx", "httpcore")


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(CALLER_LOGGERS):
            return
        self.lines.append(f"{record.name} {record.getMessage()} {self.format(record) if record.exc_info else ''}")


@pytest.fixture
def capture(caplog):
    caplog.set_level(logging.DEBUG)
    handler = Capture()
    # uvicorn's own loggers do not propagate to the root: listen to them too.
    targets = [logging.getLogger(), logging.getLogger("uvicorn"), logging.getLogger("uvicorn.access")]
    for logger in targets:
        logger.addHandler(handler)
    yield handler, caplog
    for logger in targets:
        logger.removeHandler(handler)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_no_secret_in_any_log_line(redis_url, capture, tmp_path):
    handler, caplog = capture
    secrets: list[str] = ["reg-key-Zq81nP0x"]
    chat = {"messages": [{"role": "user", "content": "hello"}], "stream": False}
    async with running_relay(redis_url, registration_key=secrets[0], log_level="debug") as relay, \
            relay.client() as client:
        logging.getLogger("websockets").setLevel(logging.DEBUG)
        await client.post("/api/instances", json={"name": "x"}, headers=bearer("reg-key-wrong-guess"))
        secrets.append("reg-key-wrong-guess")
        registered = (await client.post("/api/instances", json={"name": "x"}, headers=bearer(secrets[0]))).json()
        instance_id, token = registered["instance_id"], registered["agent_token"]
        secrets.append(token)
        async with running_agent(relay.url, token):
            await client.patch(f"/api/instances/{instance_id}", headers=bearer(token), json={"visibility": "private"})
            key = (await client.post(f"/api/instances/{instance_id}/keys", headers=bearer(token),
                                     json={"name": "k"})).json()
            secrets.append(key["key"])
            answered = await client.post(f"/api/chat/{instance_id}", json=chat, headers=bearer(key["key"]))
            assert answered.status_code == 200
            wrong_key = "irk_" + "W" * 43
            secrets.append(wrong_key)
            await client.post(f"/api/chat/{instance_id}", json=chat, headers=bearer(wrong_key))
            await client.post(f"/api/chat/{instance_id}?api_key={key['key']}", json=chat)
            await client.delete(f"/api/instances/{instance_id}/keys/{key['key_id']}", headers=bearer(token))
            await client.post(f"/api/chat/{instance_id}", json=chat, headers=bearer(key["key"]))
            rotated = await client.post(f"/api/instances/{instance_id}/token", headers=bearer(token))
            new = rotated.json()["agent_token"]
            secrets.append(new)
            await wait_until(lambda: offline(client, instance_id), what="old agent closed")

        # An agent process at -v (DEBUG), with the new token in its environment.
        process = spawn(["agent.cli", "run", "-v", "--relay-url", relay.url, "--backend", "demo"],
                        env={"AGENT_TOKEN": new, "AGENT_CREDENTIALS": str(tmp_path / "creds.json")})
        try:
            await wait_until(lambda: online(client, instance_id), timeout=30, what="agent subprocess online")
            await client.patch(f"/api/instances/{instance_id}", headers=bearer(new), json={"visibility": "public"})
            assert (await client.post(f"/api/chat/{instance_id}", json=chat)).status_code == 200
            await client.delete(f"/api/instances/{instance_id}", headers=bearer(new))
        finally:
            process.terminate()
            output, _ = await asyncio.to_thread(process.communicate, timeout=15)
        agent_output = output.decode(errors="replace")

    relay_side = [r for r in caplog.records if not r.name.startswith(CALLER_LOGGERS)]
    everything = "\n".join(handler.lines + [logging.Formatter().format(r) for r in relay_side]) + "\n" + agent_output
    # The capture really saw the dangerous lines: websockets' handshake headers, redacted.
    assert "authorization: [redacted]" in everything.lower()
    assert "relay-agent" in agent_output and "[redacted]" in agent_output
    for secret in secrets:
        assert secret not in everything, f"a credential ({secret[:6]}...) reached the logs"



