"""Frames of the wire protocol: events, their encoding, versions, close codes.

Two kinds of message carry the protocol, on an agent's websocket and on the
relay nodes' bus alike:

* **Control frames** are one JSON object with a ``type`` field (websocket
  text frames): ``hello``/``welcome`` (handshake), ``request``, ``cancel``,
  ``end``, ``error``, ``ping``/``pong`` (heartbeat), ``goaway``, and
  ``kick`` (node to node only).  They are rare, so readability wins.

* **Data frames** are binary, on the hot path: a 5-byte header (kind: u8,
  stream id: u32 big-endian) and the payload.  ``DATA`` (agent -> relay)
  carries bytes the relay writes to the HTTP client verbatim: complete
  Server-Sent Events for a streaming request, the JSON body otherwise.  The
  relay never parses a chunk: the agent has CPU to spare on the owner's
  machine, the relay is shared.  ``UPLOAD`` (relay -> agent) carries the
  request body that follows a ``request`` whose ``upload`` is not zero (an
  audio file), never more than one window per frame.  ``CREDIT`` (u32
  payload) grants one stream more bytes of window: relay -> agent for the
  answer, agent -> relay for the upload; see ``streams.py``.

A control frame always starts with ``{`` and a data frame with its kind
byte (1 to 3), so one byte string can hold either (``decode`` accepts
``bytes`` that hold JSON): that is how the bus carries both.

Versions.  ``hello.protocol`` is the newest version the agent speaks and
``hello.min_protocol`` the oldest; the relay answers in ``welcome.protocol``
with the newest version both speak, or closes with ``4001`` naming the side
to upgrade (:func:`negotiate`).  Version 2 added ``request.op`` (what to do:
``chat``, ``images`` or ``transcribe``), ``request.upload`` with the
``UPLOAD`` frames and the agent's upload ``CREDIT``, ``hello.capabilities``
(which ops the agent can do), ``hello.image_models`` and
``hello.transcribe_models``; version-1 agents can do ``chat`` only and never
receive anything else.
Fields a side does not know are ignored, so a field with a default can be
added without a new version.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import orjson

#: Newest protocol version this package speaks, and every version it speaks.
PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS = frozenset({1, 2})

#: The operation of a chat completion request (the only one version 1 knows).
OP_CHAT = "chat"
#: The operation of an image generation request (version 2).
OP_IMAGES = "images"
#: The operation of an audio transcription request (version 2): the audio
#: file is the request's upload.
OP_TRANSCRIBE = "transcribe"

#: Default per-stream window the relay grants when a stream opens.
DEFAULT_WINDOW = 256 * 1024
MAX_STREAM_ID = 2**32 - 1
MAX_CAPABILITIES = 32
MAX_NAME_LENGTH = 128
#: Model names come from model servers' ``/models``, some of which use long
#: ids (paths, hub names): bounded, but generously.
MAX_MODEL_NAME_LENGTH = 1024
#: ``hello.parameters``, JSON-encoded.
MAX_PARAMETERS_BYTES = 64 * 1024
#: The largest ``request.upload`` a frame may declare: what u32 credit
#: accounting describes.  Each side holds uploads to its own, far smaller, limit.
MAX_UPLOAD = 2**32 - 1

_HEADER = struct.Struct("!BI")
_U32 = struct.Struct("!I")


class CloseCode(enum.IntEnum):
    """Websocket close codes (RFC 6455 s7.4.2 reserves 4000-4999 for applications)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # relay shutting down: reconnect, maybe elsewhere
    PROTOCOL_ERROR = 1002
    #: The agent floods (more frames, bytes or pings than allowed), or its hello declares more
    #: than this relay takes (too many models, too long a name): before the welcome, that hello
    #: will be refused again, so the agent stops.
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    TRY_AGAIN_LATER = 1013  # RFC 6455 s7.4.2 (IANA): e.g. the instance has all the agents a node takes
    UNSUPPORTED_VERSION = 4001  # one side must be upgraded; retrying will not help
    UNAUTHORIZED = 4003  # token unknown, rotated or instance deleted
    HEARTBEAT_TIMEOUT = 4008
    REPLACED = 4009  # the same agent id connected again; this session is stale


