"""The benchmark runner: every path side by side, in one run, with real processes.

    python -m bench            # the full run (a few minutes on 2 cores)
    python -m bench --quick    # tiny counts, ~15 s: checks the plumbing, not the figures

It starts a real Redis (``relay.store.embedded``), the fake upstream
(``bench.upstream``), two ``relay serve`` nodes (A and B), and two
``relay-agent run --backend openai`` agents (one on each node), then measures:

* ``direct``        load generator -> upstream
* ``nginx``         load generator -> nginx (proxy_buffering off) -> upstream, when nginx is installed
* ``relay``         load generator -> node A -> agent (on A) -> upstream
* ``relay-2node``   load generator -> node A -> node B -> agent (on B) -> upstream;
                    reported as unsupported if node A answers 503

and then, on a fresh node C with nothing else running, thousands of idle
agents (``bench.agents``).  Output: a table on stdout, ``bench/results/<stamp>.json``
and ``bench/results/<stamp>.png``.  See ``bench/README.md`` for how to read them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench import clusterphase, realmodel
from bench import loadgen as lg
from bench.procs import (
    CpuWindow,
    Proc,
    ProcessGroup,
    connector_command,
    console_script,
    free_port,
    nginx_binary,
    nginx_config,
    raise_fd_limit,
    rss_bytes,
)
from bench.profile import Profiler, format_summary, summarize

RESULTS = Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"
CHAT = "/v1/chat/completions"

PATH_ORDER = ["direct", "nginx", "relay", "relay-2node"]
# Relay settings that cap one caller, one instance or one agent (names as in relay/settings.py).
LIMITS = ["MAX_STREAMS_PER_INSTANCE", "MAX_STREAMS_PER_CALLER", "RATE_PER_CALLER", "RATE_PER_INSTANCE",
          "RATE_REGISTER_PER_IP", "AGENT_FRAMES_PER_SECOND", "AGENT_BYTES_PER_SECOND"]
PHASES = ["ttfc", "one_stream", "concurrent", "cpu", "idle"]  # plus "profile" with --profile
# Only when asked: real_model (bench/realmodel.py), cluster (bench/clusterphase.py).
OPTIONAL_PHASES = ["profile", "real_model", "cluster"]
LABELS = {
    "direct": "direct",
    "nginx": "nginx",
    "relay": "relay 1 node",
    "relay-2node": "relay 2 nodes",
    "direct-httpx": "direct, httpx client",
}


@dataclass
class Options:
    quick: bool = False
    ttfc_requests: int = 300
    ttfc_warmup: int = 30
    ttfc_chunks: int = 5
    one_stream_chunks: int = 100_000
    concurrency: list[int] = field(default_factory=lambda: [1000])
    chunks_per_stream: int = 100
    rate: float = 20.0
    ramp: float = 1.0
    relay_env: dict[str, str] = field(default_factory=dict)  # extra RELAY_* settings for every relay node
    hog: int = 0  # busy-looping processes beside the concurrent phase (a heavier load generator's share)
    cpu_streams: int = 50
    cpu_chunks: int = 400
    cpu_rate: float = 100.0
    sizes: list[int] = field(default_factory=lambda: [16, 2048])
    idle_agents: list[int] = field(default_factory=lambda: [1000, 5000, 10000])
    heartbeat_interval: float = 5.0
    idle_intervals: int = 3
    nginx: bool = True
    httpx: bool = True
    profile: bool = False
    paths: list[str] = field(default_factory=lambda: list(PATH_ORDER))
    output: Path = RESULTS
    plot: bool = True
    settle: float = 0.5  # seconds of quiet between scenarios
    phases: list[str] = field(default_factory=lambda: list(PHASES))
    native: bool = False  # py-spy --native: see into C (uvloop, httptools) too
    real_model: dict[str, Any] = field(default_factory=dict)  # bench/realmodel.py settings
    cluster: dict[str, Any] = field(default_factory=dict)  # bench/clusterphase.py settings


QUICK = dict(
    ttfc_requests=20, ttfc_warmup=3, one_stream_chunks=2000, concurrency=[20], chunks_per_stream=10, rate=50.0,
    ramp=0.2, cpu_streams=4, cpu_chunks=50, cpu_rate=200.0, idle_agents=[20, 50], heartbeat_interval=0.5,
    idle_intervals=2,
)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _dist(values: list[float]) -> dict:
    """Summary of a list of seconds, in milliseconds."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": _ms(lg.percentile(values, 50)),
        "p90": _ms(lg.percentile(values, 90)),
        "p99": _ms(lg.percentile(values, 99)),
        "max": _ms(max(values)),
        "mean": _ms(sum(values) / len(values)),
    }


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


