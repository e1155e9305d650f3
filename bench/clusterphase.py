"""Optional bench phase ``cluster``: docs/capacity.md's capacity model checked on a local Redis Cluster.

    python -m bench --phases cluster --no-plot
    python -m bench --phases cluster --cluster-agents 1000 --cluster-streams 100 --no-plot

It starts a Redis Cluster of three masters and three replicas from Debian's ``redis-server``
(``tests.redis_servers.ClusterSet``, the one the test suite uses; ``--cluster-no-replicas``
kills the replicas once it has formed), the fake upstream, two ``relay serve`` nodes A and B on
its ``redis+cluster://`` URL, one ``relay-agent`` on B, and then measures, in this order:

1. Redis memory per registered instance: ``--cluster-instances`` registrations through A,
   ``INFO memory`` of every master before and after;
2. an idle window (``--idle-intervals`` heartbeat intervals) with no idle agent: each process's
   CPU rate, each master's CPU and commands, so the later windows can be taken net of them;
3. ``--cluster-agents`` idle agents on B (``bench.agents``, real websockets and heartbeats):
   Redis memory per online agent, B's RSS per agent, presence as A lists it; then a second
   idle window: B's CPU per idle agent, Redis commands per node per heartbeat interval;
4. ``--cluster-requests`` sequential requests (5-chunk answers) from A to the agent on B:
   relay and Redis CPU, Redis commands and bytes per request;
5. ``--cluster-streams`` concurrent streams of ``--cluster-chunks`` chunks at ``--cluster-rate``/s
   (``loadgen.run_concurrent``), caller on A, agent on B: relay CPU per chunk per node, each
   master's CPU, SPUBLISHes and bytes per chunk, whether every stream completed.

Each quantity is set beside what the model predicts from its unit costs (the constants below,
each from docs/capacity.md, "Unit costs") with measured / predicted and MET when the ratio lies
within the band its kind allows (``BANDS``), else MISSED.  The model's sums for its planned
load (relay cores, Redis memory, streams per shard, shards) are redone with the measured costs.

The node ids, so the shards holding each node's inbox, are random per process: when A's and
B's inbox channels hash to the same master, B is restarted (a new id) until they do not, so
the per-shard figures keep the two directions apart (B -> A data frames, A -> B credit).

Nothing here runs unless asked (``--phases cluster``); without ``redis-server``/``redis-cli``
or the test package's imports it records ``{"status": "skipped", "reason": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import shutil
import sys
import time
from typing import Any

HOST = "127.0.0.1"

# -- the model's unit costs (docs/capacity.md, section "Unit costs", figures of 2026-12-02) ------------

#: "same, caller on node A and agent on node B: A 79 µs + B 112 µs, and 17.5 µs of Redis" (per paced chunk)
RELAY_A_CHUNK_US = 79.0
RELAY_B_CHUNK_US = 112.0
REDIS_CHUNK_US = 17.5
#: "relay CPU per sequential request (a 5-chunk answer included) ... caller on node A and agent on node B:
#: A 2.33 ms + B 1.17 ms"
RELAY_A_REQUEST_MS = 2.33
RELAY_B_REQUEST_MS = 1.17
#: "Redis CPU per request, one node / across two: 0.20 / 0.43 ms"
REDIS_REQUEST_MS = 0.43
#: "Redis commands / round trips per request, one node: 26 / 3" (the doc has no cross-node count)
REDIS_COMMANDS_PER_REQUEST = 26
#: "Redis traffic per request (5-chunk answer) ... across two: 2,669 B in, 2,021 B out"
REQUEST_BYTES_IN = 2669
REQUEST_BYTES_OUT = 2021
#: "relay RSS per idle agent: 28.1 KiB"
RSS_PER_IDLE_AGENT_KIB = 28.1
#: "relay CPU per idle agent (heartbeat 5 s): 20.7 µs per second"; it scales with the ping rate
CPU_PER_IDLE_AGENT_US_PER_S = 20.7
MODEL_HEARTBEAT_S = 5.0
#: "Redis commands per node per heartbeat interval: 1, whatever the number of agents"
REDIS_COMMANDS_PER_NODE_INTERVAL = 1.0
#: "Redis memory per registered instance (offline): 635 B"; "Redis memory per online agent: 463 B"
REDIS_BYTES_PER_INSTANCE = 635
REDIS_BYTES_PER_AGENT = 463
#: "Redis CPU per cross-node frame (one PUBLISH, 220 B, one subscriber): 11.6 µs" (redis-benchmark)
REDIS_PUBLISH_US = 11.6
#: "The sums", Redis commands: "every chunk whose caller and agent are on different nodes is one
#: PUBLISH on the caller's node's inbox", "~300 B per enveloped frame ... into Redis and as much out"
PUBLISH_PER_CHUNK = 1.0
FRAME_BYTES = 300
#: The per-request figures include a 5-chunk answer: 5 content events and the finish event.
REQUEST_EVENTS = 6
#: The load the doc plans for ("The load to plan for", "The sums"): 10,000 streams at 20 tokens/s,
#: 1,000,000 registered instances, 100,000 online; relay nodes run at most 60 % busy, a Redis shard
#: "comfortably" at 50 %.
PLAN_STREAMS = 10_000
PLAN_RATE = 20.0
PLAN_REGISTERED = 1_000_000
PLAN_ONLINE = 100_000
PLAN_RELAY_BUSY = 0.6
PLAN_SHARD_BUSY = 0.5

#: How far measured may be from predicted (as a factor either way) and still be MET, by kind:
#: * cpu: CPU time.  Single runs on this shared 2-core machine move by ±30 % (bench/README.md), the
#:   model's figures are single runs too, on one Redis server rather than a cluster: 2x is outside
#:   anything noise has produced, so a miss means the cost differs.
#: * bytes: memory and traffic.  No scheduling noise, but allocator size classes, encodings
#:   (listpack vs hash table) and a few hundred bytes of unrelated traffic in a window: 1.5x.
#: * count: commands per request, per chunk, per interval.  Deterministic for given code; 1.25x
#:   leaves room for timing-dependent ones (a credit frame per window, a retried script load).
BANDS = {"cpu": 2.0, "bytes": 1.5, "count": 1.25}

DEFAULTS: dict[str, Any] = {
    "agents": 1000,  # idle agents on node B
    "instances": 3000,  # registered instances (the first ``agents`` of them get an idle agent)
    "streams": 50,  # concurrent cross-node streams
    "chunks": 100,  # chunks per stream
    "rate": 20.0,  # chunks/s per stream
    "requests": 100,  # sequential cross-node requests for the per-request figures
    "fast_chunks": 400,  # the second stream run: the pace of the model's own measurement (its cpu phase)
    "fast_rate": 100.0,
    "size": 16,  # content characters per chunk (176-byte events, as the model's figures)
    "replicas": True,  # keep the cluster's replicas (--cluster-no-replicas kills them)
}
QUICK = {"agents": 10, "instances": 30, "streams": 4, "chunks": 10, "rate": 50.0, "requests": 10, "fast_chunks": 20,
         "fast_rate": 200.0}
#: Commands the phase itself sends to the masters (left out of every count).
#: ``replconf``: the replicas' acknowledgements, no client's command.  (The phase's own connections are
#: opened before the first window, so their handshakes are not counted; the relay's PINGs are.)
OWN_COMMANDS = {"info", "dbsize", "cluster|info", "role", "replconf"}
#: Other processes on the machine using more than this many cores make a window's figures suspect.
FOREIGN_CORES_WARN = 0.15
REROLLS = 6  # restarts of node B at most, to get its inbox on another shard than A's


class Skip(Exception):
    """A piece the phase needs is missing; the reason is what the run prints."""


# -- options --------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster phase (optional, --phases cluster; see bench/README.md)")
    g.add_argument("--cluster-agents", type=int, metavar="N",
                   help=f"idle agents on node B (default {DEFAULTS['agents']})")
    g.add_argument("--cluster-instances", type=int, metavar="N",
                   help=f"registered instances, at least --cluster-agents (default {DEFAULTS['instances']})")
    g.add_argument("--cluster-streams", type=int, metavar="M",
                   help=f"concurrent cross-node streams (default {DEFAULTS['streams']})")
    g.add_argument("--cluster-chunks", type=int, metavar="N",
                   help=f"chunks per stream (default {DEFAULTS['chunks']})")
    g.add_argument("--cluster-rate", type=float, metavar="R",
                   help=f"chunks/s per stream (default {DEFAULTS['rate']:g})")
    g.add_argument("--cluster-requests", type=int, metavar="N",
                   help=f"sequential cross-node requests (default {DEFAULTS['requests']})")
    g.add_argument("--cluster-no-replicas", action="store_true",
                   help="kill the three replicas once the cluster has formed (masters only)")


def options(args: argparse.Namespace, quick: bool = False) -> dict[str, Any]:
    cfg = dict(DEFAULTS)
    if quick:
        cfg.update(QUICK)
    given = {"agents": args.cluster_agents, "instances": args.cluster_instances, "streams": args.cluster_streams,
             "chunks": args.cluster_chunks, "rate": args.cluster_rate, "requests": args.cluster_requests}
    cfg.update({k: v for k, v in given.items() if v is not None})
    if args.cluster_no_replicas:
        cfg["replicas"] = False
    cfg["instances"] = max(cfg["instances"], cfg["agents"])
    return cfg


# -- the masters, as INFO sees them ---------------------------------------------------------------------


class Shards:
    """Per-master counters of a ``ClusterSet`` (masters as they were when it formed)."""

    def __init__(self, cs: Any, replicas: list[Any]):
        self.cs = cs
        self.masters = cs.masters()
        self.replicas = replicas

    def port_of(self, key: str) -> str:
        """The port of the master holding ``key``'s slot (a string: JSON keys are)."""
        return str(self.cs.master_for_key(key).port)

    def snap(self) -> dict[str, Any]:
        out: dict[str, dict[str, Any]] = {}
        for m in self.masters:
            c = self.cs.client(m)
            cpu, mem, stats = c.info("cpu"), c.info("memory"), c.info("stats")
            calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in c.info("commandstats").items()}
            cluster = self.cs.cluster_info(m)
            out[str(m.port)] = {
                "cpu": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
                "calls": calls,
                "used_memory": int(mem["used_memory"]),
                "data_memory": _data_memory(mem),
                "memory_fields": {f: int(mem.get(f, 0)) for f in MEMORY_FIELDS},
                "keys": int(c.dbsize()),
                # client traffic: the totals less replication
                "net_in": int(stats["total_net_input_bytes"]) - int(stats.get("total_net_repl_input_bytes", 0)),
                "net_out": int(stats["total_net_output_bytes"]) - int(stats.get("total_net_repl_output_bytes", 0)),
                "publishshard_sent": int(cluster.get("cluster_stats_messages_publishshard_sent", 0)),
            }
        replica_cpu = 0.0
        for r in self.replicas:
            with contextlib.suppress(Exception):
                info = self.cs.client(r).info("cpu")
                replica_cpu += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        return {"t": time.perf_counter(), "masters": out, "replica_cpu": replica_cpu}