class ProtocolError(Exception):
    """A message that does not follow this protocol (the peer's fault).

    ``close_code`` is what the receiving side should close the websocket with.
    """

    def __init__(self, message: str, close_code: CloseCode = CloseCode.PROTOCOL_ERROR):
        super().__init__(message)
        self.close_code = close_code


class FrameKind(enum.IntEnum):
    DATA = 1
    CREDIT = 2
    UPLOAD = 3


# ---------------------------------------------------------------------------
# Events: frozen dataclasses, one per message type.


@dataclass(frozen=True, slots=True)
class Hello:
    """Agent -> relay, the first message after the websocket opens."""

    protocol: int  # newest version the agent speaks
    agent_version: str
    agent_id: str
    models: tuple[str, ...]
    max_concurrency: int
    capabilities: tuple[str, ...] = (OP_CHAT,)
    min_protocol: int = 1  # oldest version the agent speaks
    #: Image generation models it serves (for ``images``); ``models`` are its
    #: chat models.  Left out of the frame when empty, so a chat-only agent's
    #: hello reads exactly as it did before the field existed.
    image_models: tuple[str, ...] = ()
    #: Transcription models it serves (for ``transcribe``); left out when
    #: empty, like ``image_models``.
    transcribe_models: tuple[str, ...] = ()
    #: What the agent suggests for its instance's conversation API (``introduction``,
    #: ``variables``); the owner's own settings win.  A JSON object the relay
    #: checks; left out when empty.
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Welcome:
    """Relay -> agent: handshake accepted, in version ``protocol``."""

    protocol: int
    instance_id: str
    node_id: str
    heartbeat_interval: float
    chat_url: str = ""
    #: The agent version shipped with this relay, so an older agent can say
    #: "upgrade available" (empty: the relay does not say).
    latest_agent_version: str = ""


@dataclass(frozen=True, slots=True)
class Request:
    """Relay -> agent: run one operation (``op``) and stream its answer.

    For ``chat``, ``body`` is the validated OpenAI request (model resolved to
    one the agent serves) and ``stream`` says whether to send SSE events or
    one JSON body.

    For ``images``, ``body`` is an OpenAI ``/images/generations`` request
    (``prompt``, ``model`` resolved to one of ``hello.image_models``, ``n``,
    ``size``, ``response_format`` ...) and ``stream`` is false: the answer is
    one JSON body in OpenAI's ``ImagesResponse`` shape (``created``,
    ``data``), every item of ``data`` carrying its image as ``b64_json``,
    never as a ``url`` (one on the owner's machine would be useless to the
    caller).

    For ``transcribe``, ``body`` is ``model`` (one of
    ``hello.transcribe_models``), ``filename``, ``content_type`` and the
    optional OpenAI fields (``language``, ``prompt``, ``response_format``,
    ``temperature``); the audio file is the upload.  The answer is one JSON
    body ``{"text": ...}`` (``verbose_json`` adds OpenAI's other fields; for
    ``text``, ``srt`` and ``vtt`` the document is the ``text``).

    Whatever the op, a JSON body may span several ``DATA`` frames, none
    larger than ``window``.  ``request_id`` is the relay's id of the HTTP
    request, for the agent's log lines.

    ``upload`` is the size of a request body that does not fit a control
    frame (an audio file): that many bytes follow in ``UPLOAD`` frames, none
    larger than ``window``.  The relay may send ``window`` bytes of it at
    once and then only what the agent grants with ``CREDIT`` frames; the
    agent answers (``DATA``/``END``) only once it has all of it, but may
    fail the stream (``ERROR``) before, which stops the upload.  Left out of
    the frame when zero, so other requests keep their bytes.
    """

    id: int
    body: dict[str, Any]
    stream: bool
    window: int = DEFAULT_WINDOW
    op: str = OP_CHAT
    request_id: str = ""
    upload: int = 0


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
class Upload:
    """Relay -> agent: the next bytes of a request's upload."""

    id: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Credit:
    """The receiver of a stream's bytes lets its sender send ``amount`` more.

    Relay -> agent: more of the answer (``DATA``).  Agent -> relay: more of
    the upload (``UPLOAD``), only while one is in progress.
    """

    id: int
    amount: int