class Bench:
    """One run.  ``await Bench(options).run()`` returns the results dict."""

    def __init__(self, options: Options):
        self.o = options
        self.work = Path(tempfile.mkdtemp(prefix="relay-bench-"))
        self.group = ProcessGroup(self.work)
        self.redis = None
        self.procs: dict[str, Proc] = {}
        self.ports: dict[str, int] = {}
        self.paths: dict[str, tuple[int, str]] = {}  # name -> (port, request path)
        self.unsupported: dict[str, str] = {}
        self.results: dict[str, Any] = {}
        self.raw: dict[str, Any] = {"ttfc": {}, "excess": {}}  # distributions for the plot
        self.t_start = time.perf_counter()
        self.restart: dict[str, Any] = {}  # name -> starts it again on a fresh port

    def say(self, line: str) -> None:
        print(f"[bench {time.perf_counter() - self.t_start:6.1f}s] {line}", file=sys.stderr, flush=True)

    # -- orchestration ------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        from relay.store.embedded import EmbeddedRedis

        fds = raise_fd_limit()
        t0 = time.perf_counter()
        self.results["meta"] = self.meta(fds)
        self.results["options"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.o).items()}
        try:
            phases = self.o.phases
            if "cluster" in phases:  # first, with its own Redis Cluster and processes, alone on the machine
                await clusterphase.run_phase(self)
            if not set(phases) - {"cluster"}:
                return self.finish(t0)
            self.redis = EmbeddedRedis(self.work / "redis", persist=False).start()
            await self.start_streaming_stack()
            if "ttfc" in phases:
                await self.phase_ttfc()
                await self.phase_redis_per_request()
            if "one_stream" in phases:
                await self.phase_one_stream()
            if "concurrent" in phases:
                await self.phase_concurrent()
            if "cpu" in phases:
                await self.phase_cpu_per_chunk()
            if "real_model" in phases:
                await realmodel.run_phase(self)
            if "profile" in phases:
                await self.phase_profile()
            if "idle" in phases and self.o.idle_agents:
                await self.phase_idle_agents()
        except BaseException:
            for proc in list(self.group.procs):
                if not proc.alive():
                    self.say(f"{proc.name} exited with {proc.popen.returncode}; log tail:\n{proc.tail()}")
            raise
        finally:
            self.group.stop_all()
            if self.redis is not None:
                self.redis.stop()
            shutil.rmtree(self.work, ignore_errors=True)
        return self.finish(t0)

    def finish(self, t0: float) -> dict[str, Any]:
        self.results["targets"] = evaluate_targets(self.results)
        self.results["meta"]["duration_s"] = round(time.perf_counter() - t0, 1)
        return self.results

    def meta(self, fds: int) -> dict:
        import importlib.metadata as md

        def version(name: str) -> str | None:
            try:
                return md.version(name)
            except md.PackageNotFoundError:
                return None

        cpu = "unknown"
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        from bench._loop import loop_name

        def git(*args: str) -> str | None:
            try:
                return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                                      text=True, timeout=10).stdout.strip() or None
            except (OSError, subprocess.SubprocessError):
                return None

        dirty = git("status", "--porcelain", "--", "relay", "agent")
        return {
            "commit": git("rev-parse", "--short", "HEAD"),
            "relay_or_agent_modified": bool(dirty),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "cores": os.cpu_count(),
            "cpu": cpu,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadgen_loop": loop_name(),
            "fd_limit": fds,
            "versions": {n: version(n) for n in ("instance-relay", "uvicorn", "uvloop", "httptools", "websockets",
                                                  "starlette", "redis", "orjson", "httpx")},
            "nginx": nginx_binary() if self.o.nginx else None,
        }

    async def sample_lag(self, out: list[float], relay: str = "relay_a", every: float = 0.25) -> None:
        """A relay's event-loop lag (``relay_event_loop_lag_seconds``, what RELAY_SHED_LAG is compared
        with), read from its /metrics every ``every`` seconds until cancelled."""
        while True:
            with contextlib.suppress(OSError, lg.LoadgenError, ValueError):
                async with lg.HTTPConnection(HOST, self.ports[relay]) as conn:
                    result = await conn.request("GET", "/metrics")
                for line in result.body.decode(errors="replace").splitlines():
                    if line.startswith("relay_event_loop_lag_seconds "):
                        out.append(float(line.split()[1]))
            await asyncio.sleep(every)

    def log_sizes(self) -> dict[str, int]:
        """Where each relay's log ends now (``warnings_since`` reads what comes after)."""
        out = {}
        for name in ("relay_a", "relay_b"):
            proc = self.procs.get(name)
            if proc is not None:
                with contextlib.suppress(OSError):
                    out[name] = proc.log.stat().st_size
        return out

    def warnings_since(self, sizes: dict[str, int]) -> dict[str, Any]:
        """The WARNING (and worse) lines each relay logged since ``sizes``: count and a few samples."""
        out: dict[str, Any] = {}
        for name, start in sizes.items():
            try:
                with open(self.procs[name].log, "rb") as f:
                    f.seek(start)
                    lines = f.read().decode(errors="replace").splitlines()
            except (OSError, KeyError):
                continue
            bad = [line for line in lines if any(w in line for w in ("WARNING", "ERROR", "CRITICAL"))]
            out[name] = {"count": len(bad), "samples": [line[:300] for line in bad[:5]]}
        return out

    def relay_env(self) -> dict[str, str]:
        return {
            "RELAY_HEARTBEAT_INTERVAL": str(self.o.heartbeat_interval),
            "RELAY_HEARTBEAT_TIMEOUT": str(max(3 * self.o.heartbeat_interval, 1.5)),
            "RELAY_DRAIN_TIMEOUT": "2",
            "RELAY_FIRST_CHUNK_TIMEOUT": "60",
            # Abuse limits would (rightly) stop a load generator on one address;
            # set them out of reach rather than to 0, so their per-request cost
            # (Redis counters) is still part of what is measured.
            **{f"RELAY_{name}": str(10**9) for name in LIMITS},
            **self.o.relay_env,
        }

    def start_relay(self, name: str, redis_url: str | None = None) -> Proc:
        """``relay serve`` on a free port, on the run's Redis or on ``redis_url``."""
        port = free_port()
        self.ports[name] = port
        self.restart[name] = lambda: self.start_relay(name, redis_url)
        proc = self.group.start(
            name,
            [
                *console_script("relay", "relay.server.cli"),
                "serve", "--host", HOST, "--port", str(port), "--redis-url", redis_url or self.redis.url,
                "--data-dir", str(self.work / name), "--log-level", "warning",
            ],
            env=self.relay_env(),
        )
        self.procs[name] = proc
        return proc

    def start_agent(self, name: str, relay: str, token: str, concurrency: int) -> Proc:
        proc = self.group.start(
            name,
            [
                *console_script("relay-agent", "agent.cli"),
                "run", "--relay-url", f"http://{HOST}:{self.ports[relay]}", "--token", token,
                "--backend", "openai", "--upstream-url", f"http://{HOST}:{self.ports['upstream']}/v1",
                "--model", "bench", "--max-concurrency", str(concurrency),
            ],
            env={"AGENT_CREDENTIALS": str(self.work / f"{name}.json")},
        )
        self.procs[name] = proc
        return proc

    async def wait_http(self, name: str, path: str = "/healthz", timeout: float = 30.0) -> None:
        proc, port = self.procs[name], self.ports[name]
        deadline = time.monotonic() + timeout
        retries = 3
        while True:
            with contextlib.suppress(OSError, lg.LoadgenError):
                status, _ = await lg.get_json(HOST, port, path)
                if status == 200:
                    return
            if not proc.alive():
                # free_port() is a check-then-use race with anything else on this
                # machine: on "address already in use", start again on another port.
                if retries and "already in use" in proc.tail() and name in self.restart:
                    retries -= 1
                    self.say(f"{name}: port {port} was taken meanwhile; retrying on another port")
                    self.group.stop(proc)
                    proc = self.restart[name]()
                    port = self.ports[name]
                    continue
                raise RuntimeError(f"{name} exited ({proc.popen.returncode}):\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not answering {path} after {timeout}s:\n{proc.tail()}")
            await asyncio.sleep(0.05)

    async def wait_online(self, relay: str, instance_id: str, agent: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            status, view = await lg.get_json(HOST, self.ports[relay], f"/api/instances/{instance_id}")
            if status == 200 and isinstance(view, dict) and view.get("status") == "online":
                return
            if not self.procs[agent].alive():
                raise RuntimeError(f"{agent} exited:\n{self.procs[agent].tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{agent} never came online:\n{self.procs[agent].tail()}")
            await asyncio.sleep(0.05)

    async def register(self, relay: str, name: str) -> tuple[str, str]:
        status, body = await lg.post_json(HOST, self.ports[relay], "/api/instances", {"name": name})
        if status != 201 or not isinstance(body, dict):
            raise RuntimeError(f"registration failed: {status} {body}")
        return body["instance_id"], body["agent_token"]

    def start_upstream(self) -> Proc:
        """The fake upstream (``bench/upstream.py``) on a free port, as ``upstream``."""
        self.restart["upstream"] = self.start_upstream
        self.ports["upstream"] = free_port()
        self.procs["upstream"] = self.group.start(
            "upstream", [sys.executable, "-m", "bench.upstream", "--port", str(self.ports["upstream"])]
        )
        return self.procs["upstream"]

    async def start_streaming_stack(self) -> None:
        self.say(f"work dir {self.work}")
        self.start_upstream()
        want = set(self.o.paths)
        need_b = "relay-2node" in want
        self.start_relay("relay_a")
        if need_b:
            self.start_relay("relay_b")
        await self.wait_http("upstream", "/v1/models")
        up_port = self.ports["upstream"]
        if self.o.nginx and "nginx" in want:
            binary = nginx_binary()
            if binary is None:
                self.unsupported["nginx"] = "nginx not installed"
            else:

                def start_nginx() -> Proc:
                    self.ports["nginx"] = free_port()
                    conf = nginx_config(self.work, self.ports["nginx"], up_port)
                    self.procs["nginx"] = self.group.start(
                        "nginx", [binary, "-c", str(conf), "-p", str(conf.parent), "-e", str(conf.parent / "error.log")]
                    )
                    return self.procs["nginx"]

                self.restart["nginx"] = start_nginx
                start_nginx()
        elif "nginx" in want:
            self.unsupported["nginx"] = "disabled (--no-nginx)"
        await self.wait_http("relay_a")
        if need_b:
            await self.wait_http("relay_b")
        concurrency = max([*self.o.concurrency, self.o.cpu_streams, 8]) + 16
        inst_a, token_a = await self.register("relay_a", "bench-a")
        self.start_agent("agent_a", "relay_a", token_a, concurrency)
        if need_b:
            inst_b, token_b = await self.register("relay_a", "bench-b")
            self.start_agent("agent_b", "relay_b", token_b, concurrency)
        await self.wait_online("relay_a", inst_a, "agent_a")
        if need_b:
            await self.wait_online("relay_a", inst_b, "agent_b")

        self.paths["direct"] = (up_port, CHAT)
        if "nginx" in self.ports:
            await self.wait_http("nginx", "/v1/models")
            self.paths["nginx"] = (self.ports["nginx"], CHAT)
        self.paths["relay"] = (self.ports["relay_a"], f"/api/chat/{inst_a}/chat/completions")
        if need_b:
            self.paths["relay-2node"] = (self.ports["relay_a"], f"/api/chat/{inst_b}/chat/completions")
        self.paths = {k: v for k, v in self.paths.items() if k in want or k == "direct"}
        # Probe each path once; a cross-node request that gets 503 means routing is not there yet.
        for name, (port, path) in list(self.paths.items()):
            async with lg.HTTPConnection(HOST, port) as conn:
                result = await conn.request("POST", path, lg.chat_body(3))
            if not result.ok:
                reason = f"probe answered {result.status}: {result.error}"
                if name == "relay-2node" and result.status == 503:
                    reason = f"unsupported: node A answered 503 ({result.error})"
                self.unsupported[name] = reason
                del self.paths[name]
                self.say(f"path {name} skipped: {reason}")
        self.results["paths"] = {
            name: (
                {"status": "ok"} if name in self.paths
                else {"status": "unsupported", "reason": self.unsupported.get(name, "")}
            )
            for name in PATH_ORDER if name in want or name == "direct"
        }

    def cpu_window(self) -> CpuWindow:
        pids = {name: proc.pid for name, proc in self.procs.items() if proc.alive()}
        pids["loadgen"] = os.getpid()
        if self.redis is not None and self.redis.process is not None:
            pids["redis"] = self.redis.process.pid
        if "nginx" in self.procs:
            worker = _children(self.procs["nginx"].pid)
            if worker:
                pids["nginx"] = worker[0]
        return CpuWindow(pids)

    # -- figures --------------------------------------------------------------------

    async def phase_ttfc(self) -> None:
        """Time to first content chunk: rounds over every path, one request per path per round."""
        o = self.o
        self.say(f"ttfc: {o.ttfc_requests} requests per path, interleaved ({', '.join(self.paths)})")
        conns = {name: lg.HTTPConnection(HOST, port) for name, (port, _) in self.paths.items()}
        samples: dict[str, list[float]] = {name: [] for name in self.paths}
        errors: dict[str, int] = dict.fromkeys(self.paths, 0)
        body = lg.chat_body(o.ttfc_chunks)
        client = None
        if o.httpx:
            import httpx

            client = httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_keepalive_connections=4))
            samples["direct-httpx"], errors["direct-httpx"] = [], 0
        try:
            for i in range(o.ttfc_warmup + o.ttfc_requests):
                names = list(samples)
                k = i % len(names)
                for name in names[k:] + names[:k]:  # rotate who goes first
                    if name == "direct-httpx":
                        ttfc, ok = await _httpx_ttfc(client, f"http://{HOST}:{self.ports['upstream']}{CHAT}", body)
                    else:
                        try:
                            result = await conns[name].request("POST", self.paths[name][1], body)
                            ttfc, ok = result.ttfc, result.ok
                        except (OSError, lg.LoadgenError):
                            ttfc, ok = None, False
                    if i < o.ttfc_warmup:
                        continue
                    if ok and ttfc is not None:
                        samples[name].append(ttfc)
                    else:
                        errors[name] += 1
        finally:
            for conn in conns.values():
                await conn.close()
            if client is not None:
                await client.aclose()
        out = {}
        direct = _dist(samples["direct"])
        for name, values in samples.items():
            d = _dist(values)
            d["errors"] = errors[name]
            if name != "direct":
                d["added_p50"] = _diff(d.get("p50"), direct.get("p50"))
                d["added_p99"] = _diff(d.get("p99"), direct.get("p99"))
            out[name] = d
        for name in ("relay", "relay-2node"):
            if name in out:
                out[name]["cpu_ms_per_request"] = await self._cpu_per_request(name, body, o.ttfc_requests)
        if "relay-2node" in out and "relay" in out:
            out["relay-2node"]["hop_p50_over_relay"] = _diff(out["relay-2node"].get("p50"), out["relay"].get("p50"))
            out["relay-2node"]["hop_p99_over_relay"] = _diff(out["relay-2node"].get("p99"), out["relay"].get("p99"))
        self.results["ttfc_ms"] = out
        self.raw["ttfc"] = samples

    async def _cpu_per_request(self, name: str, body: bytes, n: int) -> dict[str, float]:
        """CPU milliseconds each process spends per sequential request on path ``name`` (what a
        burst queues behind, and what the capacity model counts)."""
        port, path = self.paths[name]
        window = self.cpu_window().start()
        async with lg.HTTPConnection(HOST, port) as conn:
            for _ in range(n):
                await conn.request("POST", path, body)
        window.stop()
        return {proc: round(used / n * 1000, 3) for proc, used in window.used.items()
                if proc in ("relay_a", "relay_b", "agent_a", "redis")}

    async def one_stream(self, name: str, chunks: int, size: int = 16) -> dict:
        port, path = self.paths[name]
        window = self.cpu_window().start()
        cpu0 = time.process_time()
        async with lg.HTTPConnection(HOST, port) as conn:
            result = await conn.request("POST", path, lg.chat_body(chunks, 0, size))
        loadgen_cpu = time.process_time() - cpu0
        window.stop()
        events = result.events
        out = {
            "chunks": chunks,
            "size": size,
            "ok": result.ok and events == chunks + 1,
            "events": events,
            "seconds": round(result.total, 3),
            "chunks_per_s": round(events / result.total) if result.total else None,
            "loadgen_cpu_s_per_100k": round(loadgen_cpu / max(events, 1) * 1e5, 3),
            "cpu": window.as_dict(),
        }
        if not out["ok"]:
            out["error"] = f"status {result.status}, {events} events, done={result.done}: {result.error}"
        relay_cpu = window.used.get("relay_a")
        if relay_cpu is not None and name.startswith("relay"):
            out["relay_a_cpu_s_per_100k"] = round(relay_cpu / max(events, 1) * 1e5, 3)
        if name == "relay-2node" and "relay_b" in window.used:
            out["relay_b_cpu_s_per_100k"] = round(window.used["relay_b"] / max(events, 1) * 1e5, 3)
        return out

    async def phase_one_stream(self) -> None:
        o = self.o
        out: dict[str, Any] = {}
        for name in self.paths:
            self.say(f"one stream: {o.one_stream_chunks} chunks via {name}")
            out[name] = await self.one_stream(name, o.one_stream_chunks)
            await asyncio.sleep(self.o.settle)
        direct = out.get("direct", {}).get("chunks_per_s")
        for d in out.values():
            if direct and d.get("chunks_per_s"):
                d["pct_of_direct"] = round(100 * d["chunks_per_s"] / direct, 1)
        if o.httpx:
            self.say("one stream: direct with httpx (a generic client), for the load generator's own cost")
            out["direct-httpx"] = await _httpx_one_stream(
                f"http://{HOST}:{self.ports['upstream']}{CHAT}", lg.chat_body(o.one_stream_chunks)
            )
        self.results["one_stream"] = out

    async def phase_concurrent(self) -> None:
        o = self.o
        out: dict[str, Any] = {}
        interval = 1.0 / o.rate if o.rate > 0 else 0.0
        for c in o.concurrency:
            key = f"{c}x{o.chunks_per_stream}@{o.rate:g}"
            out[key] = {}
            for name in self.paths:
                self.say(f"concurrent: {key} via {name}")
                port, path = self.paths[name]
                logged = self.log_sizes()
                hogs = [self.group.start(f"hog{i}", [sys.executable, "-c", "while True: pass"]) for i in range(o.hog)]
                lags: list[float] = []
                lags_b: list[float] = []
                samplers = [asyncio.create_task(self.sample_lag(lags)),
                            asyncio.create_task(self.sample_lag(lags_b, "relay_b"))] if name.startswith("relay") else []
                try:
                    window = self.cpu_window().start()
                    res = await lg.run_concurrent(HOST, port, path, c, o.chunks_per_stream, o.rate, ramp=o.ramp,
                                                  timeout=max(20.0, 3 * o.chunks_per_stream * interval + 15))
                    window.stop()
                finally:
                    for sampler in samplers:
                        sampler.cancel()
                    await asyncio.gather(*samplers, return_exceptions=True)
                    for hog in hogs:
                        self.group.stop(hog)
                d = {
                    "streams": c, "completed": res.completed, "errors": res.errors, "unfinished": res.unfinished,
                    "error_samples": res.error_samples,
                    "refused_503": res.refused, "cut": res.cut, "cut_reasons": res.cut_reasons,
                    "cut_after_events": sorted(res.cut_after_events), "other_statuses": res.other_statuses,
                    "refused_ms": _dist(res.refused_ttfb), "hog_processes": o.hog,
                    "relay_warnings": self.warnings_since(logged),
                    "relay_a_loop_lag_ms": {"max": _ms(max(lags)) if lags else None, "samples": len(lags),
                                            "p50": _ms(lg.percentile(lags, 50)) if lags else None},
                    "relay_b_loop_lag_ms": {"max": _ms(max(lags_b)) if lags_b else None, "samples": len(lags_b)},
                    "excess_ms": _dist(res.excess), "ttfc_ms": _dist(res.ttfc),
                    "chunks": res.completed * (o.chunks_per_stream + 1),
                    "cpu": window.as_dict(),
                }
                if name.startswith("relay") and "relay_a" in window.used and d["chunks"]:
                    d["relay_a_cpu_s_per_100k"] = round(window.used["relay_a"] / d["chunks"] * 1e5, 3)
                out[key][name] = d
                self.raw["excess"][f"{key} {name}"] = res.excess
                await asyncio.sleep(self.o.settle)
            direct_p99 = out[key].get("direct", {}).get("excess_ms", {}).get("p99")
            for name, d in out[key].items():
                if name != "direct":
                    d["added_p99_ms"] = _diff(d["excess_ms"].get("p99"), direct_p99)
        self.results["concurrent"] = out

    async def phase_cpu_per_chunk(self) -> None:
        """Relay CPU per relayed chunk at two chunk sizes, at a fixed pace (same coalescing for both)."""
        o = self.o
        if "relay" not in self.paths:
            return
        out: dict[str, Any] = {}
        port, path = self.paths["relay"]
        for size in o.sizes:
            self.say(f"cpu per chunk: {o.cpu_streams}x{o.cpu_chunks}@{o.cpu_rate:g}/s, {size}-char chunks via relay")
            window = self.cpu_window().start()
            res = await lg.run_concurrent(HOST, port, path, o.cpu_streams, o.cpu_chunks, o.cpu_rate, size=size,
                                          ramp=1.0 / o.cpu_rate, timeout=max(60.0, 5 * o.cpu_chunks / o.cpu_rate))
            window.stop()
            chunks = res.completed * (o.cpu_chunks + 1)
            event_bytes = len(_sample_event(size))
            out[str(size)] = {
                "content_chars": size,
                "event_bytes": event_bytes,
                "completed": res.completed,
                "errors": res.errors,
                "chunks": chunks,
                "relay_cpu_s": window.used.get("relay_a"),
                "relay_cpu_s_per_100k": round(window.used.get("relay_a", 0) / max(chunks, 1) * 1e5, 3),
                "agent_cpu_s_per_100k": round(window.used.get("agent_a", 0) / max(chunks, 1) * 1e5, 3),
                "cpu": window.as_dict(),
            }
            await asyncio.sleep(self.o.settle)
        sizes = list(out.values())
        if len(sizes) >= 2 and sizes[0]["relay_cpu_s_per_100k"]:
            out["ratio_large_to_small"] = round(sizes[-1]["relay_cpu_s_per_100k"] / sizes[0]["relay_cpu_s_per_100k"], 2)
        self.results["cpu_per_chunk"] = out
        if "relay-2node" in self.paths:
            await self._cpu_per_chunk_across_nodes(min(o.sizes))

    async def _cpu_per_chunk_across_nodes(self, size: int) -> None:
        """The same paced load with the caller on node A and the agent on node B: what both nodes spend
        per chunk (docs/capacity.md counts it for callers that land on another node than the agent)."""
        o = self.o
        port, path = self.paths["relay-2node"]
        self.say(f"cpu per chunk across nodes: {o.cpu_streams}x{o.cpu_chunks}@{o.cpu_rate:g}/s, {size}-char chunks")
        window = self.cpu_window().start()
        res = await lg.run_concurrent(HOST, port, path, o.cpu_streams, o.cpu_chunks, o.cpu_rate, size=size,
                                      ramp=1.0 / o.cpu_rate, timeout=max(60.0, 5 * o.cpu_chunks / o.cpu_rate))
        window.stop()
        chunks = max(res.completed * (o.cpu_chunks + 1), 1)
        self.results["cpu_per_chunk_across_nodes"] = {
            "event_bytes": len(_sample_event(size)), "completed": res.completed, "errors": res.errors,
            **{f"{proc}_us_per_chunk": round(window.used.get(proc, 0) / chunks * 1e6, 1)
               for proc in ("relay_a", "relay_b", "redis")},
        }
        await asyncio.sleep(self.o.settle)

    async def phase_profile(self) -> None:
        """Sample node A and agent A with py-spy under three loads (separate runs, figures not reused)."""
        o = self.o
        if "relay" not in self.paths:
            return
        o.output.mkdir(parents=True, exist_ok=True)
        stamp = self.results["meta"]["date"].replace(":", "").replace("+0000", "Z")
        out: dict[str, Any] = {}
        port, path = self.paths["relay"]
        c = max(o.concurrency)

        async def sequential() -> None:
            async with lg.HTTPConnection(HOST, port) as conn:
                for _ in range(o.ttfc_requests):
                    await conn.request("POST", path, lg.chat_body(o.ttfc_chunks))

        loads = {
            "ttfc": sequential,
            "one_stream": lambda: self.one_stream("relay", 3 * o.one_stream_chunks),
            "concurrent": lambda: lg.run_concurrent(HOST, port, path, c, o.chunks_per_stream, o.rate, ramp=o.ramp,
                                                    timeout=max(60.0, 5 * o.chunks_per_stream / o.rate + 30)),
        }
        for load, start in loads.items():
            self.say(f"profile: {load} via relay, py-spy on relay_a and agent_a")
            files = {who: o.output / f"profile-{stamp}-{load}-{who}.txt" for who in ("relay_a", "agent_a")}
            window = self.cpu_window().start()
            with Profiler(self.procs["relay_a"].pid, files["relay_a"], native=o.native) as p1, \
                    Profiler(self.procs["agent_a"].pid, files["agent_a"], native=o.native) as p2:
                await start()
            window.stop()
            for who, prof in (("relay_a", p1), ("agent_a", p2)):
                key = f"{load}/{who}"
                if files[who].exists():
                    out[key] = summarize(files[who]) | {"file": str(files[who]), "cpu_s": window.used.get(who),
                                                        "wall_s": round(window.wall, 2)}
                    print(format_summary(key, out[key]), file=sys.stderr)
                else:
                    out[key] = {"error": prof.error or "no profile written"}
            await asyncio.sleep(o.settle)
        self.results["profile"] = out

    async def phase_redis_per_request(self, n: int = 50) -> None:
        """Redis commands issued per relayed request (the design wants O(1))."""
        import redis as redis_lib

        rcli = redis_lib.Redis.from_url(self.redis.url)
        out: dict[str, Any] = {}
        try:
            for name in ("relay", "relay-2node"):
                if name not in self.paths:
                    continue
                port, path = self.paths[name]
                # Round trips as relay A counts them (relay_redis_round_trips_total), less what
                # its own loops (heartbeat, leases) sent in an idle window of the same length.
                idle_start, t0 = await self.round_trips(), time.perf_counter()
                await asyncio.sleep(0.5)
                idle_rate = (await self.round_trips() - idle_start) / (time.perf_counter() - t0)
                before, trips_before, t0 = _redis_calls(rcli), await self.round_trips(), time.perf_counter()
                bytes_before = _redis_bytes(rcli)
                async with lg.HTTPConnection(HOST, port) as conn:
                    for _ in range(n):
                        await conn.request("POST", path, lg.chat_body(self.o.ttfc_chunks))
                after, trips_after, elapsed = _redis_calls(rcli), await self.round_trips(), time.perf_counter() - t0
                bytes_after = _redis_bytes(rcli)
                calls = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                calls = {
                    k: round(v / n, 2) for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v and k != "info"
                }
                trips = max(0.0, trips_after - trips_before - idle_rate * elapsed) / n
                # Bytes into and out of Redis, every client (both nodes, and the node's own loops
                # during the run: a few hundred bytes per heartbeat, small beside 50 requests).
                traffic = [round((b - a) / n) for a, b in zip(bytes_before, bytes_after, strict=True)]
                out[name] = {"per_request": round(sum(calls.values()), 2), "by_command": calls,
                             "round_trips_a": round(trips, 2), "bytes_in": traffic[0], "bytes_out": traffic[1]}
        finally:
            rcli.close()
        self.results["redis_per_request"] = out

    async def round_trips(self) -> float:
        """relay A's count of the requests it has sent to Redis (each pipeline counts once)."""
        port = self.paths["relay"][0]
        async with lg.HTTPConnection(HOST, port) as conn:
            result = await conn.request("GET", "/metrics")
        status, body = result.status, result.body or b""
        for line in body.decode().splitlines():
            if line.startswith("relay_redis_round_trips_total "):
                return float(line.split()[1])
        raise RuntimeError(f"relay A's /metrics has no round-trip count ({status})")

    async def phase_idle_agents(self) -> None:
        """RSS / CPU / Redis commands of a fresh node holding N idle agents, N growing."""
        o = self.o
        counts = sorted(o.idle_agents)
        total = counts[-1]
        self.say(f"idle agents: registering {total} instances")
        tokens, ids = await self.register_many("relay_a", total)
        # Only the idle node runs from here on: stop the streaming stack.
        for name in ("agent_a", "agent_b", "nginx", "relay_b", "relay_a", "upstream"):
            if name in self.procs:
                self.group.stop(self.procs.pop(name))
        tokens_file = self.work / "tokens.txt"
        tokens_file.write_text("\n".join(tokens) + "\n")
        self.say("idle agents: streaming stack stopped; starting a fresh node C")
        relay = self.start_relay("relay_c")
        await self.wait_http("relay_c")
        connector = self.group.start(
            "idle_agents",
            [sys.executable, "-m", "bench.agents", "--url", f"ws://{HOST}:{self.ports['relay_c']}/api/agent/connect",
             "--tokens", str(tokens_file)],
            stdin=True, stdout_pipe=True,
        )
        self.procs["idle_agents"] = connector
        import redis as redis_lib

        rcli = redis_lib.Redis.from_url(self.redis.url)
        steps: list[dict] = []
        try:
            await asyncio.sleep(max(o.settle, o.heartbeat_interval))  # let node C settle (first tick, pubsub)
            steps.append(await self.idle_window(relay, connector, rcli, 0, ids, 0))
            for n in counts:
                self.say(f"idle agents: growing to {n}")
                grown = await connector_command(connector, {"cmd": "grow", "to": n}, timeout=600)
                await asyncio.sleep(o.heartbeat_interval)  # every agent has sent at least one heartbeat
                step = await self.idle_window(relay, connector, rcli, grown["connected"], ids, n)
                step["connect_s"] = grown["seconds"]
                step["connect_failed"] = grown["failed"]
                if grown.get("errors"):
                    step["connect_errors"] = grown["errors"]
                steps.append(step)
            await connector_command(connector, {"cmd": "stop"}, timeout=120)
            t_stop = time.perf_counter()
            deadline = t_stop + 3 * o.heartbeat_interval + 30
            while True:
                online_after = (await self.count_online("relay_c", set(ids), set()))[0]
                if online_after == 0 or time.perf_counter() > deadline:
                    break
                await asyncio.sleep(0.2)
            offline_s = round(time.perf_counter() - t_stop, 2)
        finally:
            rcli.close()
        base = steps[0]
        for step in steps[1:]:
            n = step["agents"]
            if n:
                step["rss_per_agent_kib"] = round((step["rss_bytes"] - base["rss_bytes"]) / n / 1024, 2)
                step["cpu_pct_per_1000_agents"] = round(1000 * (step["relay_cpu_pct"] - base["relay_cpu_pct"]) / n, 3)
        self.results["idle_agents"] = {
            "heartbeat_interval_s": o.heartbeat_interval,
            "window_intervals": o.idle_intervals,
            "nodes": 1,
            "steps": steps,
            "online_after_disconnect": online_after,
            "all_offline_after_s": offline_s,
        }

    async def register_many(self, relay: str, n: int, concurrency: int = 16) -> tuple[list[str], list[str]]:
        tokens: list[str] = [""] * n
        ids: list[str] = [""] * n
        port = self.ports[relay]
        next_i = 0

        async def worker() -> None:
            nonlocal next_i
            async with lg.HTTPConnection(HOST, port) as conn:
                while next_i < n:
                    i, next_i = next_i, next_i + 1
                    result = await conn.request("POST", "/api/instances", orjson.dumps({"name": f"idle-{i}"}))
                    if result.status != 201:
                        raise RuntimeError(f"registration {i} failed: {result.status} {result.error}")
                    body = orjson.loads(result.body)
                    tokens[i], ids[i] = body["agent_token"], body["instance_id"]

        await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
        return tokens, ids

    async def idle_window(self, relay: Proc, connector: Proc, rcli, agents: int, ids: list[str], n: int) -> dict:
        """Measure one window with ``agents`` connected (the agents of ``ids[:n]``)."""
        o = self.o
        before = await connector_command(connector, {"cmd": "stats"})
        cmds0 = _redis_calls(rcli)
        window = CpuWindow({"relay_c": relay.pid, "idle_agents": connector.pid}).start()
        await asyncio.sleep(o.idle_intervals * o.heartbeat_interval)
        window.stop()
        cmds1 = _redis_calls(rcli)
        after = await connector_command(connector, {"cmd": "stats"})
        rss = rss_bytes(relay.pid)
        online, online_connected = await self.count_online("relay_c", set(ids), set(ids[:n]))
        calls = {k: cmds1.get(k, 0) - cmds0.get(k, 0) for k in cmds1}
        calls = {k: v for k, v in calls.items() if v and k != "info"}
        per_interval = sum(calls.values()) / o.idle_intervals
        return {
            "agents": agents,
            "rss_bytes": rss,
            "rss_mib": round(rss / 2**20, 1),
            "relay_cpu_s": window.used["relay_c"],
            "relay_cpu_pct": round(100 * window.used["relay_c"] / window.wall, 2),
            "redis_cmds_per_interval": round(per_interval, 1),
            "redis_cmds": calls,
            "pings": after["pings"] - before["pings"],
            "pongs": after["pongs"] - before["pongs"],
            "closed": after["closed"],
            "online": online,
            "presence_correct": online == online_connected == agents == n,
        }

    async def count_online(self, relay: str, ids: set[str], connected: set[str]) -> tuple[int, int]:
        """How many of ``ids``, and of ``connected``, the relay's HTTP API lists as online (all pages)."""
        port, cursor, found, found_connected = self.ports[relay], None, 0, 0
        for _ in range(10_000):
            query = "/api/instances?status=online&limit=500" + (f"&cursor={cursor}" if cursor else "")
            status, page = await lg.get_json(HOST, port, query)
            if status != 200 or not isinstance(page, dict):
                raise RuntimeError(f"listing instances failed: {status} {page}")
            found += sum(1 for view in page["data"] if view["instance_id"] in ids)
            found_connected += sum(1 for view in page["data"] if view["instance_id"] in connected)
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return found, found_connected