#: INFO memory fields kept in the JSON (deltas), to see where a memory figure comes from.
MEMORY_FIELDS = ("used_memory", "used_memory_overhead", "used_memory_dataset", "mem_clients_normal",
                 "mem_clients_slaves", "mem_cluster_links", "used_memory_scripts", "mem_replication_backlog",
                 "mem_total_replication_buffers")


def _data_memory(mem: dict[str, Any]) -> int:
    """``used_memory`` less what follows connections and history rather than keys: the clients' and the
    cluster links' buffers, the script cache (filled on first use), and the replication buffers (in 7.0
    the backlog grows with every write until it reaches repl-backlog-size, 1 MB)."""
    def f(name: str) -> int:
        return int(mem.get(name, 0))

    replication = max(f("mem_total_replication_buffers"), f("mem_replication_backlog") + f("mem_clients_slaves"))
    return (f("used_memory") - f("mem_clients_normal") - f("mem_cluster_links") - f("used_memory_scripts")
            - replication)


def _delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """What happened on each master between two snapshots (the phase's own commands left out)."""
    masters = {}
    for port, x in b["masters"].items():
        w = a["masters"][port]
        calls = {k: v - w["calls"].get(k, 0) for k, v in x["calls"].items() if k not in OWN_COMMANDS}
        masters[port] = {
            "cpu_s": x["cpu"] - w["cpu"],
            "calls": {k: v for k, v in calls.items() if v},
            **{k: x[k] - w[k] for k in ("used_memory", "data_memory", "keys", "net_in", "net_out",
                                         "publishshard_sent")},
            "memory_fields": {f: v - w["memory_fields"][f] for f, v in x["memory_fields"].items()},
        }
    return {"wall_s": b["t"] - a["t"], "masters": masters, "replica_cpu_s": b["replica_cpu"] - a["replica_cpu"]}


