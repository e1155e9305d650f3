"""Sample a running process with py-spy and say where its time goes.

``Profiler(pid, out)`` runs ``py-spy record --format raw`` (collapsed stacks,
one ``frame;frame;... count`` line per distinct stack) for as long as the
``with`` block lasts.  :func:`summarize` turns such a file into the tables the
README quotes: top functions by self samples (where the CPU actually is) and
by inclusive samples (what the time is spent *under*), and self samples
rolled up by library (uvicorn, websockets, starlette, anyio, asyncio, relay,
...).  Idle samples (a thread waiting in epoll) are excluded by py-spy, so
percentages are of busy samples.

Also usable on its own: ``python -m bench.profile FILE.txt``.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::(?P<line>\d+))?\)$")

# Order matters: first match wins.
_LIBRARIES = [
    ("relay", "/relay/"),
    ("agent", "/agent/"),
    ("bench", "/bench/"),
    ("uvicorn", "/uvicorn/"),
    ("starlette", "/starlette/"),
    ("websockets", "/websockets/"),
    ("anyio", "/anyio/"),
    ("httpx", "/httpx/"),
    ("httpcore", "/httpcore/"),
    ("h11", "/h11/"),
    ("redis", "/redis/"),
    ("pydantic", "/pydantic"),
    ("orjson", "orjson"),
    ("uvloop", "uvloop"),
    ("asyncio", "/asyncio/"),
]


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else None


class Profiler:
    """``with Profiler(pid, out_file):`` samples ``pid`` for the block's duration."""

    def __init__(self, pid: int, out: Path, *, rate: int = 250, native: bool = False):
        self.pid, self.out, self.rate, self.native = pid, out, rate, native
        self.proc: subprocess.Popen | None = None
        self.error: str | None = None

    def __enter__(self) -> Profiler:
        exe = py_spy()
        if exe is None:
            self.error = "py-spy not installed"
            return self
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(self.pid), "--rate", str(self.rate), "--format", "raw",
             "--output", str(self.out)] + (["--native"] if self.native else ["--nonblocking"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        time.sleep(0.5)  # let it attach before the load starts
        if self.proc.poll() is not None:
            self.error = (self.proc.stderr.read() or b"").decode(errors="replace")[-500:] if self.proc.stderr else "?"
        return self

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stderr is not None:
            err = proc.stderr.read().decode(errors="replace")
            proc.stderr.close()
            if not self.out.exists():
                self.error = self.error or err[-500:] or "py-spy wrote nothing"


def _parse_frame(frame: str) -> tuple[str, str]:
    """('func (file.py)', library) for one collapsed-stack frame."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), "other"
    path = m.group("file")
    rooted = path if path.startswith("/") else "/" + path  # py-spy shortens to "uvicorn/server.py"
    library = next((name for name, marker in _LIBRARIES if marker in rooted), "other")
    if library == "other" and ("python3" in path or path.startswith("<")):
        library = "stdlib"
    return f"{m.group('func')} ({Path(path).name})", library


def summarize(path: Path, top: int = 15) -> dict:
    """Self / inclusive sample shares per function and self share per library."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    libs: Counter[str] = Counter()
    total = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        parsed = [_parse_frame(f) for f in frames]
        leaf, leaf_lib = parsed[-1]
        self_counts[leaf] += n
        libs[leaf_lib] += n
        for name in {name for name, _ in parsed}:
            incl_counts[name] += n

    def pct(c: Counter[str]) -> list[list]:
        return [[name, round(100 * k / total, 1)] for name, k in c.most_common(top)] if total else []

    return {"samples": total, "self": pct(self_counts), "inclusive": pct(incl_counts), "by_library": pct(libs)}


def format_summary(title: str, summary: dict, top: int = 12) -> str:
    lines = [f"{title}: {summary['samples']} busy samples"]
    lines.append("  self %  (where the CPU is)")
    lines += [f"    {p:5.1f}  {name}" for name, p in summary["self"][:top]]
    lines.append("  inclusive %  (what it runs under)")
    lines += [f"    {p:5.1f}  {name}" for name, p in summary["inclusive"][:top]]
    lines.append("  self % by library: " + ", ".join(f"{name} {p}" for name, p in summary["by_library"]))
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(format_summary(arg, summarize(Path(arg)), top=25))