# -- helpers ---------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _redis_bytes(rcli) -> tuple[int, int]:
    """Bytes Redis has read from and written to its clients so far."""
    stats = rcli.info("stats")
    return int(stats["total_net_input_bytes"]), int(stats["total_net_output_bytes"])


def _redis_calls(rcli) -> dict[str, int]:
    stats = rcli.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def _sample_event(size: int) -> bytes:
    from bench.upstream import chunk_event

    return chunk_event("x" * size)


async def _httpx_ttfc(client, url: str, body: bytes) -> tuple[float | None, bool]:
    t0 = time.perf_counter()
    ttfc, done = None, False
    try:
        async with client.stream("POST", url, content=body, headers={"content-type": "application/json"}) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    if ttfc is None:
                        ttfc = time.perf_counter() - t0
                    if line == "data: [DONE]":
                        done = True
            return ttfc, resp.status_code == 200 and done
    except Exception:
        return None, False


async def _httpx_one_stream(url: str, body: bytes) -> dict:
    import httpx

    events, done = 0, False
    cpu0, t0 = time.process_time(), time.perf_counter()
    async with (
        httpx.AsyncClient(timeout=120) as client,
        client.stream("POST", url, content=body, headers={"content-type": "application/json"}) as resp,
    ):
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                if line == "data: [DONE]":
                    done = True
                else:
                    events += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"events": events, "ok": done, "seconds": round(wall, 3), "chunks_per_s": round(events / wall),
            "loadgen_cpu_s_per_100k": round(cpu / max(events, 1) * 1e5, 3)}