def _net(d: dict[str, Any], idle: dict[str, Any]) -> dict[str, Any]:
    """``d`` less what the idle window's rates account for over the same wall time."""
    k = d["wall_s"] / idle["wall_s"]
    masters = {}
    for port, x in d["masters"].items():
        i = idle["masters"][port]
        calls = {c: v - k * i["calls"].get(c, 0) for c, v in x["calls"].items()}
        masters[port] = {**x, "cpu_s": x["cpu_s"] - k * i["cpu_s"], "calls": calls,
                         "net_in": x["net_in"] - k * i["net_in"], "net_out": x["net_out"] - k * i["net_out"]}
    return {**d, "masters": masters, "replica_cpu_s": d["replica_cpu_s"] - k * idle["replica_cpu_s"]}


def _fields(d: dict[str, Any]) -> dict[str, int]:
    """The INFO memory deltas, summed over the masters."""
    return {f: sum(m["memory_fields"][f] for m in d["masters"].values()) for f in MEMORY_FIELDS}


def _sum(d: dict[str, Any], field: str) -> float:
    return float(sum(m[field] for m in d["masters"].values()))


def _calls(d: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in d["masters"].values():
        for c, v in m["calls"].items():
            out[c] = out.get(c, 0) + v
    return out


def _foreign(window: Any) -> float:
    """Cores the machine was busy with beyond the processes ``window`` follows (another job on a shared host)."""
    return round(window.machine_busy_cores - sum(window.used.values()) / max(window.wall, 1e-9), 2)


def _cpu_net(window: Any, idle: Any, name: str) -> float:
    """A process's CPU seconds in ``window`` less its idle rate over the same wall time."""
    return window.used.get(name, 0.0) - idle.used.get(name, 0.0) * window.wall / max(idle.wall, 1e-9)


# -- the phase ------------------------------------------------------------------------------------------


async def run_phase(bench: Any) -> None:
    """Measure; results in ``bench.results["cluster"]``."""
    cfg = bench.o.cluster or dict(DEFAULTS)
    started: list[Any] = []
    cs: Any = None
    try:
        cs, replicas = await _start_cluster(bench, cfg)
        out = await _measure(bench, cfg, cs, replicas, started)
    except Skip as why:
        out = {"status": "skipped", "reason": str(why)}
        bench.say(f"cluster: skipped ({why})")
    except BaseException:
        for proc in started:
            if not proc.alive():
                bench.say(f"{proc.name} exited with {proc.popen.returncode}; log tail:\n{proc.tail()}")
        raise
    finally:
        for proc in reversed(started):
            bench.group.stop(proc)
        for name in ("cl_relay_a", "cl_relay_b", "cl_agent", "cl_idle", "upstream"):
            bench.procs.pop(name, None)
            bench.ports.pop(name, None)
            bench.restart.pop(name, None)
        if cs is not None:
            await asyncio.to_thread(cs.stop)
    bench.results["cluster"] = out


async def _start_cluster(bench: Any, cfg: dict[str, Any]) -> tuple[Any, list[Any]]:
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if missing:
        raise Skip(f"{', '.join(missing)} not installed (apt-get install redis-server redis-tools)")
    from bench.procs import REPO

    if str(REPO) not in sys.path:  # the test package sits beside bench/
        sys.path.insert(0, str(REPO))
    try:
        from tests.redis_servers import ClusterSet
    except ImportError as exc:  # the test package needs the dev extras (pytest)
        raise Skip(f"tests.redis_servers does not import ({exc}); pip install -e '.[dev]'") from None
    bench.say("cluster: starting 3 masters + 3 replicas (tests.redis_servers.ClusterSet)")
    cs = await asyncio.to_thread(lambda: ClusterSet(bench.work / "cluster").start())
    replicas = [n for n in cs.live() if not cs.is_master(n)]
    if not cfg["replicas"]:
        for r in replicas:
            cs.kill(r)
        replicas = []
        bench.say("cluster: replicas killed (--cluster-no-replicas)")
    return cs, replicas


async def _node_id(port: int) -> str:
    body = await _get(port, "/metrics")
    found = re.search(rb'relay_node_info\{[^}]*node_id="([^"]+)"', body)
    if found is None:
        raise RuntimeError(f"no relay_node_info in the /metrics of the node on port {port}")
    return found.group(1).decode()


async def _round_trips(port: int) -> float:
    body = await _get(port, "/metrics")
    found = re.search(rb"^relay_redis_round_trips_total ([0-9.e+]+)", body, re.M)
    return float(found.group(1)) if found else float("nan")


async def _get(port: int, path: str) -> bytes:
    from bench import loadgen as lg

    async with lg.HTTPConnection(HOST, port) as conn:
        result = await conn.request("GET", path)
    return result.body or b""


async def _measure(bench: Any, cfg: dict[str, Any], cs: Any, replicas: list[Any],
                   started: list[Any]) -> dict[str, Any]:
    from bench import loadgen as lg
    from bench.procs import CpuWindow, connector_command, rss_bytes
    from relay.store import keys

    o = bench.o
    shards = Shards(cs, replicas)
    a, b = "cl_relay_a", "cl_relay_b"
    started.append(bench.start_upstream())
    started.append(bench.start_relay(a, cs.url))
    started.append(bench.start_relay(b, cs.url))
    await bench.wait_http("upstream", "/v1/models")
    await bench.wait_http(a)
    await bench.wait_http(b)
    ids = {a: await _node_id(bench.ports[a])}
    inbox_a = shards.port_of(keys.inbox(ids[a]))
    rerolls = 0
    while True:
        ids[b] = await _node_id(bench.ports[b])
        if shards.port_of(keys.inbox(ids[b])) != inbox_a or rerolls >= REROLLS:
            break
        rerolls += 1
        bench.say(f"cluster: node B's inbox is on A's shard; restarting B for another node id ({rerolls})")
        bench.group.stop(bench.procs[b])
        started.append(bench.start_relay(b, cs.url))
        await bench.wait_http(b)
    topology = {
        "cluster_url": cs.url, "masters": [str(m.port) for m in shards.masters],
        "replicas": [str(r.port) for r in replicas],
        "node_a": ids[a], "node_b": ids[b], "inbox_a_master": inbox_a,
        "inbox_b_master": shards.port_of(keys.inbox(ids[b])),
        "events_channel_master": shards.port_of(keys.EVENTS_CHANNEL), "node_b_restarts": rerolls,
    }

    # The instance the streams go to, its agent on B; its slot on the master that holds neither inbox
    # (registered again until it is), so each shard carries one kind of load: A's inbox the data
    # frames, B's the request and credit frames, the third the instance's scripts.
    third = [str(m.port) for m in shards.masters if str(m.port) not in (inbox_a, topology["inbox_b_master"])]
    for _ in range(20):
        inst, token = await bench.register(a, "cluster-stream")
        if not third or shards.port_of(keys.instance(inst)) == third[0]:
            break
    started.append(bench.start_agent("cl_agent", b, token, cfg["streams"] + 16))
    await bench.wait_online(a, inst, "cl_agent")
    topology["stream_instance_master"] = shards.port_of(keys.instance(inst))
    path = f"/api/chat/{inst}/chat/completions"
    async with lg.HTTPConnection(HOST, bench.ports[a]) as conn:
        probe = await conn.request("POST", path, lg.chat_body(3))
    if not probe.ok:
        raise RuntimeError(f"a cross-node request on the cluster failed: {probe.status} {probe.error}")
    await asyncio.sleep(o.settle)
    measured: dict[str, Any] = {"topology": topology}

    # 1. Redis memory per registered instance.
    n_inst = cfg["instances"]
    bench.say(f"cluster: registering {n_inst} instances through node A")
    s0 = shards.snap()
    t0 = time.perf_counter()
    tokens, inst_ids = await bench.register_many(a, n_inst)
    reg_s = time.perf_counter() - t0
    await asyncio.sleep(o.settle)
    s1 = shards.snap()
    reg = _delta(s0, s1)
    measured["registration"] = {
        "instances": n_inst, "seconds": round(reg_s, 2),
        "memory_fields": _fields(reg),
        "data_bytes_per_instance": round(_sum(reg, "data_memory") / n_inst, 1),
        "used_memory_bytes_per_instance": round(_sum(reg, "used_memory") / n_inst, 1),
        "keys_per_instance": round(_sum(reg, "keys") / n_inst, 2),
        "commands_per_instance": round(sum(_calls(reg).values()) / n_inst, 2),
    }

    pids = {name: bench.procs[name].pid for name in (a, b, "cl_agent", "upstream")}
    pids["loadgen"] = os.getpid()
    # the Redis servers too, so that what other processes used of the machine shows
    pids.update({f"redis_{node.port}": node.process.pid for node in cs.nodes if node.alive()})
    window_s = o.idle_intervals * o.heartbeat_interval

    async def trips() -> tuple[float, float]:
        return await _round_trips(bench.ports[a]), await _round_trips(bench.ports[b])

    async def idle_window(extra: dict[str, int]) -> tuple[Any, dict[str, Any]]:
        trips0, before = await trips(), shards.snap()
        window = CpuWindow({**pids, **extra}).start()
        await asyncio.sleep(window_s)
        window.stop()
        d = _delta(before, shards.snap())
        d["round_trips"] = [y - x for x, y in zip(trips0, await trips(), strict=True)]
        d["other_cores"] = _foreign(window)
        return window, d

    # 2. Idle, no idle agents: the base every later window is taken net of.
    bench.say(f"cluster: idle window, {window_s:g} s, no idle agents")
    idle0_cpu, idle0 = await idle_window({})

    # 3. Idle agents on B.
    n = cfg["agents"]
    tokens_file = bench.work / "cluster-tokens.txt"
    tokens_file.write_text("\n".join(tokens[:n]) + "\n")
    rss0 = rss_bytes(bench.procs[b].pid)
    connector = bench.group.start(
        "cl_idle", [sys.executable, "-m", "bench.agents", "--url",
                    f"ws://{HOST}:{bench.ports[b]}/api/agent/connect", "--tokens", str(tokens_file)],
        stdin=True, stdout_pipe=True)
    bench.procs["cl_idle"] = connector
    started.append(connector)
    bench.say(f"cluster: connecting {n} idle agents to node B")
    s2a = shards.snap()
    grown = await connector_command(connector, {"cmd": "grow", "to": n}, timeout=600)
    await asyncio.sleep(o.heartbeat_interval)  # every agent has sent a heartbeat
    s2 = shards.snap()
    rss1 = rss_bytes(bench.procs[b].pid)
    online, online_connected = await bench.count_online(a, set(inst_ids), set(inst_ids[:n]))
    conn_d = _delta(s2a, s2)
    measured["idle_agents"] = {
        "agents": grown["connected"], "failed": grown["failed"], "connect_s": grown["seconds"],
        "online_listed_by_a": online, "presence_correct": online == online_connected == grown["connected"] == n,
        "data_bytes_per_agent": round(_sum(conn_d, "data_memory") / max(n, 1), 1),
        "used_memory_bytes_per_agent": round(_sum(conn_d, "used_memory") / max(n, 1), 1),
        "keys_per_agent": round(_sum(conn_d, "keys") / max(n, 1), 2),
        "memory_fields": _fields(conn_d),
        "relay_b_rss_kib_per_agent": round((rss1 - rss0) / max(n, 1) / 1024, 2),
        "relay_b_rss_mib": round(rss1 / 2**20, 1),
    }
    measured["idle_agents"]["memory_usage"] = await asyncio.to_thread(
        _memory_usage, cs, inst_ids[:n], inst_ids[n:], keys.node_instances(ids[b]))
    bench.say(f"cluster: idle window, {window_s:g} s, {n} idle agents")
    idle_cpu, idle = await idle_window({"cl_idle": connector.pid})
    b_extra = (idle_cpu.used.get(b, 0) / idle_cpu.wall - idle0_cpu.used.get(b, 0) / idle0_cpu.wall)
    intervals = idle["wall_s"] / o.heartbeat_interval
    measured["idle_agents"].update({
        "relay_b_cpu_us_per_agent_per_s": round(1e6 * b_extra / max(n, 1), 2),
        "heartbeat_interval_s": o.heartbeat_interval,
        "redis_commands_per_node_per_interval": round(sum(_calls(idle0).values()) / intervals / 2, 2),
        "redis_commands_per_node_per_interval_with_agents": round(sum(_calls(idle).values()) / intervals / 2, 2),
        "redis_commands_idle_by_command": {k: round(v / intervals / 2, 2) for k, v in _calls(idle).items()},
        # what the nodes send (a script or a pipeline once), by their own count
        "redis_round_trips_per_node_per_interval": [round(x / intervals, 2) for x in idle["round_trips"]],
        "cpu_s_idle_window": idle_cpu.used, "cpu_s_idle_window_no_agents": idle0_cpu.used,
        "other_cores_idle_windows": [idle0["other_cores"], idle["other_cores"]],
        "master_cpu_pct_idle": {p: round(100 * m["cpu_s"] / idle["wall_s"], 2) for p, m in idle["masters"].items()},
    })

    # 4. Sequential cross-node requests.
    k = cfg["requests"]
    bench.say(f"cluster: {k} sequential requests, caller on A, agent on B")
    trips0, before = await trips(), shards.snap()
    window = CpuWindow({**pids, "cl_idle": connector.pid}).start()
    failed = 0
    async with lg.HTTPConnection(HOST, bench.ports[a]) as conn:
        for _ in range(k):
            result = await conn.request("POST", path, lg.chat_body(REQUEST_EVENTS - 1))
            if not (result.ok and result.events == REQUEST_EVENTS):
                failed += 1
    window.stop()
    req = _net(_delta(before, shards.snap()), idle)
    trips1 = await trips()
    # less what each node's own loops sent meanwhile, at the idle window's rate
    net_trips = [(y - x - i * req["wall_s"] / idle["wall_s"]) / k
                 for x, y, i in zip(trips0, trips1, idle["round_trips"], strict=True)]
    req_calls = _calls(req)
    measured["requests"] = {
        "requests": k, "failed": failed, "wall_s": round(window.wall, 2), "other_cores": _foreign(window),
        "relay_a_ms": round(1e3 * _cpu_net(window, idle_cpu, a) / k, 3),
        "relay_b_ms": round(1e3 * _cpu_net(window, idle_cpu, b) / k, 3),
        "agent_ms": round(1e3 * _cpu_net(window, idle_cpu, "cl_agent") / k, 3),
        "redis_ms": round(1e3 * _sum(req, "cpu_s") / k, 4),
        "redis_ms_by_master": {p: round(1e3 * m["cpu_s"] / k, 4) for p, m in req["masters"].items()},
        "redis_commands": round(sum(req_calls.values()) / k, 2),
        "redis_commands_by_command": {c: round(v / k, 2) for c, v in sorted(req_calls.items(), key=lambda x: -x[1])
                                      if abs(v) / k >= 0.05},
        "round_trips_a": round(net_trips[0], 2), "round_trips_b": round(net_trips[1], 2),
        "bytes_in": round(_sum(req, "net_in") / k), "bytes_out": round(_sum(req, "net_out") / k),
        "replica_cpu_ms": round(1e3 * req["replica_cpu_s"] / k, 4),
    }
    await asyncio.sleep(o.settle)

    # 5. Concurrent cross-node streams: at the planned 20 chunks/s per stream, then at the pace the
    # model's unit costs were measured at (100/s), since a cost per frame falls as the frames per
    # second a process handles rise (more of them share each wake-up, each read, each write).
    req_m = measured["requests"]

    async def stream_run(m_streams: int, chunks: int, rate: float) -> dict[str, Any]:
        bench.say(f"cluster: {m_streams}x{chunks}@{rate:g}/s, caller on A, agent on B")
        before = shards.snap()
        window = CpuWindow({**pids, "cl_idle": connector.pid}).start()
        res = await lg.run_concurrent(HOST, bench.ports[a], path, m_streams, chunks, rate, size=cfg["size"],
                                      ramp=1.0, timeout=max(20.0, 3 * chunks / rate + 15))
        window.stop()
        raw = _delta(before, shards.snap())
        st = _net(raw, idle)
        n_chunks = max(res.completed * (chunks + 1), 1)
        st_calls = _calls(st)
        per_master = {}
        for port, x in st["masters"].items():
            spub = x["calls"].get("spublish", 0)
            per_master[port] = {
                "cpu_us_per_chunk": round(1e6 * x["cpu_s"] / n_chunks, 2),
                "cpu_pct": round(100 * raw["masters"][port]["cpu_s"] / raw["wall_s"], 2),
                "spublish": spub,
                "spublish_per_s": round(spub / raw["wall_s"], 1),
                "cpu_us_per_spublish": round(1e6 * x["cpu_s"] / spub, 2) if spub >= 1 else None,
                "bytes_in_per_chunk": round(x["net_in"] / n_chunks, 1),
                "bytes_out_per_chunk": round(x["net_out"] / n_chunks, 1),
                "publishshard_sent": x["publishshard_sent"],
                "commands_per_chunk": {c: round(v / n_chunks, 3) for c, v in x["calls"].items()
                                       if abs(v) / n_chunks >= 0.005},
            }
        # the chunks alone: the run less its requests at the sequential run's cost (which covered 6 events)
        pure = max(n_chunks - res.completed * REQUEST_EVENTS, 1)

        def chunk_only(total_s: float, per_request_ms: float) -> float:
            return 1e6 * (total_s - res.completed * per_request_ms / 1e3) / pure

        relay_a_s, relay_b_s = _cpu_net(window, idle_cpu, a), _cpu_net(window, idle_cpu, b)
        return {
            "streams": m_streams, "chunks_per_stream": chunks, "rate": rate, "completed": res.completed,
            "errors": res.errors, "error_samples": res.error_samples, "wall_s": round(window.wall, 2),
            "chunks": n_chunks, "chunks_per_s": round(n_chunks / window.wall),
            "machine_busy_cores": window.machine_busy_cores, "other_cores": _foreign(window),
            "p99_ttfc_ms": _ms(lg.percentile(res.ttfc, 99)), "p99_excess_ms": _ms(lg.percentile(res.excess, 99)),
            "relay_a_us_per_chunk": round(1e6 * relay_a_s / n_chunks, 2),
            "relay_b_us_per_chunk": round(1e6 * relay_b_s / n_chunks, 2),
            "agent_us_per_chunk": round(1e6 * _cpu_net(window, idle_cpu, "cl_agent") / n_chunks, 2),
            "relay_ab_us_per_chunk_only": round(chunk_only(relay_a_s, req_m["relay_a_ms"])
                                                + chunk_only(relay_b_s, req_m["relay_b_ms"]), 2),
            "redis_us_per_chunk": round(1e6 * _sum(st, "cpu_s") / n_chunks, 2),
            "redis_us_per_chunk_only": round(chunk_only(_sum(st, "cpu_s"), req_m["redis_ms"]), 2),
            "replica_us_per_chunk": round(1e6 * st["replica_cpu_s"] / n_chunks, 2),
            "spublish_per_chunk": round(st_calls.get("spublish", 0) / n_chunks, 3),
            "redis_commands_per_chunk": {c: round(v / n_chunks, 3)
                                         for c, v in sorted(st_calls.items(), key=lambda x: -x[1])
                                         if abs(v) / n_chunks >= 0.005},
            "bytes_in_per_chunk": round(_sum(st, "net_in") / n_chunks, 1),
            "bytes_out_per_chunk": round(_sum(st, "net_out") / n_chunks, 1),
            "per_master": per_master,
            "cpu_s": window.used,
        }

    measured["streams"] = await stream_run(cfg["streams"], cfg["chunks"], cfg["rate"])
    await asyncio.sleep(o.settle)
    measured["streams_fast"] = await stream_run(cfg["streams"], cfg["fast_chunks"], cfg["fast_rate"])
    snap = shards.snap()["masters"]
    measured["spread"] = {
        "keys": {p: x["keys"] for p, x in snap.items()},
        "data_memory": {p: x["data_memory"] for p, x in snap.items()},
        "used_memory": {p: x["used_memory"] for p, x in snap.items()},
        "spublish_streams": {p: x["spublish"] for p, x in measured["streams"]["per_master"].items()},
    }
    await connector_command(connector, {"cmd": "stop"}, timeout=120)

    checks = _checks(cfg, measured, o.heartbeat_interval)
    return {"status": "ok", "config": cfg, "heartbeat_interval_s": o.heartbeat_interval,
            "idle_window_s": window_s, **measured, "checks": checks,
            "headroom": {"at_rate": _headroom(measured, "streams"),
                         "at_fast_rate": _headroom(measured, "streams_fast")}}


def _memory_usage(cs: Any, online: list[str], offline: list[str], node_set: str,
                  sample: int = 20) -> dict[str, float | None]:
    """``MEMORY USAGE ... SAMPLES 0`` of the keys an online agent adds to or grows, averaged over a few
    instances: where the per-agent memory goes (its ``agents`` hash, its instance hash growing by the
    ``models`` and ``last_seen`` fields, one member of the node's ``nodeinst`` set)."""
    from relay.store import keys

    def usage(key: str) -> int:
        return int(cs.client(cs.master_for_key(key)).memory_usage(key, samples=0) or 0)

    def mean(ids: list[str], key: Any) -> float | None:
        picked = ids[:sample]
        return round(sum(usage(key(i)) for i in picked) / len(picked), 1) if picked else None

    return {
        "agents_hash": mean(online, keys.agents),
        "instance_hash_online": mean(online, keys.instance),
        "instance_hash_offline": mean(offline, keys.instance),
        "node_set_per_agent": round(usage(node_set) / len(online), 1) if online else None,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


# -- model vs measurement ---------------------------------------------------------------------------------


def predicted_per_chunk(chunk_us: float, request_ms: float, events: int) -> float:
    """The model's cost per chunk of a stream of ``events`` events: the per-chunk figure, plus the
    per-request figure (less the 5-chunk answer it includes) spread over the stream's events."""
    return chunk_us + (request_ms * 1e3 - REQUEST_EVENTS * chunk_us) / events


def _check(label: str, predicted: float | None, measured: float | None, unit: str, kind: str,
           note: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {"quantity": label, "predicted": predicted, "measured": measured, "unit": unit,
                           "kind": kind, "note": note, "ratio": None, "met": None}
    if predicted is not None and measured is not None and predicted > 0:
        row["ratio"] = round(measured / predicted, 2)
        factor = BANDS.get(kind)
        if factor is not None:
            row["band"] = [round(1 / factor, 2), factor]
            row["met"] = 1 / factor <= measured / predicted <= factor
    return row


def _checks(cfg: dict[str, Any], m: dict[str, Any], heartbeat: float) -> list[dict[str, Any]]:
    st, fast, rq, ia, rg = m["streams"], m["streams_fast"], m["requests"], m["idle_agents"], m["registration"]
    inbox_a = m["topology"]["inbox_a_master"]
    slow_at, fast_at = f"@{st['rate']:g}/s", f"@{fast['rate']:g}/s"

    def per_spublish(run: dict[str, Any]) -> float | None:
        return run["per_master"].get(inbox_a, {}).get("cpu_us_per_spublish")

    rows = [
        _check("streams completed (of M, both runs)", float(st["streams"] + fast["streams"]),
               float(st["completed"] + fast["completed"]), "", "exact"),
        _check(f"relay A CPU per cross-node chunk {slow_at}",
               round(predicted_per_chunk(RELAY_A_CHUNK_US, RELAY_A_REQUEST_MS, st["chunks_per_stream"] + 1), 1),
               st["relay_a_us_per_chunk"], "µs", "cpu", "79 µs + its request's share"),
        _check(f"relay B CPU per cross-node chunk {slow_at}",
               round(predicted_per_chunk(RELAY_B_CHUNK_US, RELAY_B_REQUEST_MS, st["chunks_per_stream"] + 1), 1),
               st["relay_b_us_per_chunk"], "µs", "cpu", "112 µs + its request's share"),
        _check(f"relay A+B CPU per chunk, requests out, {slow_at}", RELAY_A_CHUNK_US + RELAY_B_CHUNK_US,
               st["relay_ab_us_per_chunk_only"], "µs", "cpu", "less M x the measured per-request CPU"),
        _check(f"relay A+B CPU per chunk, requests out, {fast_at}", RELAY_A_CHUNK_US + RELAY_B_CHUNK_US,
               fast["relay_ab_us_per_chunk_only"], "µs", "cpu", "the pace the model's figure was measured at"),
        _check("relay A CPU per cross-node request", RELAY_A_REQUEST_MS, rq["relay_a_ms"], "ms", "cpu",
               "sequential, 5-chunk answers"),
        _check("relay B CPU per cross-node request", RELAY_B_REQUEST_MS, rq["relay_b_ms"], "ms", "cpu"),
        _check(f"Redis CPU per chunk, all masters, {slow_at}",
               round(predicted_per_chunk(REDIS_CHUNK_US, REDIS_REQUEST_MS, st["chunks_per_stream"] + 1), 1),
               st["redis_us_per_chunk"], "µs", "cpu", "17.5 µs + its request's share"),
        _check(f"Redis CPU per chunk, requests out, {slow_at}", REDIS_CHUNK_US, st["redis_us_per_chunk_only"], "µs",
               "cpu"),
        _check(f"Redis CPU per chunk, requests out, {fast_at}", REDIS_CHUNK_US, fast["redis_us_per_chunk_only"],
               "µs", "cpu"),
        _check(f"Redis CPU per SPUBLISH, A's inbox shard, {slow_at}", REDIS_PUBLISH_US, per_spublish(st), "µs",
               "cpu", "bare PUBLISH in redis-benchmark"),
        _check(f"Redis CPU per SPUBLISH, A's inbox shard, {fast_at}", REDIS_PUBLISH_US, per_spublish(fast), "µs",
               "cpu"),
        _check("Redis CPU per cross-node request, all masters", REDIS_REQUEST_MS, rq["redis_ms"], "ms", "cpu"),
        _check(f"SPUBLISH per cross-node chunk {slow_at}", PUBLISH_PER_CHUNK, st["spublish_per_chunk"], "", "count"),
        _check("Redis commands per cross-node request", float(REDIS_COMMANDS_PER_REQUEST), rq["redis_commands"], "",
               "count", "the doc's figure is for one node"),
        _check("Redis bytes in per cross-node request", float(REQUEST_BYTES_IN), float(rq["bytes_in"]), "B", "bytes"),
        _check("Redis bytes out per cross-node request", float(REQUEST_BYTES_OUT), float(rq["bytes_out"]), "B",
               "bytes", "to clients, replication left out"),
        _check(f"Redis bytes in per cross-node chunk {slow_at}", float(FRAME_BYTES), st["bytes_in_per_chunk"], "B",
               "bytes"),
        _check(f"Redis bytes out per cross-node chunk {slow_at}", float(FRAME_BYTES), st["bytes_out_per_chunk"], "B",
               "bytes", "to clients, replication left out"),
        _check("Redis memory per registered instance", float(REDIS_BYTES_PER_INSTANCE),
               rg["data_bytes_per_instance"], "B", "bytes", "used_memory less client/replication buffers"),
        _check("Redis memory per online agent", float(REDIS_BYTES_PER_AGENT), ia["data_bytes_per_agent"], "B",
               "bytes"),
        _check("relay B RSS per idle agent", RSS_PER_IDLE_AGENT_KIB, ia["relay_b_rss_kib_per_agent"], "KiB", "bytes"),
        _check(f"relay B CPU per idle agent (heartbeat {heartbeat:g} s)",
               round(CPU_PER_IDLE_AGENT_US_PER_S * MODEL_HEARTBEAT_S / heartbeat, 2),
               ia["relay_b_cpu_us_per_agent_per_s"], "µs/s", "cpu", "20.7 µs/s at 5 s, scaled by ping rate"),
        _check("Redis round trips per node per heartbeat interval", REDIS_COMMANDS_PER_NODE_INTERVAL,
               max(ia["redis_round_trips_per_node_per_interval"]), "", "count",
               "the busier node, by its relay_redis_round_trips_total"),
        _check("Redis commands per node per heartbeat interval", REDIS_COMMANDS_PER_NODE_INTERVAL,
               ia["redis_commands_per_node_per_interval_with_agents"], "", "count",
               "commandstats: the scripts' own commands included"),
    ]
    rows[0]["met"] = (st["completed"] == st["streams"] and fast["completed"] == fast["streams"]
                      and st["errors"] == fast["errors"] == 0)
    keys = list(m["spread"]["keys"].values())
    total = sum(keys)
    if total:
        mean = total / len(keys)
        # each key's slot is uniform over 16384 (hash tags of random ids), so a master's share is binomial
        # with p = 1/3: busiest/mean stays under 1 + 3 sigma = 1 + 3 sqrt((1-p)/(p K)) but for 1 run in ~100
        limit = 1 + 3 * math.sqrt(2 / total)
        row = _check("keys per master, busiest / mean", 1.0, round(max(keys) / mean, 3), "", "spread",
                     f"{total} keys; MET up to {limit:.3f} (3 sigma)")
        row["met"], row["band"] = max(keys) / mean <= limit, [0, round(limit, 3)]
        rows.append(row)
    for key, at in (("streams", slow_at), ("streams_fast", fast_at)):
        h = _headroom(m, key)
        rows += [
            _check(f"relay cores for the plan, chunk cost {at}", round(h["model"]["relay_cores"], 1),
                   round(h["measured"]["relay_cores"], 1), "", "cpu",
                   f"{PLAN_STREAMS:,} streams at {PLAN_RATE:g}/s, nodes {PLAN_RELAY_BUSY:.0%} busy"),
            _check(f"streams one shard carries at 100 %, cost {at}", _whole(h["model"]["streams_per_shard_100"]),
                   _whole(h["measured"]["streams_per_shard_100"]), "", "cpu", f"{PLAN_RATE:g} tokens/s each"),
            _check(f"shards for {PLAN_STREAMS:,} streams at {PLAN_SHARD_BUSY:.0%}, cost {at}",
                   float(h["model"]["shards"]), float(h["measured"]["shards"]), "", "cpu"),
        ]
    h = _headroom(m, "streams")
    rows.append(_check(f"Redis memory, {PLAN_REGISTERED:,} registered + {PLAN_ONLINE:,} online",
                       round(h["model"]["redis_gb"], 3), round(h["measured"]["redis_gb"], 3), "GB", "bytes"))
    return rows


def _whole(v: float) -> int | None:
    """``v`` rounded, None when infinite (no Redis CPU measured in the window: tiny counts)."""
    return round(v) if math.isfinite(v) else None


def _headroom(m: dict[str, Any], run: str) -> dict[str, Any]:
    """The model's sums for its planned load, with its unit costs and with those of stream run ``run``."""
    st, rg, ia = m[run], m["registration"], m["idle_agents"]
    chunks_per_s = PLAN_STREAMS * PLAN_RATE

    def sums(relay_us: float, redis_us: float, inst_b: float, agent_b: float) -> dict[str, float]:
        per_shard = 1e6 / redis_us if redis_us > 0 else float("inf")
        return {
            "relay_us_per_chunk": relay_us, "redis_us_per_chunk": redis_us,
            "relay_cores": chunks_per_s * relay_us / 1e6 / PLAN_RELAY_BUSY,
            "redis_gb": (PLAN_REGISTERED * inst_b + PLAN_ONLINE * agent_b) / 1e9,
            "chunks_per_s_per_shard_100": per_shard,
            "streams_per_shard_100": per_shard / PLAN_RATE,
            "streams_per_shard_50": PLAN_SHARD_BUSY * per_shard / PLAN_RATE,
            "streams_3_shards_100": 3 * per_shard / PLAN_RATE,
            "streams_3_shards_50": 3 * PLAN_SHARD_BUSY * per_shard / PLAN_RATE,
            "shards": math.ceil(round(chunks_per_s / (PLAN_SHARD_BUSY * per_shard), 3)),
        }

    model = sums(RELAY_A_CHUNK_US + RELAY_B_CHUNK_US, REDIS_CHUNK_US, REDIS_BYTES_PER_INSTANCE,
                 REDIS_BYTES_PER_AGENT)
    measured = sums(st["relay_ab_us_per_chunk_only"], st["redis_us_per_chunk_only"], rg["data_bytes_per_instance"],
                    ia["data_bytes_per_agent"])
    # With two relay nodes the data frames all go to one shard (A's inbox): what it spends per chunk.
    busiest = max(st["per_master"].values(), key=lambda x: x["cpu_us_per_chunk"])
    measured["busiest_shard_us_per_chunk"] = busiest["cpu_us_per_chunk"]
    measured["busiest_shard_spublish_per_s"] = busiest["spublish_per_s"]
    measured["streams_busiest_shard_100"] = (1e6 / busiest["cpu_us_per_chunk"] / PLAN_RATE
                                             if busiest["cpu_us_per_chunk"] > 0 else float("inf"))
    return {"rate": st["rate"], "chunks_per_s": st["chunks_per_s"],
            "model": {k: round(v, 3) for k, v in model.items()},
            "measured": {k: round(v, 3) for k, v in measured.items()}}


# -- output -----------------------------------------------------------------------------------------------


def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _foreign_summary(c: dict[str, Any]) -> dict[str, float]:
    """Cores used by processes other than the phase's, per measuring window."""
    idle = c["idle_agents"].get("other_cores_idle_windows", [0.0, 0.0])
    return {"idle": idle[0], "idle+agents": idle[1], "requests": c["requests"].get("other_cores", 0.0),
            "streams": c["streams"].get("other_cores", 0.0), "fast streams": c["streams_fast"].get("other_cores", 0.0)}


def table_lines(results: dict[str, Any]) -> list[str]:
    """The phase's section of the printed table (nothing when it was not asked for)."""
    c = results.get("cluster")
    if not c:
        return []
    if c.get("status") != "ok":
        return [f"cluster: skipped ({c.get('reason')})"]
    cfg, t, st, fast = c["config"], c["topology"], c["streams"], c["streams_fast"]
    lines = [
        "",
        (f"Redis Cluster, 3 masters{' + 3 replicas' if cfg['replicas'] else ''}; relay A, B; "
         f"{c['idle_agents']['agents']} idle agents on B; {cfg['instances']} instances; "
         f"{cfg['requests']} sequential requests; streams A -> B {st['streams']}x{st['chunks_per_stream']}"
         f"@{st['rate']:g}/s ({st['chunks_per_s']:,} chunks/s) and {fast['streams']}x{fast['chunks_per_stream']}"
         f"@{fast['rate']:g}/s ({fast['chunks_per_s']:,} chunks/s); heartbeat {c['heartbeat_interval_s']:g} s"),
        (f"  inboxes: A's on master {t['inbox_a_master']}, B's on {t['inbox_b_master']}; stream instance on "
         f"{t['stream_instance_master']}; machine busy cores {st['machine_busy_cores']} and "
         f"{fast['machine_busy_cores']}"),
        f"  {'quantity':<58}{'predicted':>10}{'measured':>10}{'ratio':>7}  verdict",
    ]
    foreign = _foreign_summary(c)
    if max(foreign.values()) > FOREIGN_CORES_WARN:
        lines.insert(3, "  WARNING: other processes kept the machine busy (cores, by window: "
                        + ", ".join(f"{k} {v:g}" for k, v in foreign.items()) + "): CPU figures are inflated")
    for row in c["checks"]:
        mark = {True: "MET", False: "MISSED", None: "-"}[row["met"]]
        band = row.get("band")
        band_s = f" ({band[0]:g}-{band[1]:g}x)" if band and row["kind"] != "spread" else (
            f" (<= {band[1]:g})" if band else "")
        unit = f" {row['unit']}" if row["unit"] else ""
        lines.append(f"  {(row['quantity'] + unit):<58}{_f(row['predicted']):>10}{_f(row['measured']):>10}"
                     f"{_f(row['ratio']):>7}  {mark}{band_s}")
    lines.append("  per master, net of idle:  port   µs/chunk  SPUBLISH/s  µs/SPUBLISH     keys  data MiB"
                 f"   ({st['rate']:g}/s | {fast['rate']:g}/s)")
    for port, x in st["per_master"].items():
        y = fast["per_master"][port]
        lines.append(f"  {'':<24}{port:>6}  {_f(x['cpu_us_per_chunk']):>5}|{_f(y['cpu_us_per_chunk']):<5}"
                     f"{x['spublish_per_s']:>6.0f}|{y['spublish_per_s']:<6.0f}"
                     f"{_f(x['cpu_us_per_spublish']):>6}|{_f(y['cpu_us_per_spublish']):<6}"
                     f"{c['spread']['keys'][port]:>6}  {c['spread']['data_memory'][port] / 2**20:>8.2f}")
    for key in ("at_rate", "at_fast_rate"):
        h = c["headroom"][key]
        hm = h["measured"]
        lines.append(
            f"  headroom at {hm['redis_us_per_chunk']:.1f} µs of Redis per cross-node chunk (measured at "
            f"{h['chunks_per_s']:,} chunks/s): one shard carries {hm['streams_per_shard_100']:,.0f} streams at "
            f"{PLAN_RATE:g} tok/s at 100 % of a core ({hm['streams_per_shard_50']:,.0f} at 50 %), 3 shards "
            f"{hm['streams_3_shards_100']:,.0f} ({hm['streams_3_shards_50']:,.0f}) once many nodes spread the "
            f"inboxes; with 2 nodes the shard of A's inbox ({hm['busiest_shard_us_per_chunk']:.1f} µs/chunk) "
            f"caps it at {hm['streams_busiest_shard_100']:,.0f}")
    ia, rq = c["idle_agents"], c["requests"]
    lines.append(f"  presence: {ia['online_listed_by_a']} of {ia['agents']} idle agents listed online by A"
                 f" ({'ok' if ia['presence_correct'] else 'WRONG'}); round trips per request A {rq['round_trips_a']}"
                 f", B {rq['round_trips_b']}; per node per interval, idle: round trips "
                 f"{ia['redis_round_trips_per_node_per_interval']}, commands {ia['redis_commands_idle_by_command']}")
    mu = ia.get("memory_usage", {})
    if mu:
        lines.append(f"  per online agent (MEMORY USAGE): agents hash {_f(mu['agents_hash'])} B, instance hash "
                     f"{_f(mu['instance_hash_offline'])} -> {_f(mu['instance_hash_online'])} B, node set "
                     f"{_f(mu['node_set_per_agent'])} B/agent")
    return lines
