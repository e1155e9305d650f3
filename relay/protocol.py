"""The relay <-> agent wire protocol, sans-I/O.

Nothing here touches a socket: functions turn events into websocket message
payloads (``str`` for text frames, ``bytes`` for binary frames) and back, and
small state objects track each stream and its flow-control window.  The relay
and the agent are thin adapters around this module, and both import it; it
must therefore never import starlette, uvicorn, redis or websockets.

Two kinds of websocket message carry the protocol:

* **Control messages** are text frames holding one JSON object with a ``type``
  field: ``hello``/``welcome`` (handshake), ``request``, ``cancel``, ``end``,
  ``error``, ``ping``/``pong`` (heartbeat), ``goaway``.  They are rare, so
  readability wins over size.

* **Data messages** are binary frames on the hot path: a 5-byte header
  (kind: u8, stream id: u32 big-endian) followed by the payload.  ``DATA``
  (agent -> relay) carries bytes the relay writes to the HTTP client verbatim:
  for a streaming request, one or more complete Server-Sent Events
  (``data: {chunk}\\n\\n``) that the agent has already formatted; for a
  non-streaming request, the ``chat.completion`` JSON body.  The relay never
  parses or re-serialises a chunk: the agent has CPU to spare on the owner's
  machine, the relay is shared by everyone.  ``CREDIT`` (relay -> agent)
  grants the agent more bytes of window for one stream (u32 payload).

Flow control is per stream and counted in payload bytes.  The relay opens
each stream with a window (``request.window``); the agent may send a DATA
frame whenever its remaining credit is positive, and subtracts the payload
size afterwards (so a single chunk larger than the window cannot deadlock).
The relay grants credit back as the HTTP client actually consumes the bytes.
A relay therefore buffers at most ``window + one frame`` per stream.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any, Union

import orjson

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})

#: Default per-stream window the relay grants when a stream opens.
DEFAULT_WINDOW = 256 * 1024

_HEADER = struct.Struct("!BI")
_U32 = struct.Struct("!I")
MAX_STREAM_ID = 2**32 - 1


class CloseCode(enum.IntEnum):
    """Websocket close codes (RFC 6455 s7.4.2 reserves 4000-4999 for applications)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # relay shutting down: reconnect, maybe elsewhere
    PROTOCOL_ERROR = 1002
    POLICY_VIOLATION = 1008  # e.g. the agent floods: more frames or bytes than allowed
    MESSAGE_TOO_BIG = 1009
    UNSUPPORTED_VERSION = 4001  # agent must be upgraded; retrying will not help
    UNAUTHORIZED = 4003  # token unknown, rotated or instance deleted
    REPLACED = 4009  # the same agent id connected again; this session is stale
    HEARTBEAT_TIMEOUT = 4008


class ProtocolError(Exception):
    """A message that does not follow this protocol.

    ``close_code`` is what the receiving side should close the websocket with.
    """

    def __init__(self, message: str, close_code: CloseCode = CloseCode.PROTOCOL_ERROR):
        super().__init__(message)
        self.close_code = close_code


class FrameKind(enum.IntEnum):
    DATA = 1
    CREDIT = 2


# ---------------------------------------------------------------------------
# Events.  Frozen dataclasses: one per message type.


@dataclass(frozen=True, slots=True)
class Hello:
    """Agent -> relay, first message after the websocket opens."""

    protocol: int
    agent_version: str
    agent_id: str
    models: tuple[str, ...]
    max_concurrency: int


@dataclass(frozen=True, slots=True)
class Welcome:
    """Relay -> agent: handshake accepted."""

    protocol: int
    instance_id: str
    node_id: str
    heartbeat_interval: float
    chat_url: str = ""


@dataclass(frozen=True, slots=True)
class Request:
    """Relay -> agent: run one chat completion.

    ``body`` is the validated OpenAI request (model already resolved to one the
    agent serves).  ``stream`` tells the agent whether to send SSE events or one
    JSON body.
    """

    id: int
    body: dict[str, Any]
    stream: bool
    window: int = DEFAULT_WINDOW


