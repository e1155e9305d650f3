"""Relay settings: one object per process, from flags or ``RELAY_*`` variables.

``REDIS_URL`` is honoured without the prefix because it is the name every
Redis-backed tool uses.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "instance-relay"


class RelaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RELAY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8080
    #: Redis to use; empty = start an embedded redis-server under ``data_dir``.
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("RELAY_REDIS_URL", "REDIS_URL", "redis_url")
    )
    data_dir: Path = Field(default_factory=default_data_dir)
    #: Base URL printed in chat URLs (set it to the public URL behind a proxy).
    public_url: str | None = None

    #: Seconds between agent heartbeats (told to agents in the handshake).
    heartbeat_interval: float = 5.0
    #: An agent silent this long is dropped and its instance may turn offline;
    #: a node whose liveness key is this old is considered dead.
    heartbeat_timeout: float = 15.0

    #: Seconds a request waits for the model's first chunk before 504.
    first_chunk_timeout: float = 60.0
    #: Seconds allowed between two chunks before the stream ends with an error.
    idle_timeout: float = 60.0
    #: Seconds a client may read nothing before its stream is cut off.
    stall_timeout: float = 30.0
    #: Seconds a draining node (SIGTERM) lets in-flight streams finish.
    drain_timeout: float = 30.0
    #: Seconds a Redis command may take before Redis counts as unreachable
    #: (requests that need it get 503, ``/readyz`` turns 503).  A hung Redis
    #: (frozen, network cut) costs each request this long, so keep it short.
    redis_timeout: float = 5.0
    #: Per-stream flow-control window in bytes (relay memory per slow reader).
    stream_window: int = 256 * 1024
    #: Largest websocket message accepted from an agent.
    max_frame_bytes: int = 4 * 1024 * 1024
    #: Largest HTTP request body accepted.
    max_body_bytes: int = 1024 * 1024

    log_level: str = "info"
    #: "json": one JSON object per line, for log shippers; "plain": human-readable.
    log_format: str = Field(default="plain", pattern="^(plain|json)$")
    #: One INFO line per HTTP request (method, path, status, seconds); health
    #: checks and scrapes that succeed are left out.
    access_log: bool = True

    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"
