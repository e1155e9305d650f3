"""Keep ``compose.yaml`` and the ``Dockerfile`` honest without a Docker engine.

No container runs here.  Instead the tests read ``compose.yaml`` (PyYAML) and
the ``Dockerfile``, check the structure compose relies on (healthchecks,
``depends_on`` conditions, volumes, the ollama profile), then run each relay
and agent service *as the image would*: the service's ``command`` with the
image's entrypoint semantics (``relay ...`` is ``python -m relay.server.cli ...``,
``relay-agent ...`` is ``python -m agent.cli ...``), the image's ``ENV`` under
the service's ``environment``, with service hostnames mapped to local
addresses (``redis`` -> the test's real Redis, ``relay-N``/``lb`` -> 127.0.0.1
ports, ``/data`` -> a temporary directory).  Healthcheck commands run too.
When nginx is installed, ``deploy/nginx.conf`` itself fronts the two relays
(only its upstream addresses and listen port rewritten); otherwise the
``lb`` address maps straight to ``relay-1``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from relay.store.embedded import find_redis_server
from tests.helpers import (
    FakeUpstream,
    Spawned,
    free_port,
    online,
    running_upstream,
    spawn,
    wait_until,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
ENTRYPOINTS = {"relay": "relay.server.cli", "relay-agent": "agent.cli"}
CHAT = {"messages": [{"role": "user", "content": "hello compose"}]}


# -- reading the files -------------------------------------------------------------


def interpolate(value: Any, env: dict[str, str] | None = None) -> str:
    """Compose's ``${NAME}`` / ``${NAME:-default}`` substitution."""
    env = env or {}

    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(3)
        return env.get(name) or (default if default is not None else "")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-([^}]*))?\}", sub, str(value))