@dataclass(frozen=True, slots=True)
class Cancel:
    """Relay -> agent: the caller went away; abort and drop late chunks."""

    id: int
    reason: str = "cancelled"


@dataclass(frozen=True, slots=True)
class Data:
    """Agent -> relay: bytes for the HTTP client, forwarded untouched."""

    id: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Credit:
    """Relay -> agent: the agent may send ``amount`` more payload bytes."""

    id: int
    amount: int


@dataclass(frozen=True, slots=True)
class End:
    """Agent -> relay: the stream finished normally."""

    id: int
    usage: dict[str, Any] | None = None
    model: str | None = None


@dataclass(frozen=True, slots=True)
class StreamError:
    """Agent -> relay: the stream failed; ``status`` is an HTTP status hint."""

    id: int
    status: int
    message: str
    code: str | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    """Heartbeat (agent -> relay); answered with :class:`Pong`."""

    ts: float = 0.0


@dataclass(frozen=True, slots=True)
class Pong:
    ts: float = 0.0


@dataclass(frozen=True, slots=True)
class GoAway:
    """Relay -> agent: this node is draining; reconnect (maybe elsewhere)."""

    reason: str = "shutting down"


Event = Union[Hello, Welcome, Request, Cancel, Data, Credit, End, StreamError, Ping, Pong, GoAway]

# Events that travel as JSON text frames, keyed by their ``type`` tag.
_CONTROL_TYPES: dict[str, type] = {
    "hello": Hello,
    "welcome": Welcome,
    "request": Request,
    "cancel": Cancel,
    "end": End,
    "error": StreamError,
    "ping": Ping,
    "pong": Pong,
    "goaway": GoAway,
}
_CONTROL_TAGS: dict[type, str] = {cls: tag for tag, cls in _CONTROL_TYPES.items()}


# ---------------------------------------------------------------------------
# Encoding


def encode(event: Event) -> str | bytes:
    """Serialise an event to a websocket message payload."""
    if type(event) is Data:
        return encode_data(event.id, event.payload)
    if type(event) is Credit:
        return encode_credit(event.id, event.amount)
    tag = _CONTROL_TAGS.get(type(event))
    if tag is None:
        raise TypeError(f"not a protocol event: {event!r}")
    obj: dict[str, Any] = {"type": tag}
    for name in event.__dataclass_fields__:  # type: ignore[attr-defined]
        value = getattr(event, name)
        obj[name] = list(value) if isinstance(value, tuple) else value
    return orjson.dumps(obj).decode()


def encode_data(stream_id: int, payload: bytes) -> bytes:
    """The hot path: header + payload, no JSON involved."""
    return _HEADER.pack(FrameKind.DATA, stream_id) + payload


def encode_credit(stream_id: int, amount: int) -> bytes:
    return _HEADER.pack(FrameKind.CREDIT, stream_id) + _U32.pack(amount)


# ---------------------------------------------------------------------------
# Decoding.  Every malformed input raises ProtocolError, never anything else.


def decode(message: str | bytes) -> Event:
    """Parse one websocket message payload into an event."""
    if isinstance(message, (bytes, bytearray, memoryview)):
        return _decode_binary(bytes(message))
    if isinstance(message, str):
        return _decode_control(message)
    raise ProtocolError(f"unexpected message type {type(message).__name__}")


def _decode_binary(message: bytes) -> Event:
    if len(message) < _HEADER.size:
        raise ProtocolError(f"binary frame too short ({len(message)} bytes)")
    kind, stream_id = _HEADER.unpack_from(message)
    # Stream ids start at 1 (as in control frames); 0 never names a stream.
    if stream_id == 0:
        raise ProtocolError("binary frame for stream id 0")
    if kind == FrameKind.DATA:
        return Data(stream_id, message[_HEADER.size :])
    if kind == FrameKind.CREDIT:
        if len(message) != _HEADER.size + _U32.size:
            raise ProtocolError("credit frame must carry exactly 4 bytes")
        (amount,) = _U32.unpack_from(message, _HEADER.size)
        return Credit(stream_id, amount)
    raise ProtocolError(f"unknown binary frame kind {kind}")