# -- targets ------------------------------------------------------------------------------


def evaluate_targets(r: dict) -> list[dict]:
    """Each target (issue 13's speed targets, issue 5's idle-agent ones) with the figure, met or not."""
    out: list[dict] = []

    def add(name: str, measured, limit, unit: str, *, higher_is_better: bool = False, note: str = "") -> None:
        if measured is None:
            out.append({"target": name, "limit": limit, "unit": unit, "measured": None, "met": None,
                        "note": note or "not measured"})
            return
        met = measured >= limit if higher_is_better else measured <= limit
        distance = round(measured - limit, 3)
        out.append({"target": name, "limit": limit, "unit": unit, "measured": measured, "met": met,
                    "distance": distance, "note": note})

    t = r.get("ttfc_ms", {}).get("relay", {})
    add("added TTFC p50 over direct, 1 node", t.get("added_p50"), 0.5, "ms")
    add("added TTFC p99 over direct, 1 node", t.get("added_p99"), 2.0, "ms")
    hop = r.get("ttfc_ms", {}).get("relay-2node", {}).get("hop_p50_over_relay")
    add("cross-node hop: added TTFC p50 over 1 node", hop, 0.5, "ms",
        note="" if hop is not None else r.get("paths", {}).get("relay-2node", {}).get("reason", ""))
    one = r.get("one_stream", {}).get("relay", {})
    add("one stream, % of direct chunks/s", one.get("pct_of_direct"), 50.0, "%", higher_is_better=True)
    conc = r.get("concurrent", {})
    for key, paths in conc.items():
        for name, where in (("relay", "1 node"), ("relay-2node", "2 nodes")):
            d = paths.get(name)
            if not d:
                continue
            add(f"{key}, {where}: all complete, zero errors", d["completed"], d["streams"], "streams",
                higher_is_better=True, note=f"{d['errors']} errors; " + "; ".join(d.get("error_samples", [])[:1]))
            out[-1]["met"] = d["completed"] == d["streams"] and d["errors"] == 0
            add(f"{key}, {where}: p99 time to first chunk", d.get("ttfc_ms", {}).get("p99"), 500.0, "ms",
                note=f"direct p99 {paths.get('direct', {}).get('ttfc_ms', {}).get('p99')} ms")
            add(f"{key}, {where}: p99 added inter-chunk delay", d.get("added_p99_ms"), 10.0, "ms",
                note=f"p99 excess {d['excess_ms'].get('p99')} ms,"
                     f" direct {paths.get('direct', {}).get('excess_ms', {}).get('p99')} ms")
    rpr = r.get("redis_per_request", {})
    for name, where in (("relay", "1 node"), ("relay-2node", "2 nodes")):
        v = rpr.get(name)
        if v and "round_trips_a" in v:
            add(f"Redis round trips per request, {where} (relay A)", v["round_trips_a"], 2.0, "round trips",
                note=f"{v['per_request']} commands")
    cpc = r.get("cpu_per_chunk", {})
    small = next((v for v in cpc.values() if isinstance(v, dict)), None)
    if small:
        add("relay CPU per relayed paced chunk", round(small["relay_cpu_s_per_100k"] * 10, 1), 45.0, "µs",
            note=f"agent CPU per chunk {round(small['agent_cpu_s_per_100k'] * 10, 1)} µs (reported)")
    ratio = cpc.get("ratio_large_to_small")
    add("relay CPU per chunk does not grow with size (large/small ratio)", ratio, 1.25, "x",
        note=", ".join(
            f"{v['event_bytes']} B: {v['relay_cpu_s_per_100k']} s/100k" for v in cpc.values() if isinstance(v, dict)
        ))
    idle = r.get("idle_agents", {})
    if idle.get("steps"):
        last = idle["steps"][-1]
        add(f"{last['agents']} idle agents: RSS per agent", last.get("rss_per_agent_kib"), 32.0, "KiB")
        add(f"{last['agents']} idle agents: presence correct", int(bool(last.get("presence_correct"))), 1, "bool",
            higher_is_better=True, note=f"{last['online']} online of {last['agents']}")
        after = idle.get("online_after_disconnect")
        add("idle agents: all offline after they disconnect", after, 0, "still online",
            note=f"checked for {idle.get('all_offline_after_s')} s after the last close"
                 f" (heartbeat timeout {3 * idle['heartbeat_interval_s']:g} s)")
        counts = [s["redis_cmds_per_interval"] for s in idle["steps"]]
        spread = max(counts) - min(counts)
        add("Redis commands per heartbeat interval independent of agent count (max - min over steps)",
            round(spread, 1), 2.0, "cmds",
            note=f"per interval at {[s['agents'] for s in idle['steps']]} agents: {counts}")
    return out


