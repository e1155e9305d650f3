"""Server-Sent Events (WHATWG HTML s9.2): framing for both sides, parsing for the agent.

The agent frames each chunk of the model's stream as an event before it
sends it, so the relay writes bytes without looking at them.  The parser
reads the model server's event stream on the agent.
"""

from __future__ import annotations

import re

#: The last event of an OpenAI stream.
SSE_DONE = b"data: [DONE]\n\n"


def sse_event(json_bytes: bytes) -> bytes:
    """One event carrying a JSON payload."""
    return b"data: " + json_bytes + b"\n\n"


_LINE_END = re.compile(rb"\r\n|\r|\n")


def iter_sse_data(buffer: bytearray, data: bytes) -> list[bytes]:
    """Feed bytes of an event stream; return the ``data`` of each complete event.

    A small incremental parser for the subset of the SSE format (WHATWG HTML
    s9.2.6) that OpenAI-style servers emit: ``data`` fields, comments, blank
    line = dispatch; lines may end in CRLF, LF or CR, even mixed in one stream
    (so the parser works line by line rather than looking for one fixed
    blank-line pattern); multi-line data joined by LF.  ``buffer`` keeps the
    unfinished event between calls.
    """
    buffer += data
    if b"\r" not in buffer:
        return _lf_events(buffer)
    events: list[bytes] = []
    lines: list[bytes] = []
    pos = event_start = 0
    size = len(buffer)
    while (match := _LINE_END.search(buffer, pos)) is not None:
        line = bytes(buffer[pos : match.start()])
        if match.end() == size and match.group() == b"\r" and line:
            # A CR ending the buffer may be the first half of a CRLF split
            # across feeds; wait for the next byte.  (After an empty line it is
            # safe to dispatch now: a following LF is just one more empty line.)
            break
        pos = match.end()
        if not line:
            if lines:
                events.append(b"\n".join(lines))
                lines = []
            event_start = pos
        elif line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
        elif line == b"data":
            lines.append(b"")
    del buffer[:event_start]
    return events


def _lf_events(buffer: bytearray) -> list[bytes]:
    """The fast path of :func:`iter_sse_data` for LF-only streams (what servers send).

    Splits whole events at blank lines in one pass instead of line by line;
    an event that is exactly one ``data:`` line (nearly all of them) costs one
    slice.
    """
    end = buffer.rfind(b"\n\n")
    if end == -1:
        return []
    block = bytes(buffer[:end])
    del buffer[: end + 2]
    events: list[bytes] = []
    for event in block.split(b"\n\n"):
        if not event.strip(b"\n"):
            continue
        if event.startswith(b"data: ") and b"\n" not in event:
            events.append(event[6:])
            continue
        lines = []
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                value = line[5:]
                lines.append(value[1:] if value.startswith(b" ") else value)
            elif line == b"data":
                lines.append(b"")
        if lines:
            events.append(b"\n".join(lines))
    return events
