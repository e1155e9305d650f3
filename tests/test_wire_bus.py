"""The bus envelope: exact bytes, and every malformed message refused with ProtocolError."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import wire
from wire.bus import ENVELOPE_VERSION, MAGIC

EXACT = [
    # sender "nodeA", no session, a DATA frame: header | 5-byte frame header | payload untouched
    (wire.Envelope("nodeA", wire.Data(7, b"data: {}\n\n")),
     b"I\x01\x05nodeA\x00" + b"\x01\x00\x00\x00\x07" + b"data: {}\n\n"),
    (wire.Envelope("nodeA", wire.Credit(7, 1024)),
     b"I\x01\x05nodeA\x00" + b"\x02\x00\x00\x00\x07\x00\x00\x04\x00"),
    # a request names the agent's session; control frames travel as their JSON bytes
    (wire.Envelope("nodeA", wire.Request(7, {"model": "m"}, True, 64, "chat", "r1"), "sess1"),
     b"I\x01\x05nodeA\x05sess1"
     b'{"type":"request","id":7,"body":{"model":"m"},"stream":true,"window":64,"op":"chat","request_id":"r1"}'),
    (wire.Envelope("nodeB", wire.End(7)), b'I\x01\x05nodeB\x00{"type":"end","id":7}'),
    (wire.Envelope("nodeB", wire.StreamError(7, 503, "gone", "instance_offline")),
     b'I\x01\x05nodeB\x00{"type":"error","id":7,"status":503,"message":"gone","code":"instance_offline"}'),
    (wire.Envelope("nodeA", wire.Cancel(7, "client disconnected")),
     b'I\x01\x05nodeA\x00{"type":"cancel","id":7,"reason":"client disconnected"}'),
    (wire.Envelope("nodeB", wire.Kick("replaced"), "old"), b'I\x01\x05nodeB\x03old{"type":"kick","reason":"replaced"}'),
]


@pytest.mark.parametrize("envelope, expected", EXACT, ids=lambda x: type(getattr(x, "event", x)).__name__)
def test_exact_bytes(envelope, expected):
    assert expected[0] == MAGIC and expected[1] == ENVELOPE_VERSION
    assert wire.encode_envelope(envelope.sender, envelope.event, envelope.session) == expected
    assert wire.decode_envelope(expected) == envelope


MALFORMED = [
    b"", b"I", b"I\x01", b"X\x01\x05nodeA\x00{}",  # too short, wrong magic
    b"I\x02\x05nodeA\x00" + wire.encode_data(1, b"x"),  # unknown envelope version
    b"I\x01\x09nodeA\x00",  # sender length past the end
    b"I\x01\x05nodeA\x09ab",  # session length past the end
    b"I\x01\x00\x00" + wire.encode_data(1, b"x"),  # no sender
    b"I\x01\x05n\xffdeA\x00" + wire.encode_data(1, b"x"),  # not ASCII
    b"I\x01\x05nodeA\x00",  # no frame
    b"I\x01\x05nodeA\x00{not json",
    b"I\x01\x05nodeA\x00" + b'{"type":"error","id":1,"status":200,"message":"x"}',
    b"I\x01\x05nodeA\x00" + b"\x01\x00\x00\x00\x00",  # stream id 0
]


@pytest.mark.parametrize("message", MALFORMED, ids=repr)
def test_malformed_envelopes_raise_protocol_error(message):
    with pytest.raises(wire.ProtocolError):
        wire.decode_envelope(message)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_arbitrary_bytes_raise_only_protocol_error(message):
    try:
        wire.decode_envelope(b"I\x01" + message)
    except wire.ProtocolError:
        pass


def test_ids_must_fit():
    with pytest.raises(ValueError):
        wire.encode_envelope("", wire.End(1))
    with pytest.raises(ValueError):
        wire.encode_envelope("n" * 256, wire.End(1))