# -- output ----------------------------------------------------------------------------------


def _fmt(v, unit: str = "", nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        s = f"{v:,.{nd}f}"
    elif isinstance(v, int):
        s = f"{v:,}"
    else:
        s = str(v)
    return s + unit


def table(r: dict) -> str:
    m = r["meta"]
    paths = [p for p in PATH_ORDER if p in r.get("paths", {})]
    lines = [
        (
            f"instance-relay bench - {m['date']} - {m['cores']} cores ({m['cpu']}) - Python {m['python']}"
            f" - {m.get('duration_s', '?')} s"
        ),
        "",
    ]
    if not paths:  # nothing but optional phases of their own (cluster)
        lines.extend(realmodel.table_lines(r))
        lines.extend(clusterphase.table_lines(r))
        return "\n".join(lines)
    w0, w = 38, 16
    head = "".ljust(w0) + "".join(LABELS[p].rjust(w) for p in paths)
    lines.append(head)
    lines.append("-" * len(head))

    def row(label: str, values: list[str]) -> None:
        lines.append(label.ljust(w0) + "".join(v.rjust(w) for v in values))

    status = r.get("paths", {})
    row("path", [status[p]["status"] for p in paths])
    t = r.get("ttfc_ms", {})
    if t:
        n = t.get("direct", {}).get("n", 0)
        row(f"TTFC p50 ms ({n} req)", [_fmt(t.get(p, {}).get("p50"), nd=3) for p in paths])
        row("TTFC p99 ms", [_fmt(t.get(p, {}).get("p99"), nd=3) for p in paths])
        row("  added p50 ms vs direct", [_fmt(t.get(p, {}).get("added_p50"), nd=3) for p in paths])
        row("  added p99 ms vs direct", [_fmt(t.get(p, {}).get("added_p99"), nd=3) for p in paths])
        for proc in ("relay_a", "relay_b", "agent_a", "redis"):
            if any(proc in t.get(p, {}).get("cpu_ms_per_request", {}) for p in paths):
                row(f"  {proc} CPU ms / request", [
                    _fmt(t.get(p, {}).get("cpu_ms_per_request", {}).get(proc), nd=3) for p in paths])
    one = r.get("one_stream", {})
    if one:
        n = one.get("direct", {}).get("chunks", 0)
        row(f"one stream of {n:,}: chunks/s", [_fmt(one.get(p, {}).get("chunks_per_s")) for p in paths])
        row("  % of direct", [_fmt(one.get(p, {}).get("pct_of_direct"), "%", 1) for p in paths])
        row("  relay A CPU s / 100k chunks", [_fmt(one.get(p, {}).get("relay_a_cpu_s_per_100k"), nd=2) for p in paths])
    for key, res in r.get("concurrent", {}).items():
        row(f"{key}/s: completed/errors", [
            f"{res[p]['completed']}/{res[p]['errors']}" if p in res else "-" for p in paths])
        row("  whole/cut/refused 503", [
            f"{res[p]['completed']}/{res[p].get('cut', 0)}/{res[p].get('refused_503', 0)}" if p in res else "-"
            for p in paths])
        row("  cut by", [", ".join(f"{k} {v}" for k, v in res[p].get("cut_reasons", {}).items()) or "-"
                         if p in res else "-" for p in paths])
        row("  relay A/B loop lag max ms", [
            "/".join(_fmt(res.get(p, {}).get(f"relay_{n}_loop_lag_ms", {}).get("max")) for n in "ab")
            if p in res else "-" for p in paths])
        row("  relay A/B WARNING lines", [
            "/".join(str(res[p].get("relay_warnings", {}).get(n, {}).get("count", "-")) for n in ("relay_a", "relay_b"))
            if p in res else "-" for p in paths])
        row("  TTFC p50/p99 ms (whole)", [
            f"{_fmt(res[p]['ttfc_ms'].get('p50'))}/{_fmt(res[p]['ttfc_ms'].get('p99'))}" if p in res else "-"
            for p in paths])
        row("  p99 inter-chunk excess ms", [_fmt(res.get(p, {}).get("excess_ms", {}).get("p99"), nd=2) for p in paths])
        row("  p99 added vs direct ms", [_fmt(res.get(p, {}).get("added_p99_ms"), nd=2) for p in paths])
        row("  machine busy cores", [_fmt(res.get(p, {}).get("cpu", {}).get("machine_busy_cores")) for p in paths])
    lines.append("")
    cpc = r.get("cpu_per_chunk", {})
    if cpc:
        lines.append("relay CPU per relayed chunk (paced, same coalescing for both sizes):")
        for v in cpc.values():
            if isinstance(v, dict):
                lines.append(f"  {v['event_bytes']:>6} B events: relay {v['relay_cpu_s_per_100k']:.2f} s/100k chunks,"
                             f" agent {v['agent_cpu_s_per_100k']:.2f} s/100k"
                             f" ({v['completed']} streams, {v['errors']} errors)")
        if "ratio_large_to_small" in cpc:
            lines.append(f"  large/small ratio: {cpc['ratio_large_to_small']}")
    across = r.get("cpu_per_chunk_across_nodes")
    if across:
        lines.append(f"  across nodes ({across['event_bytes']} B events, caller on A, agent on B): relay A "
                     f"{across['relay_a_us_per_chunk']} µs + relay B {across['relay_b_us_per_chunk']} µs per chunk, "
                     f"redis {across['redis_us_per_chunk']} µs "
                     f"({across['completed']} streams, {across['errors']} errors)")
    idle = r.get("idle_agents")
    if idle:
        lines.append(f"idle agents on one fresh node (heartbeat {idle['heartbeat_interval_s']:g} s):")
        lines.append("  agents    RSS MiB  KiB/agent  relay CPU %  redis cmds/interval  online  presence")
        for s in idle["steps"]:
            lines.append(f"  {s['agents']:>6}  {s['rss_mib']:>9}  {_fmt(s.get('rss_per_agent_kib')):>9}"
                         f"  {s['relay_cpu_pct']:>11}  {s['redis_cmds_per_interval']:>19}  {s['online']:>6}"
                         f"  {'ok' if s['presence_correct'] else 'WRONG'}")
        lines.append(f"  after all disconnected: {idle['online_after_disconnect']} online"
                     f" ({idle.get('all_offline_after_s')} s after the last close)")
    rpr = r.get("redis_per_request", {})
    for name, v in rpr.items():
        lines.append(f"redis per request via {LABELS[name]}: {v.get('round_trips_a')} round trips (relay A), "
                     f"{v['per_request']} commands, {v.get('bytes_in')} B in / {v.get('bytes_out')} B out  "
                     f"{v['by_command']}")
    one = r.get("one_stream", {})
    if "direct-httpx" in one and "direct" in one:
        lines.append("load generator's own cost (direct path, one stream):")
        lines.append(f"  this loadgen: {one['direct']['chunks_per_s']:,} chunks/s, "
                     f"{one['direct']['loadgen_cpu_s_per_100k']:.3f} CPU s/100k chunks;"
                     f" httpx aiter_lines: {one['direct-httpx']['chunks_per_s']:,} chunks/s, "
                     f"{one['direct-httpx']['loadgen_cpu_s_per_100k']:.3f} CPU s/100k")
    if "direct-httpx" in t:
        lines.append(f"  TTFC p50 direct: loadgen {t['direct'].get('p50')} ms, httpx {t['direct-httpx'].get('p50')} ms")
    lines.extend(realmodel.table_lines(r))
    lines.extend(clusterphase.table_lines(r))
    lines.append("")
    lines.append("targets (met / MISSED / not measured):")
    for tg in r.get("targets", []):
        mark = {True: "MET   ", False: "MISSED", None: "n/a   "}[tg["met"]]
        dist = (
            f" (distance {tg['distance']:+g} {tg['unit']})"
            if tg.get("distance") is not None and tg["met"] is False else ""
        )
        lines.append(f"  {mark} {tg['target']}: {_fmt(tg['measured'])} vs {tg['limit']} {tg['unit']}{dist}"
                     + (f"  [{tg['note']}]" if tg.get("note") else ""))
    return "\n".join(lines)


def plot(r: dict, raw: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    for name, values in raw.get("ttfc", {}).items():
        if values:
            xs = sorted(v * 1000 for v in values)
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=f"{LABELS.get(name, name)} (p50 {lg.percentile(xs, 50):.2f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("time to first content chunk, ms (log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Time to first chunk, per path")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=8)
    ax = axes[1]
    interval = 1000 / r["options"]["rate"] if r["options"]["rate"] else 0
    colors = {"direct": "tab:blue", "nginx": "tab:orange", "relay": "tab:green", "relay-2node": "tab:red"}
    styles = ["-", "--", ":", "-."]
    keys = list(dict.fromkeys(k.split(" ")[0] for k in raw.get("excess", {})))
    for name, values in raw.get("excess", {}).items():
        if values:
            key, path_name = name.split(" ", 1)
            # arrival gaps that were not coalesced, as ms of delay beyond the nominal interval
            # (on time or early is drawn at 0.01 ms)
            xs = sorted(max(v * 1000, 0.01) for v in values if v > -interval / 1000 + 1e-9 or interval == 0)
            if not xs:
                continue
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=f"{key} {LABELS.get(path_name, path_name)}",
                    color=colors.get(path_name), linestyle=styles[keys.index(key) % len(styles)])
    ax.set_xscale("log")
    ax.set_xlabel("inter-chunk gap beyond the nominal interval, ms (log; coalesced chunks left out)")
    ax.set_ylabel("fraction of gaps")
    ax.set_title("Concurrent streams: inter-chunk delay")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=8)
    fig.suptitle(f"instance-relay bench {r['meta']['date']} ({r['meta']['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- CLI ---------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    d = Options()
    p = argparse.ArgumentParser(
        prog="python -m bench", description="instance-relay benchmark: relay vs direct, one run."
    )
    p.add_argument("--quick", action="store_true", help="tiny counts everywhere (plumbing check, ~15 s)")
    p.add_argument("--ttfc-requests", type=int, help=f"requests per path for TTFC (default {d.ttfc_requests})")
    p.add_argument(
        "--one-stream-chunks", type=int,
        help=f"chunks in the single-stream test (default {d.one_stream_chunks})",
    )
    p.add_argument("--concurrency", type=_ints, help="concurrent streams C, comma-separated for a sweep (default 1000)")
    p.add_argument(
        "--chunks-per-stream", type=int,
        help=f"M chunks per concurrent stream (default {d.chunks_per_stream})",
    )
    p.add_argument("--rate", type=float, help=f"r chunks/s per concurrent stream (default {d.rate:g})")
    p.add_argument("--ramp", type=float, help=f"seconds over which concurrent streams start (default {d.ramp:g})")
    p.add_argument("--relay-env", action="append", metavar="RELAY_X=V", default=[],
                   help="a setting for every relay node (repeatable), e.g. RELAY_REDIS_TIMEOUT=0.5")
    p.add_argument("--hog", type=int, help="busy-looping processes running beside the concurrent phase, taking "
                   "their share of the cores as a heavier load generator would (default 0)")
    p.add_argument("--cpu-streams", type=int, help=f"streams in the CPU-per-chunk test (default {d.cpu_streams})")
    p.add_argument(
        "--cpu-chunks", type=int,
        help=f"chunks per stream in the CPU-per-chunk test (default {d.cpu_chunks})",
    )
    p.add_argument(
        "--cpu-rate", type=float,
        help=f"chunks/s per stream in the CPU-per-chunk test (default {d.cpu_rate:g})",
    )
    p.add_argument("--sizes", type=_ints, help="content characters per chunk for the CPU test (default 16,2048)")
    p.add_argument(
        "--idle-agents", type=_ints,
        help="idle agent counts, comma-separated (default 1000,5000,10000; 0 = skip)",
    )
    p.add_argument(
        "--heartbeat-interval", type=float,
        help=f"relay heartbeat interval, s (default {d.heartbeat_interval:g})",
    )
    p.add_argument(
        "--idle-intervals", type=int,
        help=f"heartbeat intervals per idle measurement window (default {d.idle_intervals})",
    )
    p.add_argument("--paths", help="comma-separated subset of direct,nginx,relay,relay-2node")
    p.add_argument("--no-nginx", action="store_true", help="skip nginx even if installed")
    p.add_argument("--no-httpx", action="store_true", help="skip the generic-client comparison")
    p.add_argument("--profile", action="store_true", help="also sample relay A and agent A with py-spy (extra runs)")
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames of uvloop/httptools too)")
    p.add_argument("--phases", help=f"comma-separated subset of {','.join(PHASES + OPTIONAL_PHASES)}"
                   " (default: all but the optional ones)")
    p.add_argument("--output", type=Path, help="results directory (default bench/results)")
    p.add_argument("--no-plot", action="store_true")
    realmodel.add_arguments(p)
    clusterphase.add_arguments(p)
    return p


def options_from(argv: list[str] | None) -> Options:
    args = build_parser().parse_args(argv)
    o = Options()
    if args.quick:
        for k, v in QUICK.items():
            setattr(o, k, v)
        o.quick = True
    for name in ("ttfc_requests", "one_stream_chunks", "concurrency", "chunks_per_stream", "rate", "ramp", "hog",
                 "cpu_streams", "cpu_chunks", "cpu_rate", "sizes", "idle_agents", "heartbeat_interval",
                 "idle_intervals", "output"):
        value = getattr(args, name)
        if value is not None:
            setattr(o, name, value)
    if args.ttfc_requests is not None:
        o.ttfc_warmup = min(o.ttfc_warmup, max(1, args.ttfc_requests // 10))
    o.idle_agents = [n for n in o.idle_agents if n > 0]
    if args.paths:
        o.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
        unknown = set(o.paths) - set(PATH_ORDER)
        if unknown:
            raise SystemExit(f"unknown paths: {', '.join(sorted(unknown))}")
    for item in args.relay_env:
        name, eq, value = item.partition("=")
        if not eq or not name.startswith("RELAY_"):
            raise SystemExit(f"--relay-env takes RELAY_NAME=VALUE, not {item!r}")
        o.relay_env[name] = value
    o.nginx = not args.no_nginx
    o.httpx = not args.no_httpx
    o.profile = args.profile
    o.native = args.native
    if args.phases:
        o.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
        unknown = set(o.phases) - set(PHASES) - set(OPTIONAL_PHASES)
        if unknown:
            raise SystemExit(f"unknown phases: {', '.join(sorted(unknown))}")
    if o.profile and "profile" not in o.phases:
        o.phases.append("profile")
    o.real_model, asked = realmodel.options(args, o.quick)
    if asked and "real_model" not in o.phases:
        o.phases.append("real_model")
    o.cluster = clusterphase.options(args, o.quick)
    o.plot = not args.no_plot
    return o


def write_outputs(results: dict, raw: dict, o: Options) -> tuple[Path, Path | None]:
    o.output.mkdir(parents=True, exist_ok=True)
    stamp = results["meta"]["date"].replace(":", "").replace("+0000", "Z")
    json_path = o.output / f"bench-{stamp}.json"
    json_path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    png = plot(results, raw, o.output / f"bench-{stamp}.png") if o.plot else None
    return json_path, png


async def run_bench(o: Options) -> tuple[dict, dict]:
    bench = Bench(o)
    results = await bench.run()
    return results, bench.raw


def main(argv: list[str] | None = None) -> int:
    o = options_from(argv)
    from bench._loop import run

    results, raw = run(run_bench(o))
    json_path, png = write_outputs(results, raw, o)
    print(table(results))
    print(f"\nresults: {json_path}" + (f"\nplot:    {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
