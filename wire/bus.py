"""The envelope that carries wire frames between relay nodes (over Redis pub/sub).

A chat request may reach node A while the chosen agent is connected to node
B.  A sends B the same ``request`` frame the agent will get, B relays the
agent's frames back unchanged, and A's credit and cancel frames flow to B:
one stream machine (``streams.py``), two transports.  Stream ids are the
opening node's: B tells streams apart by (sender, id).

Layout of one message::

    magic 0x49 ("I") | envelope version u8 | sender length u8 | sender (ASCII)
    | session length u8 | session (ASCII) | one frame (frames.py: binary, or JSON)

``session`` names the agent session a ``request`` is for, the session a
``kick`` closes, or the agent session whose upload ``credit`` B relays to A;
it is empty otherwise.  That is what tells the two credits apart on the bus,
where no direction is implied: both name the stream by A's id, and a node
may both open streams on another and serve that one's, with the same ids.  A node that receives a message it
cannot decode drops it (:class:`ProtocolError`); it is never fatal.
"""

from __future__ import annotations

from dataclasses import dataclass

from .frames import (
    Credit,
    Data,
    Event,
    ProtocolError,
    Upload,
    decode,
    encode_control,
    encode_credit,
    encode_data,
    encode_upload,
)

MAGIC = 0x49
ENVELOPE_VERSION = 1
MAX_ID_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Envelope:
    sender: str  # node id of the sender: where replies go
    event: Event
    session: str = ""


def _header(sender: str, session: str) -> bytes:
    s, t = sender.encode("ascii"), session.encode("ascii")
    if not 0 < len(s) <= MAX_ID_LENGTH or len(t) > MAX_ID_LENGTH:
        raise ValueError("node and session ids are 1-255 ASCII characters")
    return bytes((MAGIC, ENVELOPE_VERSION, len(s))) + s + bytes((len(t),)) + t


def encode_envelope(sender: str, event: Event, session: str = "") -> bytes:
    """One bus message; DATA and UPLOAD keep their payload unparsed, as on the websocket."""
    if type(event) is Data:
        frame = encode_data(event.id, event.payload)
    elif type(event) is Upload:
        frame = encode_upload(event.id, event.payload)
    elif type(event) is Credit:
        frame = encode_credit(event.id, event.amount)
    else:
        frame = encode_control(event)
    return _header(sender, session) + frame


def decode_envelope(message: bytes) -> Envelope:
    """Parse one bus message; ProtocolError on anything malformed."""
    if not isinstance(message, (bytes, bytearray)):
        raise ProtocolError("bus message must be bytes")
    if len(message) < 4 or message[0] != MAGIC:
        raise ProtocolError("not a bus envelope")
    if message[1] != ENVELOPE_VERSION:
        raise ProtocolError(f"bus envelope version {message[1]} is not {ENVELOPE_VERSION}")
    pos = 2
    ids: list[str] = []
    for _ in range(2):
        if pos >= len(message):
            raise ProtocolError("bus envelope truncated")
        size = message[pos]
        end = pos + 1 + size
        if end > len(message):
            raise ProtocolError("bus envelope truncated")
        try:
            ids.append(bytes(message[pos + 1 : end]).decode("ascii"))
        except UnicodeDecodeError:
            raise ProtocolError("bus envelope ids must be ASCII") from None
        pos = end
    sender, session = ids
    if not sender:
        raise ProtocolError("bus envelope without a sender")
    return Envelope(sender, decode(bytes(message[pos:])), session)