def _decode_control(message: str) -> Event:
    try:
        obj = orjson.loads(message)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"control frame is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("control frame must be a JSON object")
    tag = obj.get("type")
    cls = _CONTROL_TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ProtocolError(f"unknown control frame type {tag!r}")
    return _VALIDATORS[cls](obj)


def _field(obj: dict, name: str, kinds: type | tuple[type, ...], default: Any = ...) -> Any:
    if name not in obj:
        if default is ...:
            raise ProtocolError(f"{obj.get('type')} frame lacks field {name!r}")
        return default
    value = obj[name]
    # bool is an int subclass; never accept it where a number is meant.
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ProtocolError(f"{obj.get('type')}.{name} has the wrong type")
    if not isinstance(value, kinds):
        raise ProtocolError(f"{obj.get('type')}.{name} has the wrong type")
    return value


def _stream_id(obj: dict) -> int:
    value = _field(obj, "id", int)
    if not 0 < value <= MAX_STREAM_ID:
        raise ProtocolError(f"stream id {value} out of range")
    return value


def _hello(obj: dict) -> Hello:
    models = _field(obj, "models", list)
    if not models or not all(isinstance(m, str) and m for m in models):
        raise ProtocolError("hello.models must be a non-empty list of names")
    max_concurrency = _field(obj, "max_concurrency", int)
    if max_concurrency < 1:
        raise ProtocolError("hello.max_concurrency must be >= 1")
    agent_id = _field(obj, "agent_id", str)
    if not 0 < len(agent_id) <= 128:
        raise ProtocolError("hello.agent_id must be 1-128 characters")
    return Hello(
        protocol=_field(obj, "protocol", int),
        agent_version=_field(obj, "agent_version", str),
        agent_id=agent_id,
        models=tuple(models),
        max_concurrency=max_concurrency,
    )


def _welcome(obj: dict) -> Welcome:
    return Welcome(
        protocol=_field(obj, "protocol", int),
        instance_id=_field(obj, "instance_id", str),
        node_id=_field(obj, "node_id", str),
        heartbeat_interval=float(_field(obj, "heartbeat_interval", (int, float))),
        chat_url=_field(obj, "chat_url", str, ""),
    )


def _request(obj: dict) -> Request:
    window = _field(obj, "window", int, DEFAULT_WINDOW)
    if window < 1:
        raise ProtocolError("request.window must be positive")
    return Request(
        id=_stream_id(obj),
        body=_field(obj, "body", dict),
        stream=_field(obj, "stream", bool),
        window=window,
    )


def _cancel(obj: dict) -> Cancel:
    return Cancel(id=_stream_id(obj), reason=_field(obj, "reason", str, "cancelled"))


def _end(obj: dict) -> End:
    return End(
        id=_stream_id(obj),
        usage=_field(obj, "usage", (dict, type(None)), None),
        model=_field(obj, "model", (str, type(None)), None),
    )


def _error(obj: dict) -> StreamError:
    status = _field(obj, "status", int)
    if not 400 <= status <= 599:
        raise ProtocolError(f"error.status {status} is not an HTTP error status")
    return StreamError(
        id=_stream_id(obj),
        status=status,
        message=_field(obj, "message", str),
        code=_field(obj, "code", (str, type(None)), None),
    )


def _ping(obj: dict) -> Ping:
    return Ping(ts=float(_field(obj, "ts", (int, float), 0.0)))


def _pong(obj: dict) -> Pong:
    return Pong(ts=float(_field(obj, "ts", (int, float), 0.0)))


def _goaway(obj: dict) -> GoAway:
    return GoAway(reason=_field(obj, "reason", str, "shutting down"))


_VALIDATORS = {
    Hello: _hello,
    Welcome: _welcome,
    Request: _request,
    Cancel: _cancel,
    End: _end,
    StreamError: _error,
    Ping: _ping,
    Pong: _pong,
    GoAway: _goaway,
}


