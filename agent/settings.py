"""Agent settings: flags override ``AGENT_*`` environment variables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_credentials_path() -> Path:
    return Path.home() / ".config" / "instance-relay" / "agent.json"


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENT_", extra="ignore")

    relay_url: str = "http://127.0.0.1:8080"
    #: Agent token; empty = use saved credentials, or register a new instance.
    token: str | None = None
    backend: Literal["demo", "openai"] = "demo"
    #: OpenAI base URL of the local model, e.g. http://127.0.0.1:11434/v1 (Ollama).
    upstream_url: str | None = None
    upstream_api_key: str | None = None
    #: Model names to serve; empty = ask the upstream's /models (demo: "demo").
    model: str | None = None
    #: Image generation models to serve, comma-separated (openai backend); empty
    #: = none, and the agent does not offer ``images``.  The demo serves its own.
    image_model: str | None = None
    #: Transcription models to serve, comma-separated (openai backend); empty =
    #: none, and the agent does not offer ``transcribe``.  The demo serves its own.
    transcribe_model: str | None = None
    #: The largest audio file (request upload) the agent holds; larger ones are
    #: refused (413) before the relay sends them.  OpenAI's own limit by default.
    max_upload_bytes: int = Field(default=25 * 1024 * 1024, ge=1)
    max_concurrency: int = Field(default=8, ge=1, le=10_000)
    #: Suggested for the instance's conversation (Dify) API; the owner's PATCH wins.
    #: ``variables`` is a JSON list of {key, name, type, required, options, default}.
    introduction: str = ""
    variables: str = ""
    #: Name and description used when registering a new instance.
    name: str = "my-model"
    description: str = ""
    #: The relay's registration key, when it protects registration (RELAY_REGISTRATION_KEY).
    registration_key: str | None = None
    credentials: Path = Field(default_factory=default_credentials_path)
    #: Words per second of the demo model (0 = as fast as possible).
    demo_rate: float = Field(default=20.0, ge=0)
    #: Seconds an upstream request may take to start answering.
    upstream_timeout: float = 600.0
    #: Longest backoff between reconnect attempts.
    max_backoff: float = 30.0

    def parameters(self) -> dict[str, Any]:
        """``hello.parameters``: what was set of ``introduction`` and ``variables``."""
        out: dict[str, Any] = {}
        if self.introduction:
            out["introduction"] = self.introduction
        if self.variables:
            try:
                variables = json.loads(self.variables)
            except ValueError as exc:
                raise ValueError(f"AGENT_VARIABLES / --variables is not JSON: {exc}") from None
            if not isinstance(variables, list):
                raise ValueError("AGENT_VARIABLES / --variables must be a JSON list of variables")
            out["variables"] = variables
        return out

    def primary_relay_url(self) -> str:
        """The first relay URL: where the agent registers and what keys its credentials."""
        return self.relay_url.split(",")[0].strip().rstrip("/")

    def model_names(self) -> list[str]:
        return _names(self.model)

    def image_model_names(self) -> list[str]:
        return _names(self.image_model)

    def transcribe_model_names(self) -> list[str]:
        return _names(self.transcribe_model)


def _names(value: str | None) -> list[str]:
    return [m.strip() for m in (value or "").split(",") if m.strip()]