@dataclass(frozen=True, slots=True)
class End:
    """Agent -> relay: the stream finished normally."""

    id: int


@dataclass(frozen=True, slots=True)
class StreamError:
    """The stream failed; ``status`` is an HTTP status hint, ``code`` an OpenAI error code."""

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


@dataclass(frozen=True, slots=True)
class Kick:
    """Node -> node: close the session named in the envelope; its agent reconnected elsewhere."""

    reason: str = "replaced by a newer connection"


Event = (Hello | Welcome | Request | Cancel | Data | Upload | Credit | End | StreamError | Ping | Pong | GoAway
         | Kick)

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
    "kick": Kick,
}
_CONTROL_TAGS: dict[type, str] = {cls: tag for tag, cls in _CONTROL_TYPES.items()}
_FIELD_NAMES: dict[type, tuple[str, ...]] = {cls: tuple(f.name for f in fields(cls)) for cls in _CONTROL_TAGS}
#: Fields left out of a frame when empty: added after a version shipped, so
#: frames that do not use them keep the exact bytes peers already know.
_OMITTED_WHEN_EMPTY: dict[type, frozenset[str]] = {
    Hello: frozenset({"image_models", "transcribe_models", "parameters"}),
    Request: frozenset({"upload"}),
}


# ---------------------------------------------------------------------------
# Encoding


def encode(event: Event) -> str | bytes:
    """Serialise an event: ``bytes`` for data frames, ``str`` (JSON) for control frames."""
    if type(event) is Data:
        return encode_data(event.id, event.payload)
    if type(event) is Upload:
        return encode_upload(event.id, event.payload)
    if type(event) is Credit:
        return encode_credit(event.id, event.amount)
    return encode_control(event).decode()


def encode_control(event: Event) -> bytes:
    """A control frame as UTF-8 JSON bytes."""
    tag = _CONTROL_TAGS.get(type(event))
    if tag is None:
        raise TypeError(f"not a control frame: {event!r}")
    obj: dict[str, Any] = {"type": tag}
    omitted = _OMITTED_WHEN_EMPTY.get(type(event), frozenset())
    for name in _FIELD_NAMES[type(event)]:
        value = getattr(event, name)
        if name in omitted and not value:
            continue
        obj[name] = list(value) if isinstance(value, tuple) else value
    return orjson.dumps(obj)


def encode_data(stream_id: int, payload: bytes) -> bytes:
    """The hot path: header + payload, no JSON involved."""
    return _HEADER.pack(FrameKind.DATA, stream_id) + payload


def encode_upload(stream_id: int, payload: bytes) -> bytes:
    """Upload bytes go the same way as answer bytes: header + payload, untouched."""
    return _HEADER.pack(FrameKind.UPLOAD, stream_id) + payload


def encode_credit(stream_id: int, amount: int) -> bytes:
    return _HEADER.pack(FrameKind.CREDIT, stream_id) + _U32.pack(amount)


# ---------------------------------------------------------------------------
# Decoding.  Every malformed input raises ProtocolError, never anything else.


def decode(message: str | bytes | bytearray | memoryview) -> Event:
    """Parse one message payload into an event.

    ``str`` is a control frame; ``bytes`` a data frame, or a control frame
    when it starts with ``{`` (as the bus carries them).
    """
    if isinstance(message, str):
        return _decode_control(message)
    if isinstance(message, (bytes, bytearray, memoryview)):
        data = bytes(message)
        if data[:1] == b"{":
            return _decode_control(data)
        return _decode_binary(data)
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
    if kind == FrameKind.UPLOAD:
        return Upload(stream_id, message[_HEADER.size :])
    if kind == FrameKind.CREDIT:
        if len(message) != _HEADER.size + _U32.size:
            raise ProtocolError("credit frame must carry exactly 4 bytes")
        (amount,) = _U32.unpack_from(message, _HEADER.size)
        return Credit(stream_id, amount)
    raise ProtocolError(f"unknown binary frame kind {kind}")


def _decode_control(message: str | bytes) -> Event:
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


_MISSING: Any = object()


