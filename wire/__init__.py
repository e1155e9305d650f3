"""The relay <-> agent wire protocol, sans-I/O: the one thing both sides share.

Nothing in this package touches a socket, and it imports nothing from
``relay`` or ``agent`` (nor starlette, uvicorn, redis, websockets, httpx):
functions turn events into message payloads and back, and small state
objects track each stream and its flow-control window.  The relay's agent
websocket, its node-to-node bus and the agent are thin adapters around it.

    frames     events, encode/decode, protocol versions, close codes
    streams    one stream's state machine and its credit window
    bus        the envelope that carries the same frames between relay nodes
    sse        Server-Sent Events: framing (both sides) and parsing (agent)
    error_body OpenAI-shaped error bodies: build one, read the message out of one
    redaction  keep credentials out of log records

Everything public is re-exported here, so callers write ``wire.Data``.
"""

from __future__ import annotations

from .bus import Envelope, decode_envelope, encode_envelope
from .error_body import error_body, error_message
from .frames import (
    DEFAULT_WINDOW,
    MAX_STREAM_ID,
    OP_CHAT,
    OP_IMAGES,
    OP_TRANSCRIBE,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Cancel,
    CloseCode,
    Credit,
    Data,
    End,
    Event,
    FrameKind,
    GoAway,
    Hello,
    Kick,
    Ping,
    Pong,
    ProtocolError,
    Request,
    StreamError,
    Upload,
    Welcome,
    decode,
    encode,
    encode_credit,
    encode_data,
    encode_upload,
    negotiate,
    parse_version,
)
from .sse import SSE_DONE, iter_sse_data, sse_event
from .streams import SendWindow, StreamState, StreamTracker, UploadReceiver

__version__ = "0.2.0"

__all__ = [
    "DEFAULT_WINDOW", "MAX_STREAM_ID", "OP_CHAT", "OP_IMAGES", "OP_TRANSCRIBE", "PROTOCOL_VERSION", "SSE_DONE",
    "SUPPORTED_VERSIONS", "Cancel", "CloseCode", "Credit", "Data", "End", "Envelope", "Event",
    "FrameKind", "GoAway", "Hello", "Kick", "Ping", "Pong", "ProtocolError", "Request",
    "SendWindow", "StreamError", "StreamState", "StreamTracker", "Upload",
    "UploadReceiver", "Welcome", "__version__", "decode", "decode_envelope", "encode",
    "encode_credit", "encode_data", "encode_envelope", "encode_upload", "error_body", "error_message",
    "iter_sse_data", "negotiate", "parse_version", "sse_event",
]