def dockerfile_stages() -> list[list[str]]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    stages: list[list[str]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in dockerfile_stages()[-1]:
        if line.upper().startswith("ENV "):
            for pair in line[4:].split():
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def image_cmd() -> list[str]:
    (cmd,) = [line for line in dockerfile_stages()[-1] if line.upper().startswith("CMD ")]
    return orjson.loads(cmd[4:])


def service_env(name: str) -> dict[str, str]:
    return {k: interpolate(v) for k, v in (SERVICES[name].get("environment") or {}).items()}


def command_of(name: str) -> list[str]:
    return [interpolate(part) for part in SERVICES[name].get("command") or image_cmd()]


# -- running a service locally ---------------------------------------------------


def Service(name: str, argv: list[str], env: dict[str, str]) -> Spawned:
    """One compose service run as a local process (the image's entrypoints mapped to modules)."""
    program, *args = argv
    return Spawned(name, spawn([ENTRYPOINTS[program], *args], env=env))


class LocalCompose:
    """Maps compose hostnames and paths to this machine, and starts services."""

    def __init__(self, redis_url: str, data_dir: Path):
        self.redis_url = redis_url
        self.data_dir = data_dir
        self.ports: dict[str, int] = {}  # service -> local port standing for its :8080
        self.urls: dict[str, str] = {}  # "http://host:port" in compose -> local URL
        self.running: list[Service] = []

    def env_for(self, name: str) -> dict[str, str]:
        env = {**image_env(), **service_env(name)}
        for key, value in env.items():
            if value.startswith("/data"):
                env[key] = str(self.data_dir / name) + value[len("/data"):]
            value = env[key] = self.local(env[key])
            if value.startswith("redis://redis:"):
                env[key] = self.redis_url
        if name in self.ports:
            env["RELAY_HOST"] = "127.0.0.1"  # 0.0.0.0 is for containers; stay on loopback here
            env["RELAY_PORT"] = str(self.ports[name])
        (self.data_dir / name).mkdir(parents=True, exist_ok=True)
        return env

    def local(self, value: str) -> str:
        for theirs, ours in self.urls.items():
            value = value.replace(theirs, ours)
        return value

    def start(self, name: str) -> Service:
        service = Service(name, [self.local(part) for part in command_of(name)], self.env_for(name))
        self.running.append(service)
        return service

    def healthcheck_argv(self, name: str) -> list[str]:
        test = SERVICES[name]["healthcheck"]["test"]
        assert test[0] == "CMD", f"{name}: exec-form healthcheck expected"
        argv = [part.replace("127.0.0.1:8080", f"127.0.0.1:{self.ports.get(name, 8080)}") for part in test[1:]]
        if argv[0] == "python":
            return [sys.executable, *argv[1:]]
        return [sys.executable, "-m", ENTRYPOINTS[argv[0]], *argv[1:]]

    async def healthy(self, name: str) -> bool:
        env = {**os.environ, **self.env_for(name)}
        result = await asyncio.to_thread(subprocess.run, self.healthcheck_argv(name), env=env,
                                         capture_output=True, timeout=30)
        return result.returncode == 0

    def stop_all(self) -> None:
        for service in reversed(self.running):
            service.stop(timeout=20)


def nginx_for(ports: dict[str, int], listen: int, workdir: Path) -> subprocess.Popen | None:
    """deploy/nginx.conf with only upstream addresses, listen port and pid file changed."""
    binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if binary is None:
        return None
    conf = NGINX_CONF.read_text()
    for name, port in ports.items():
        conf = conf.replace(f"server {name}:8080", f"server 127.0.0.1:{port}")
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
    workdir.mkdir(parents=True, exist_ok=True)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / sub).mkdir(exist_ok=True)
    temp_paths = "".join(f"    {kind}_temp_path {workdir / sub};\n" for kind, sub in (
        ("client_body", "body"), ("proxy", "proxy"), ("fastcgi", "fastcgi"), ("uwsgi", "uwsgi"), ("scgi", "scgi")))
    conf = conf.replace("http {\n", "http {\n" + temp_paths, 1)
    path = workdir / "nginx.conf"
    path.write_text(conf)
    return subprocess.Popen([binary, "-p", str(workdir), "-c", str(path), "-e", "stderr",
                             "-g", f"daemon off; pid {workdir / 'nginx.pid'};"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def chat(url: str, instance_id: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await client.post(f"/api/chat/{instance_id}/chat/completions", json=CHAT)


def assert_streamed_answer(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(orjson.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert "hello compose" in text


async def status_of(url: str, instance_id: str) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        return (await client.get(f"/api/instances/{instance_id}")).json()["status"]


# -- structure ---------------------------------------------------------------------


def compose_spec_errors(path: Path) -> subprocess.CompletedProcess:
    """Validate against the Compose Specification's JSON schema (vendored by check-jsonschema)."""
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True, timeout=60)


def test_compose_file_follows_the_compose_specification(tmp_path):
    result = compose_spec_errors(ROOT / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    # The check can fail: a typo'd condition is caught.
    broken = (ROOT / "compose.yaml").read_text().replace("condition: service_healthy", "condition: healthy", 1)
    (tmp_path / "compose.yaml").write_text(broken)
    assert compose_spec_errors(tmp_path / "compose.yaml").returncode != 0


def test_compose_has_the_demo_services():
    assert {"redis", "relay-1", "relay-2", "lb", "agent", "ollama", "agent-ollama"} <= set(SERVICES)
    for name in ("redis", "relay-1", "relay-2", "lb", "agent"):
        assert "profiles" not in SERVICES[name], f"{name} must start with a plain `docker compose up`"
        assert SERVICES[name]["healthcheck"]["test"], f"{name} needs a healthcheck"


def test_redis_is_official_persistent_and_checked():
    redis = SERVICES["redis"]
    assert redis["image"].startswith("redis:")
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command  # AOF: registrations survive a restart
    assert any(v.split(":")[0] in COMPOSE["volumes"] and v.endswith(":/data") for v in redis["volumes"])
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_relays_share_redis_and_wait_for_it():
    for name in ("relay-1", "relay-2"):
        relay = SERVICES[name]
        assert relay["image"] == SERVICES["agent"]["image"]  # one image for both programs
        assert relay["build"] == "."
        assert command_of(name) == ["relay", "serve"]
        assert relay["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        assert relay["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "/readyz" in " ".join(relay["healthcheck"]["test"])
        assert "ports" not in relay  # reachable through the load balancer only


def test_load_balancer_fronts_both_relays():
    lb = SERVICES["lb"]
    assert lb["image"].startswith("nginx:")
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in lb["volumes"]
    assert {name: dep["condition"] for name, dep in lb["depends_on"].items()} == {
        "relay-1": "service_healthy", "relay-2": "service_healthy"}
    assert interpolate(lb["ports"][0]) == "8080:8080"
    conf = NGINX_CONF.read_text()
    for needle in ("server relay-1:8080", "server relay-2:8080", "proxy_buffering off;",
                   "proxy_set_header Upgrade $http_upgrade;", "proxy_set_header Connection $connection_upgrade;",
                   "proxy_http_version 1.1;", "proxy_read_timeout 1h;", "listen 8080;"):
        assert needle in conf, needle


def test_agents_register_through_the_load_balancer_and_keep_credentials():
    volumes = set(COMPOSE["volumes"])
    for name in ("agent", "agent-ollama"):
        agent = SERVICES[name]
        env = service_env(name)
        assert command_of(name)[:2] == ["relay-agent", "run"]
        assert env["AGENT_RELAY_URL"] == "http://lb:8080"
        assert env["AGENT_CREDENTIALS"].startswith("/data/")
        assert any(v.split(":")[0] in volumes and v.endswith(":/data") for v in agent["volumes"])
        assert agent["depends_on"]["lb"]["condition"] == "service_healthy"
        assert agent["healthcheck"]["test"] == ["CMD", "relay-agent", "status"]
    assert service_env("agent")["AGENT_CREDENTIALS"] != service_env("agent-ollama")["AGENT_CREDENTIALS"]
    assert command_of("agent") == ["relay-agent", "run", "--backend", "demo"]


def test_ollama_profile():
    for name in ("ollama", "ollama-pull", "agent-ollama"):
        assert SERVICES[name]["profiles"] == ["ollama"]
    assert SERVICES["ollama"]["image"].startswith("ollama/ollama")
    assert command_of("agent-ollama") == [
        "relay-agent", "run", "--backend", "openai", "--upstream-url", "http://ollama:11434/v1"]
    assert SERVICES["agent-ollama"]["depends_on"]["ollama-pull"]["condition"] == "service_completed_successfully"
    assert SERVICES["ollama-pull"]["depends_on"]["ollama"]["condition"] == "service_healthy"
    assert service_env("agent-ollama")["AGENT_MODEL"] == command_of("ollama-pull")[1] == "llama3.2:1b"


def test_every_setting_named_in_compose_exists():
    from agent.settings import AgentSettings
    from relay.settings import RelaySettings

    relay_fields = {f.upper() for f in RelaySettings.model_fields}
    agent_fields = {f.upper() for f in AgentSettings.model_fields}
    for name, service in SERVICES.items():
        for key in service.get("environment") or {}:
            if key.startswith("RELAY_"):
                assert key[6:] in relay_fields, f"{name}: unknown setting {key}"
            elif key.startswith("AGENT_"):
                assert key[6:] in agent_fields, f"{name}: unknown setting {key}"
    for key in image_env():
        if key.startswith("RELAY_"):
            assert key[6:] in relay_fields, key
        elif key.startswith("AGENT_"):
            assert key[6:] in agent_fields, key


def test_dockerfile_is_multi_stage_slim_and_unprivileged():
    stages = dockerfile_stages()
    assert len(stages) >= 2
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE, re.M))
    def base(stage):
        return stages[stage][0].split()[1].replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", ""))
    assert base(0) == base(-1) == "python:3.11-slim"
    builder, final = " ".join(stages[0]), " ".join(stages[-1])
    assert "pip wheel" in builder and "build-essential" in builder
    for tool in ("build-essential", "gcc", "apt-get install"):
        assert tool not in final, f"no build tools in the final image: {tool}"
    assert "--no-index" in final  # installs the builder's wheels, nothing else
    (user,) = [line.split()[1] for line in stages[-1] if line.startswith("USER ")]
    assert user not in ("root", "0")
    assert image_cmd() == ["relay", "serve"]
    assert not any(line.startswith("ENTRYPOINT") for line in stages[-1])  # command override runs the agent
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and "tests" in ignored


# -- the services, run -------------------------------------------------------------


async def test_compose_services_run_and_chat(redis_url, tmp_path):
    """redis -> relay-1 + relay-2 -> lb -> agent, with compose's commands and environment."""
    local = LocalCompose(redis_url, tmp_path)
    local.ports = {"relay-1": free_port(), "relay-2": free_port()}
    nginx = None
    try:
        relays = [local.start(name) for name in ("relay-1", "relay-2")]
        for name in ("relay-1", "relay-2"):
            await wait_until(lambda: local.healthy(name), timeout=30, interval=0.3, what=f"{name} healthcheck")
        relay_1, relay_2 = (f"http://127.0.0.1:{local.ports[n]}" for n in ("relay-1", "relay-2"))

        lb_port = free_port()
        nginx = nginx_for({"relay-1": local.ports["relay-1"], "relay-2": local.ports["relay-2"]}, lb_port,
                          tmp_path / "nginx")
        lb = f"http://127.0.0.1:{lb_port}" if nginx else relay_1
        local.urls = {"http://lb:8080": lb}
        if nginx:
            async def lb_up() -> bool:
                try:
                    async with httpx.AsyncClient(timeout=2) as client:
                        return (await client.get(f"{lb}/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(lb_up, timeout=15, what="nginx")

        # First start: the agent registers and prints its chat URL.
        agent = local.start("agent")
        instance_id = (await agent.wait_for_line(r"registered instance ([0-9a-f]+)")).group(1)
        chat_url = (await agent.wait_for_line(r"chat URL: (\S+)")).group(1)
        public = interpolate(SERVICES["relay-1"]["environment"]["RELAY_PUBLIC_URL"])
        assert chat_url == f"{public}/api/chat/{instance_id}"
        await agent.wait_for_line(r"connected to .* as instance " + instance_id)
        await wait_until(lambda: local.healthy("agent"), timeout=20, interval=0.3, what="agent healthcheck")

        # Through each node (one of them forwards to the other) and the balancer.
        for url in (relay_1, relay_2, lb):
            assert_streamed_answer(await chat(url, instance_id))
        if nginx:
            response = await chat(lb, instance_id)
            assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])  # nginx's $request_id
            async with httpx.AsyncClient(timeout=5) as client:
                assert (await client.get(f"{lb}/metrics")).status_code == 404  # not public
        async with httpx.AsyncClient(timeout=5) as client:
            scraped = [(await client.get(f"{url}/metrics")).text for url in (relay_1, relay_2)]
        assert any(re.search(r'relay_crossnode_forwards_total\{direction="out"\} [1-9]', s) for s in scraped)

        # Restart: the credentials on the volume bring back the same instance.
        agent.stop()
        agent = local.start("agent")
        await agent.wait_for_line(r"connected to .* as instance " + instance_id)
        assert "registered instance" not in agent.output
        await wait_until(lambda: online(relay_2, instance_id), timeout=15, what="online again")
    finally:
        local.stop_all()
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
    # compose sets RELAY_LOG_FORMAT=json: every line the relays wrote is one JSON object.
    for relay in relays:
        lines = [orjson.loads(line) for line in relay.lines if line.strip()]
        assert any(line["logger"] == "relay.access" for line in lines)


async def test_ollama_profile_agent_runs_against_an_openai_upstream(redis_url, tmp_path):
    """agent-ollama's command, with http://ollama:11434/v1 played by a fake OpenAI server."""
    upstream = FakeUpstream(echo=True, model=service_env("agent-ollama")["AGENT_MODEL"])
    async with running_upstream(upstream):
        local = LocalCompose(redis_url, tmp_path)
        local.ports = {"relay-1": free_port()}
        try:
            local.start("relay-1")
            await wait_until(lambda: local.healthy("relay-1"), timeout=30, interval=0.3, what="relay-1")
            relay_1 = f"http://127.0.0.1:{local.ports['relay-1']}"
            local.urls = {"http://lb:8080": relay_1, "http://ollama:11434/v1": upstream.url}
            agent = local.start("agent-ollama")
            instance_id = (await agent.wait_for_line(r"registered instance ([0-9a-f]+)")).group(1)
            await agent.wait_for_line(r"connected to .* as instance " + instance_id)
            response = await chat(relay_1, instance_id)
            assert_streamed_answer(response)
            assert upstream.requests[-1]["model"] == "llama3.2:1b"
            async with httpx.AsyncClient(base_url=relay_1, timeout=10) as client:
                models = (await client.get(f"/api/chat/{instance_id}/models")).json()
            assert [m["id"] for m in models["data"]] == ["llama3.2:1b"]
        finally:
            local.stop_all()


def test_redis_service_command_runs_with_the_same_server(tmp_path):
    """compose's redis command line, on the redis-server the relay embeds; then its healthcheck."""
    binary = find_redis_server()
    cli = Path(binary).with_name("redis-cli")
    args = list(SERVICES["redis"]["command"][1:])
    port = free_port()
    proc = subprocess.Popen([binary, *args, "--port", str(port), "--dir", str(tmp_path), "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis as redis_sync

        client = redis_sync.Redis(port=port)
        deadline = 50
        while deadline:
            try:
                client.ping()
                break
            except redis_sync.ConnectionError:
                deadline -= 1
                threading.Event().wait(0.1)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("appendfsync")["appendfsync"] == "everysec"
        if cli.exists():
            health = SERVICES["redis"]["healthcheck"]["test"][2:]
            result = subprocess.run([str(cli), "-p", str(port), *health], capture_output=True, timeout=10)
            assert result.stdout.strip() == b"PONG"
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