def check_version(hello: Hello) -> None:
    """Raise if this side cannot speak the agent's protocol version."""
    if hello.protocol not in SUPPORTED_VERSIONS:
        speaks = ", ".join(str(v) for v in sorted(SUPPORTED_VERSIONS))
        raise ProtocolError(
            f"agent speaks protocol {hello.protocol}; this relay speaks {speaks}. "
            "Upgrade the agent (or the relay) so they match.",
            CloseCode.UNSUPPORTED_VERSION,
        )


# ---------------------------------------------------------------------------
# Per-stream state.  A table of legal transitions, as in h11.


class StreamState(enum.Enum):
    OPEN = "open"  # request sent, nothing received yet
    STREAMING = "streaming"  # at least one DATA frame received
    ENDED = "ended"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (StreamState.ENDED, StreamState.FAILED, StreamState.CANCELLED)


# (state, event type) -> next state.  Anything not listed is a protocol error.
_TRANSITIONS: dict[tuple[StreamState, type], StreamState] = {
    (StreamState.OPEN, Data): StreamState.STREAMING,
    (StreamState.OPEN, End): StreamState.ENDED,
    (StreamState.OPEN, StreamError): StreamState.FAILED,
    (StreamState.OPEN, Cancel): StreamState.CANCELLED,
    (StreamState.STREAMING, Data): StreamState.STREAMING,
    (StreamState.STREAMING, End): StreamState.ENDED,
    (StreamState.STREAMING, StreamError): StreamState.FAILED,
    (StreamState.STREAMING, Cancel): StreamState.CANCELLED,
}


@dataclass(slots=True)
class StreamTracker:
    """The relay's view of one stream: state machine plus flow-control window.

    ``unacked`` counts payload bytes the agent has sent that the HTTP client has
    not consumed yet.  The agent is allowed to overshoot the window by at most
    one frame; anything beyond that is a protocol violation.
    """

    id: int
    window: int = DEFAULT_WINDOW
    state: StreamState = StreamState.OPEN
    unacked: int = 0
    _consumed_since_grant: int = field(default=0, repr=False)

    def receive(self, event: Data | End | StreamError | Cancel) -> StreamState:
        """Apply an event and return the new state (or raise ProtocolError)."""
        nxt = _TRANSITIONS.get((self.state, type(event)))
        if nxt is None:
            raise ProtocolError(
                f"stream {self.id}: {type(event).__name__} not allowed in state {self.state.value}"
            )
        if type(event) is Data:
            # Credit is checked before the frame is counted: the agent may send
            # while it has any credit left, so overshoot is bounded by one frame.
            if self.unacked >= self.window:
                raise ProtocolError(f"stream {self.id}: agent exceeded its flow-control window")
            self.unacked += len(event.payload)  # type: ignore[union-attr]
        self.state = nxt
        return nxt

    def consumed(self, nbytes: int) -> int:
        """Record bytes delivered to the client; return credit to grant now (0 = none).

        Credit is returned in batches of at least half a window so that a stream
        of tiny chunks does not cost one CREDIT frame per chunk.
        """
        self.unacked -= nbytes
        self._consumed_since_grant += nbytes
        if self._consumed_since_grant >= self.window // 2 and not self.state.finished:
            grant, self._consumed_since_grant = self._consumed_since_grant, 0
            return grant
        return 0


@dataclass(slots=True)
class SendWindow:
    """The agent's view of one stream's credit."""

    credit: int = DEFAULT_WINDOW

    @property
    def can_send(self) -> bool:
        return self.credit > 0

    def sent(self, nbytes: int) -> None:
        self.credit -= nbytes

    def grant(self, amount: int) -> None:
        self.credit += amount


# ---------------------------------------------------------------------------
# SSE framing helpers shared by both sides (they are bytes formats, not I/O).

SSE_DONE = b"data: [DONE]\n\n"


def sse_event(json_bytes: bytes) -> bytes:
    """One Server-Sent Event carrying a JSON payload (WHATWG HTML s9.2)."""
    return b"data: " + json_bytes + b"\n\n"