def _field(obj: dict[str, Any], name: str, kinds: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    if name not in obj:
        if default is _MISSING:
            raise ProtocolError(f"{obj.get('type')} frame lacks field {name!r}")
        return default
    value = obj[name]
    allowed = kinds if isinstance(kinds, tuple) else (kinds,)
    # bool is an int subclass; never accept it where a number is meant.
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
        raise ProtocolError(f"{obj.get('type')}.{name} has the wrong type")
    return value


def _stream_id(obj: dict[str, Any]) -> int:
    value: int = _field(obj, "id", int)
    if not 0 < value <= MAX_STREAM_ID:
        raise ProtocolError(f"stream id {value} out of range")
    return value


def _names(obj: dict[str, Any], name: str, default: Any = _MISSING, *, limit: int = 10_000,
           length: int = MAX_NAME_LENGTH) -> tuple[str, ...]:
    values = _field(obj, name, list, default)
    if not isinstance(values, (list, tuple)) or not values or len(values) > limit:
        raise ProtocolError(f"hello.{name} must be a non-empty list of at most {limit} names")
    if not all(isinstance(v, str) and 0 < len(v) <= length for v in values):
        raise ProtocolError(f"hello.{name} must hold names of 1-{length} characters")
    return tuple(values)


def _optional_names(obj: dict[str, Any], name: str, *, length: int) -> tuple[str, ...]:
    """A list of names that may be absent or empty (none); otherwise held to :func:`_names`'s rules."""
    if obj.get(name, []) == []:
        return ()
    return _names(obj, name, length=length)


def _hello(obj: dict[str, Any]) -> Hello:
    max_concurrency: int = _field(obj, "max_concurrency", int)
    if max_concurrency < 1:
        raise ProtocolError("hello.max_concurrency must be >= 1")
    agent_id: str = _field(obj, "agent_id", str)
    if not 0 < len(agent_id) <= MAX_NAME_LENGTH:
        raise ProtocolError(f"hello.agent_id must be 1-{MAX_NAME_LENGTH} characters")
    agent_version: str = _field(obj, "agent_version", str)
    if len(agent_version) > MAX_NAME_LENGTH:
        raise ProtocolError(f"hello.agent_version must be at most {MAX_NAME_LENGTH} characters")
    protocol: int = _field(obj, "protocol", int)
    min_protocol: int = _field(obj, "min_protocol", int, protocol)
    if min_protocol > protocol:
        raise ProtocolError("hello.min_protocol is newer than hello.protocol")
    return Hello(
        protocol=protocol,
        agent_version=agent_version,
        agent_id=agent_id,
        models=_names(obj, "models", length=MAX_MODEL_NAME_LENGTH),
        max_concurrency=max_concurrency,
        # A version-1 agent declares nothing: it can chat, and only chat.
        capabilities=_names(obj, "capabilities", [OP_CHAT], limit=MAX_CAPABILITIES),
        min_protocol=min_protocol,
        image_models=_optional_names(obj, "image_models", length=MAX_MODEL_NAME_LENGTH),
        transcribe_models=_optional_names(obj, "transcribe_models", length=MAX_MODEL_NAME_LENGTH),
        parameters=_parameters(obj),
    )


def _parameters(obj: dict[str, Any]) -> dict[str, Any]:
    value: dict[str, Any] = _field(obj, "parameters", dict, {})
    # Stored with the instance by the relay: bounded here, checked field by field there.
    if len(orjson.dumps(value)) > MAX_PARAMETERS_BYTES:
        raise ProtocolError(f"hello.parameters exceeds {MAX_PARAMETERS_BYTES} bytes")
    return value


def _welcome(obj: dict[str, Any]) -> Welcome:
    return Welcome(
        protocol=_field(obj, "protocol", int),
        instance_id=_field(obj, "instance_id", str),
        node_id=_field(obj, "node_id", str),
        heartbeat_interval=float(_field(obj, "heartbeat_interval", (int, float))),
        chat_url=_field(obj, "chat_url", str, ""),
        latest_agent_version=_field(obj, "latest_agent_version", str, ""),
    )


def _request(obj: dict[str, Any]) -> Request:
    window: int = _field(obj, "window", int, DEFAULT_WINDOW)
    if window < 1:
        raise ProtocolError("request.window must be positive")
    op: str = _field(obj, "op", str, OP_CHAT)
    if not 0 < len(op) <= MAX_NAME_LENGTH:
        raise ProtocolError("request.op must be a name")
    upload: int = _field(obj, "upload", int, 0)
    if not 0 <= upload <= MAX_UPLOAD:
        raise ProtocolError(f"request.upload must be 0-{MAX_UPLOAD} bytes")
    return Request(
        id=_stream_id(obj),
        body=_field(obj, "body", dict),
        stream=_field(obj, "stream", bool),
        window=window,
        op=op,
        request_id=_field(obj, "request_id", str, ""),
        upload=upload,
    )


def _cancel(obj: dict[str, Any]) -> Cancel:
    return Cancel(id=_stream_id(obj), reason=_field(obj, "reason", str, "cancelled"))


def _end(obj: dict[str, Any]) -> End:
    return End(id=_stream_id(obj))


def _error(obj: dict[str, Any]) -> StreamError:
    status: int = _field(obj, "status", int)
    if not 400 <= status <= 599:
        raise ProtocolError(f"error.status {status} is not an HTTP error status")
    return StreamError(
        id=_stream_id(obj),
        status=status,
        message=_field(obj, "message", str),
        code=_field(obj, "code", (str, type(None)), None),
    )


def _ping(obj: dict[str, Any]) -> Ping:
    return Ping(ts=float(_field(obj, "ts", (int, float), 0.0)))


def _pong(obj: dict[str, Any]) -> Pong:
    return Pong(ts=float(_field(obj, "ts", (int, float), 0.0)))


def _goaway(obj: dict[str, Any]) -> GoAway:
    return GoAway(reason=_field(obj, "reason", str, "shutting down"))


def _kick(obj: dict[str, Any]) -> Kick:
    return Kick(reason=_field(obj, "reason", str, "replaced by a newer connection"))


_VALIDATORS: dict[type, Callable[[dict[str, Any]], Event]] = {
    Hello: _hello,
    Welcome: _welcome,
    Request: _request,
    Cancel: _cancel,
    End: _end,
    StreamError: _error,
    Ping: _ping,
    Pong: _pong,
    GoAway: _goaway,
    Kick: _kick,
}


# ---------------------------------------------------------------------------
# Versions


def negotiate(hello: Hello, supported: frozenset[int] = SUPPORTED_VERSIONS) -> int:
    """The newest version both sides speak; ProtocolError (4001) naming who must upgrade."""
    # Arithmetic on the bounds, never a range of the peer's numbers: a hello
    # may claim any version, 2**62 included.
    low, high = max(hello.min_protocol, min(supported)), min(hello.protocol, max(supported))
    common = [v for v in supported if low <= v <= high]
    if common:
        return max(common)
    if hello.protocol < min(supported):
        raise ProtocolError(
            f"agent speaks protocol {hello.protocol}, this relay needs {min(supported)} or newer: "
            "upgrade the agent (pip install -U instance-relay)",
            CloseCode.UNSUPPORTED_VERSION,
        )
    raise ProtocolError(
        f"agent needs protocol {hello.min_protocol} or newer, this relay speaks up to {max(supported)}: "
        "upgrade the relay, or run an older agent",
        CloseCode.UNSUPPORTED_VERSION,
    )


#: Digits of one part of a version: far more than any release number, and far below what
#: ``int()`` refuses (4300 digits) or spends time on.
MAX_VERSION_DIGITS = 9


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.2.10"`` -> ``(0, 2, 10)``; stops at the first part that is not a number (nor a
    number of at most ``MAX_VERSION_DIGITS`` digits: whoever sends the text chooses its length)."""
    parts: list[int] = []
    for piece in text.split("."):
        digits = ""
        for ch in piece[:MAX_VERSION_DIGITS + 1]:
            if not "0" <= ch <= "9":  # str.isdigit() also takes "²" and "٣", which int() refuses or misreads
                break
            digits += ch
        if not digits or len(digits) > MAX_VERSION_DIGITS:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):
            break
    return tuple(parts)
