"""What ``relay-agent`` shows a person.

``relay-agent run`` on a terminal keeps one live line at the bottom, redrawn
in place twice a second::

    ● online  relay http://127.0.0.1:8080  instance 3f9c0a7e5d1b2c48  served 12  in flight 1

Events (connected, disconnected, registered ...) scroll above it as plain
lines.  When stdout is not a terminal (a service manager, ``docker logs``, a
pipe) there is no live line and no escape codes: just the event lines, one
per event, so logs stay greppable.

``format_status`` renders ``relay-agent status`` (an instance's public status
from the relay) for people; ``--json`` gives the raw object instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import time
from typing import Any, TextIO

from .client import AgentStatus

PREFIX = "relay-agent: "
_CLEAR = "\r\x1b[2K"  # carriage return + erase line (ECMA-48 EL 2)


def status_line(status: AgentStatus, *, color: bool = False) -> str:
    """One line: is this agent serving, through which relay, and how busy it is."""
    if status.connected:
        dot, state = ("\x1b[32m●\x1b[0m" if color else "●"), "online"
    elif not status.last_error:
        dot, state = ("\x1b[33m○\x1b[0m" if color else "○"), "connecting"
    else:
        dot, state = ("\x1b[31m○\x1b[0m" if color else "○"), "offline"
    parts = [f"{dot} {state}", f"relay {status.relay_url}"]
    if status.instance_id:
        parts.append(f"instance {status.instance_id}")
    parts.append(f"served {status.served}")
    if status.failed:
        parts.append(f"failed {status.failed}")
    parts.append(f"in flight {status.inflight}")
    if not status.connected and status.last_error:
        parts.append(f"({status.last_error})")
    return "  ".join(parts)


def _visible_width(text: str) -> int:
    width, skipping = 0, False
    for ch in text:
        if ch == "\x1b":
            skipping = True
        elif skipping:
            skipping = ch != "m"
        else:
            width += 1
    return width


def _fit(text: str, columns: int) -> str:
    """Cut to the terminal width: a wrapped line cannot be redrawn in place."""
    if _visible_width(text) < columns:
        return text
    out, width, skipping = [], 0, False
    for ch in text:
        if ch == "\x1b":
            skipping = True
        if not skipping:
            if width >= columns - 2:
                out.append("…")
                break
            width += 1
        elif ch == "m":
            skipping = False
        out.append(ch)
    return "".join(out) + ("\x1b[0m" if "\x1b" in text else "")


class Console:
    """Event lines always; a live status line too when ``stream`` is a terminal."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None, interval: float = 0.5):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.color = self.live and "NO_COLOR" not in os.environ
        self.interval = interval
        self.status: AgentStatus | None = None
        self._drawn = False

    def attach(self, status: AgentStatus) -> None:
        self.status = status
        self.redraw()

    def event(self, line: str) -> None:
        """Print one event line (the agent's ``on_status`` callback)."""
        self.write_line(f"{PREFIX}{line}")

    def write_line(self, text: str) -> None:
        """A line above the live one (which is cleared, then drawn again below)."""
        if self.live and self._drawn:
            self.stream.write(_CLEAR)
            self._drawn = False
        self.stream.write(text + "\n")
        self.redraw()

    def log_handler(self) -> logging.Handler:
        """Route log records through here, so a warning does not break the live line."""
        return _ConsoleHandler(self)

    def redraw(self) -> None:
        if not self.live or self.status is None:
            self.stream.flush()
            return
        columns = shutil.get_terminal_size((100, 24)).columns
        self.stream.write(_CLEAR + _fit(status_line(self.status, color=self.color), columns))
        self.stream.flush()
        self._drawn = True

    async def run(self) -> None:
        """Keep the live line current (counters change without events)."""
        if not self.live:
            return
        while True:
            await asyncio.sleep(self.interval)
            self.redraw()

    def close(self) -> None:
        if self.live and self._drawn:
            self.stream.write("\n")  # leave the last status on screen
            self._drawn = False
        self.stream.flush()


class _ConsoleHandler(logging.Handler):
    def __init__(self, console: Console):
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.write_line(self.format(record))
        except Exception:
            self.handleError(record)


def _ago(seconds: float) -> str:
    if seconds < 5:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def _when(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
    return f"{stamp} ({_ago(max(0.0, now - ts))})"


def format_status(view: dict[str, Any], *, now: float | None = None) -> str:
    """An instance's public status (``GET /api/instances/{id}``), for a person."""
    now = time.time() if now is None else now
    agents = int(view.get("agents") or 0)
    state = view.get("status", "unknown")
    if state == "online":
        state = f"online, {agents} agent{'s' if agents != 1 else ''} connected"
    rows = [
        ("instance", f"{view.get('instance_id', '?')}  ({view.get('name', '')})"),
        ("status", state),
        ("models", ", ".join(view.get("models") or []) or "-"),
        ("last seen", "now" if view.get("status") == "online" else _when(view.get("last_seen"), now)),
        ("created", _when(view.get("created_at"), now)),
    ]
    if view.get("description"):
        rows.insert(1, ("about", str(view["description"])))
    if view.get("chat_url"):
        rows.append(("chat URL", str(view["chat_url"])))
    if view.get("upgrade"):
        rows.append(("upgrade", f"relay-agent {view['upgrade']} is available: pip install -U instance-relay"))
    return "\n".join(f"{label:<10} {value}" for label, value in rows)
