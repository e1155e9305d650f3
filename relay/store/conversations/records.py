"""What a conversation stores, and the records the Dify API reads it back as.

A conversation is a hash (name, inputs, times, owner); each of its messages
is four fields of its messages hash: ``<mid>``, the head (the query and when
it came, as JSON: :func:`message_head`); ``<mid>:s``, the status; ``<mid>:r``,
the answer so far or final (:func:`answer_state`, :func:`unanswered_state`);
``<mid>:f``, the rating.  The scripts (``relay/store/scripts/conversation_*.lua``) write what
these functions encode, and return it for :func:`message` and
:func:`conversation` to decode.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

ANSWERING = "answering"
INTERRUPTED = "interrupted"
FINAL_STATUSES = frozenset({"normal", "stopped", "error"})
RATINGS = frozenset({"like", "dislike"})

#: Characters of the first query that make a new conversation's default name.
DEFAULT_NAME_CHARS = 40
#: Largest token usage object stored with an answer, as JSON (a larger one is left out).
MAX_USAGE_BYTES = 4096


def is_uuid(value: str) -> bool:
    """Whether ``value`` is a canonical uuid string, the only form this store hands out."""
    try:
        return str(uuid.UUID(value)) == value
    except (ValueError, TypeError, AttributeError):
        return False


def clip_utf8(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut to at most ``limit`` UTF-8 bytes on a character boundary, and whether it was cut.

    Lone surrogates (possible in a Python str, never valid UTF-8) become ``?``:
    what is stored must encode.
    """
    data = text.encode("utf-8", "replace")
    if limit <= 0 or len(data) <= limit:
        return data.decode(), False
    # Only the tail of the cut can be a partial sequence: "ignore" drops just that.
    return data[:limit].decode("utf-8", "ignore"), True


def default_name(query: str) -> str:
    """What Dify shows for a new conversation: the start of its first query, on one line."""
    return " ".join(query.split())[:DEFAULT_NAME_CHARS] or "New conversation"


def text(value: bytes | str) -> str:
    """A value of a script's reply as text."""
    return value.decode() if isinstance(value, bytes) else value


def message_head(query: str, now: float) -> bytes:
    """A message's head: its query and when it came."""
    return orjson.dumps({"query": query, "created_at": now})


def unanswered_state(now: float) -> bytes:
    """The answer of a message just reserved (the turn script tells an unanswered one by its start)."""
    return orjson.dumps({"answer": "", "updated_at": now})


def answer_state(answer: str, now: float, max_bytes: int, usage: dict[str, Any] | None = None,
                 truncated: bool = False) -> bytes:
    """An answer as stored: cut to ``max_bytes`` (0: whole), marked ``truncated`` when cut
    here or before (``truncated``), with the token ``usage`` if it is small enough."""
    answer, clipped = clip_utf8(answer, max_bytes)
    state: dict[str, Any] = {"answer": answer, "updated_at": now}
    if truncated or clipped:
        state["truncated"] = True
    if usage is not None and len(orjson.dumps(usage)) <= MAX_USAGE_BYTES:  # the agent's to fill: kept if small
        state["usage"] = usage
    return orjson.dumps(state)


def message(
    conversation_id: str, inputs: dict[str, Any], raw_id: bytes, head: bytes,
    status_raw: bytes | None, state_raw: bytes | None, rating: bytes | None, now: float, stale_after: float,
) -> dict[str, Any]:
    """A message as the API shows it, from its four fields; one still ``answering`` whose last
    write is older than ``stale_after`` seconds reads as ``interrupted``."""
    first = orjson.loads(head)
    state = orjson.loads(state_raw) if state_raw else {"answer": "", "updated_at": first["created_at"]}
    status = text(status_raw) if status_raw else ANSWERING
    if status == ANSWERING and now - state["updated_at"] > stale_after:
        status = INTERRUPTED
    record: dict[str, Any] = {
        "id": text(raw_id),
        "conversation_id": conversation_id,
        "inputs": dict(inputs),
        "query": first["query"],
        "answer": state["answer"],
        "feedback": {"rating": text(rating)} if rating else None,
        "created_at": int(first["created_at"]),
        "status": status,
    }
    if state.get("truncated"):
        record["truncated"] = True
    if state.get("usage") is not None:
        record["usage"] = state["usage"]
    return record


def message_from_fields(
    conversation_id: str, inputs: dict[str, Any], raw_id: bytes, fields: dict[bytes, bytes], now: float,
    stale_after: float,
) -> dict[str, Any] | None:
    """:func:`message` from a mapping of field names to values; None when it has no head."""
    head = fields.get(raw_id)
    if head is None:
        return None
    return message(conversation_id, inputs, raw_id, head, fields.get(raw_id + b":s"), fields.get(raw_id + b":r"),
                   fields.get(raw_id + b":f"), now, stale_after)


def conversation(conversation_id: str, name: bytes, inputs: bytes, created_at: bytes,
                 updated_at: bytes) -> dict[str, Any]:
    """A conversation as the API lists it, from its hash's fields."""
    return {
        "id": conversation_id,
        "name": text(name),
        "inputs": orjson.loads(inputs),
        "status": "normal",
        "created_at": int(float(created_at)),
        "updated_at": int(float(updated_at)),
    }
