"""The processes a benchmark run owns, and what /proc says about them.

Every process is started with its output going to a log file in the run's
work directory (never an unread pipe), registered with a :class:`ProcessGroup`
and stopped by it (SIGTERM, then SIGKILL after a grace period), whatever
happens to the run.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raise_fd_limit() -> int:
    """Thousands of agents need thousands of descriptors; children inherit the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else 65536
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def console_script(name: str, module: str) -> list[str]:
    """The installed console script next to this interpreter, else ``python -m module``."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


# -- /proc -------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (its threads included)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    with open("/proc/stat", "rb") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


@dataclass
class CpuWindow:
    """CPU seconds used by named processes (and the machine) between start() and stop()."""

    pids: dict[str, int]
    wall: float = 0.0
    used: dict[str, float] = field(default_factory=dict)
    machine_busy_cores: float = 0.0  # average number of busy cores over the window
    _start: dict[str, float] = field(default_factory=dict, repr=False)
    _t0: float = field(default=0.0, repr=False)
    _m0: tuple[float, float] = field(default=(0.0, 0.0), repr=False)

    def start(self) -> CpuWindow:
        self._start = {name: _safe_cpu(pid) for name, pid in self.pids.items()}
        self._m0 = machine_cpu()
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> CpuWindow:
        self.wall = time.perf_counter() - self._t0
        self.used = {name: round(_safe_cpu(pid) - self._start[name], 3) for name, pid in self.pids.items()}
        busy, _total = machine_cpu()
        self.machine_busy_cores = round((busy - self._m0[0]) / max(self.wall, 1e-9), 2)
        return self

    def as_dict(self) -> dict:
        return {"wall_s": round(self.wall, 3), "cpu_s": self.used, "machine_busy_cores": self.machine_busy_cores}


def _safe_cpu(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


# -- process ownership --------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class ProcessGroup:
    """Starts processes with logs in ``workdir`` and guarantees they are stopped."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[Proc] = []

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        env.update(extra or {})
        return env

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None, *,
              stdin: bool = False, stdout_pipe: bool = False) -> Proc:
        log = self.workdir / f"{name}.log"
        # The child gets its own copy of the descriptor; ours is closed as soon as it has started.
        with open(log, "ab") as log_file:
            popen = subprocess.Popen(
                args,
                env=self.env(env),
                cwd=str(REPO),
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else log_file,
                stderr=log_file,
                start_new_session=True,  # our Ctrl-C must not reach them before we stop them in order
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 10.0) -> None:
        if proc.popen.poll() is None:
            try:
                proc.popen.send_signal(signal.SIGTERM)
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)
            except ProcessLookupError:
                pass
        for stream in (proc.popen.stdin, proc.popen.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/nginx/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def nginx_config(workdir: Path, listen_port: int, upstream_port: int) -> Path:
    """A one-worker reverse proxy with buffering off, as one would put before an SSE service."""
    root = workdir / "nginx"
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
master_process on;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream bench_upstream {{ server 127.0.0.1:{upstream_port}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{listen_port} backlog=4096;
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
""")
    return conf


async def connector_command(proc: Proc, cmd: dict, timeout: float = 60.0) -> dict:
    """One request/answer exchange with the idle-agents connector over its pipes."""
    assert proc.popen.stdin is not None and proc.popen.stdout is not None
    proc.popen.stdin.write(orjson.dumps(cmd) + b"\n")
    proc.popen.stdin.flush()
    loop = asyncio.get_running_loop()
    line = await asyncio.wait_for(loop.run_in_executor(None, proc.popen.stdout.readline), timeout)
    if not line:
        raise RuntimeError(f"idle-agents connector died:\n{proc.tail()}")
    return orjson.loads(line)
