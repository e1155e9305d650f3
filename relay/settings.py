"""Relay settings: one object per process, from flags or ``RELAY_*`` variables.

``REDIS_URL`` is honoured without the prefix because it is the name every
Redis-backed tool uses.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Room for a data frame's header next to one window of payload.
FRAME_HEADROOM = 64


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
    #: a node whose liveness was not refreshed for this long is considered dead.
    heartbeat_timeout: float = 15.0

    #: Seconds a request waits for the model's first chunk before 504.
    first_chunk_timeout: float = 60.0
    #: Seconds allowed between two chunks before the stream ends with an error.
    idle_timeout: float = 60.0
    #: Seconds a client may read nothing before its stream is cut off.
    stall_timeout: float = 30.0
    #: Seconds a draining node (SIGTERM) lets in-flight streams finish.
    drain_timeout: float = 30.0
    #: Connections to Redis per node; a burst beyond it waits (up to redis_timeout).
    redis_max_connections: int = 64
    #: Seconds a Redis command may take before Redis counts as unreachable
    #: (requests that need it get 503, ``/readyz`` turns 503).  A hung Redis
    #: (frozen, network cut) costs each request this long, so keep it short.
    redis_timeout: float = 5.0
    #: Per-stream flow-control window in bytes (relay memory per slow reader).
    stream_window: int = 256 * 1024
    #: Largest websocket message accepted from an agent.  An agent's largest
    #: legitimate frame is one window of data (``stream_window``) or a hello at
    #: the declaration caps (~200 KB); each of the ``WS_MAX_QUEUE`` messages a
    #: connection may have waiting can be this large.
    max_frame_bytes: int = 1024 * 1024
    #: Largest HTTP request body accepted.  Images sent inline (data URIs,
    #: SwiftChat's image blocks) count: raise it for callers that send photos.
    max_body_bytes: int = 1024 * 1024
    #: Largest file a caller may upload (audio for transcription; 413 past
    #: it).  The door holds it in memory while it goes to the agent, one
    #: window at a time.
    max_upload_bytes: int = Field(default=15 * 1024 * 1024, ge=1)
    #: Largest non-streamed answer (a chat.completion, generated images) the
    #: relay holds for a caller; past it the request fails with 502.
    max_answer_bytes: int = 64 * 1024 * 1024

    # -- access (see SECURITY.md) ---------------------------------------------
    #: When set, ``POST /api/instances`` needs ``Authorization: Bearer <key>``;
    #: empty = open registration (the demo default).
    registration_key: str | None = None
    #: Origins allowed to call the chat and model endpoints from a browser,
    #: comma-separated; ``*`` = any origin.  Never with credentials.
    cors_origins: str = "*"

    # -- limits: 0 disables a limit ---------------------------------------------
    #: Messages in one chat request (422 ``too_many_messages``).
    max_messages: int = Field(default=256, ge=0)
    #: Characters of text across all messages of one request (422 ``content_too_large``).
    max_content_chars: int = Field(default=500_000, ge=0)
    #: Largest ``max_tokens`` / ``max_completion_tokens`` a caller may ask for (422 ``max_tokens_too_large``).
    max_tokens_cap: int = Field(default=32_768, ge=0)
    #: Streams running at once per instance, across all nodes (429 ``too_many_streams``).
    max_streams_per_instance: int = Field(default=64, ge=0)
    #: Streams running at once per caller (API key, else client IP), across all nodes (429).
    max_streams_per_caller: int = Field(default=8, ge=0)
    #: Chat requests per minute per caller: API key, else client IP (429 + Retry-After).
    rate_per_caller: int = Field(default=60, ge=0)
    #: Chat requests per minute per instance, all callers together (429 + Retry-After).
    rate_per_instance: int = Field(default=600, ge=0)
    #: Registrations per minute per client IP (429 + Retry-After).
    rate_register_per_ip: int = Field(default=10, ge=0)
    #: Frames per second one agent may send, sustained (bursts of twice that); past it: close 1008.
    agent_frames_per_second: int = Field(default=10_000, ge=0)
    #: Bytes per second one agent may send, sustained (bursts of twice that); past it: close 1008.
    agent_bytes_per_second: int = Field(default=64 * 1024 * 1024, ge=0)
    #: Model names one agent may declare (chat, image and transcription together); past it the
    #: handshake is refused, close 1008.  Every view, model list and pick reads them.
    agent_max_models: int = Field(default=256, ge=0)
    #: Characters of one declared model name (hub ids and tags are far shorter); past it: close 1008.
    agent_max_name_chars: int = Field(default=256, ge=0, le=1024)
    #: Agents (replicas) of one instance connected to one node at once; past it: close 1013, the agent retries.
    agents_per_instance: int = Field(default=16, ge=0)

    # -- the HTTP edge (issue 21) ---------------------------------------------------
    #: Bytes of one request's header block: request line, names and values (431 ``headers_too_large``, closed).
    max_header_bytes: int = Field(default=64 * 1024, ge=0)
    #: Seconds a connection has to send a request's whole header block, from its
    #: first byte (or from the connection's start): 408, closed.
    header_timeout: float = Field(default=10.0, ge=0)
    #: Seconds a request body may pause while it is incomplete (408 ``request_timeout``, closed).
    body_timeout: float = Field(default=15.0, ge=0)
    #: Bytes a second a request body must average once its first ``body_timeout``
    #: seconds are spent (408 ``request_timeout``, closed): a 15 MB upload may take
    #: up to ~8 minutes at the default, a trickle cannot hold its connection for ever.
    body_min_rate: int = Field(default=32 * 1024, ge=0)
    #: Bytes of uploads (audio files) this node holds in memory at once, all
    #: callers together: past it 503 ``uploads_busy`` + Retry-After, before reading.
    upload_memory_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    #: Nesting of arrays and objects in a request's JSON body (422 ``json_too_deep``).
    max_json_depth: int = Field(default=64, ge=0)

    # -- conversations (the Dify API; see SECURITY.md) ---------------------------
    #: Seconds a conversation is kept after its last activity.
    conversation_retention: float = Field(default=30 * 24 * 3600, gt=0)
    #: Messages one conversation may hold (422 ``conversation_full``).
    conversation_max_messages: int = Field(default=500, ge=0)
    #: Conversations one caller's user may keep at once (422 ``too_many_conversations``);
    #: without a caller key, also per client address (``user`` is the client's to choose).
    conversations_per_user: int = Field(default=1000, ge=0)
    #: Conversations one instance may keep at once: past it new ones get 422
    #: ``instance_conversations_full``; existing ones continue.
    conversations_per_instance: int = Field(default=10_000, ge=0)
    #: Bytes (queries, answers, names, inputs) one instance's conversations may hold:
    #: past it every new turn gets 422 ``instance_conversations_full``.
    conversation_bytes_per_instance: int = Field(default=64 * 1024 * 1024, ge=0)
    #: Of those, bytes the conversations of one caller (its key, or without one its client
    #: address) may hold: past it its new turns get 422 ``caller_conversations_full``.
    conversation_bytes_per_caller: int = Field(default=8 * 1024 * 1024, ge=0)
    #: Bytes of one query (422 ``message_too_large``) or one stored answer (cut and marked).
    conversation_message_bytes: int = Field(default=256 * 1024, ge=0)
    #: Seconds between saves of an answer still streaming (what a node that dies loses at most).
    conversation_checkpoint_interval: float = Field(default=2.0, gt=0)

    # -- the web dashboard ---------------------------------------------------------
    #: Serve the pages at ``/``, ``/register`` and ``/i/{id}`` (the API works either way).
    dashboard: bool = True
    #: Seconds between reads of the instances browsers follow live (``/api/instances/events``).
    watch_interval: float = Field(default=2.0, gt=0)
    #: Live status streams one node serves at once (503 past it), and per client address (429).
    max_watchers: int = Field(default=2000, ge=1)
    watchers_per_address: int = Field(default=8, ge=1)

    # -- overload (issue 21) -------------------------------------------------------
    #: Seconds of event-loop lag (smoothed, see relay/serving/overload.py) past which new requests
    #: on an agent get 503 ``node_overloaded`` + Retry-After, before any Redis work; streams
    #: in flight are not touched (they slow down).  0 = off.
    shed_lag: float = Field(default=0.5, ge=0)
    #: Streams this node answers or serves at once past which new requests get 503
    #: ``node_overloaded``.  0 = off (the lag limit measures what this machine can carry).
    max_inflight: int = Field(default=0, ge=0)

    log_level: str = "info"
    #: "json": one JSON object per line, for log shippers; "plain": human-readable.
    log_format: str = Field(default="plain", pattern="^(plain|json)$")
    #: One INFO line per HTTP request (method, path, status, seconds); health
    #: checks and scrapes that succeed are left out.
    access_log: bool = True

    @model_validator(mode="after")
    def _window_fits_a_frame(self) -> RelaySettings:
        # Agents send non-streamed bodies in frames of one window each: a
        # window larger than a frame would get every big answer's agent closed.
        if self.stream_window + FRAME_HEADROOM > self.max_frame_bytes:
            raise ValueError(f"stream_window ({self.stream_window}) must be at least {FRAME_HEADROOM} bytes "
                             f"below max_frame_bytes ({self.max_frame_bytes})")
        return self

    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"
