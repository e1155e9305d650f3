"""Saved agent credentials: one JSON file, mode 0600, keyed by relay URL."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Credentials:
    relay_url: str
    instance_id: str
    agent_token: str
    chat_url: str


def _normalise(relay_url: str) -> str:
    return relay_url.rstrip("/")


def load(path: Path, relay_url: str) -> Credentials | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    entry = data.get(_normalise(relay_url)) if isinstance(data, dict) else None
    if not isinstance(entry, dict):
        return None
    try:
        return Credentials(**entry)
    except TypeError:
        return None


def save(path: Path, creds: Credentials) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[_normalise(creds.relay_url)] = asdict(creds)
    # Create with 0600 from the start (no window where the token is readable),
    # then replace atomically.
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
