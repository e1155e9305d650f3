"""The two lists, a page at a time: the size a page may ask for, and the page read from a script's reply.

A conversation's messages page backwards from ``first_id`` (the oldest of the
previous page), newest first; a scope's conversations page forwards from
``last_id``, most recently active first.  Each page is read one more than
asked, to know whether more remain.
"""

from __future__ import annotations

from typing import Any

import orjson

from relay.errors import ValidationFailed
from relay.store.conversations import records

#: Largest page either list returns (Dify's own bound).
MAX_PAGE = 100


def check_limit(limit: int) -> None:
    """Raise ValidationFailed (param ``limit``) unless ``limit`` is an integer from 1 to MAX_PAGE."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise ValidationFailed(f"limit must be an integer from 1 to {MAX_PAGE}", param="limit")


def message_page(
    conversation_id: str, inputs: bytes, ids: list[bytes], values: list[bytes | None], limit: int, now: float,
    stale_after: float,
) -> tuple[list[dict[str, Any]], bool]:
    """Up to ``limit`` messages from the messages script's ids and their four fields each, and
    whether more remain."""
    stored_inputs = orjson.loads(inputs)
    out = []
    for i, raw_id in enumerate(ids[:limit]):
        head, status, state, rating = values[4 * i: 4 * i + 4]
        if head is not None:
            out.append(records.message(conversation_id, stored_inputs, raw_id, head, status, state, rating, now,
                                       stale_after))
    return out, len(ids) > limit


def conversation_page(rows: list[list[bytes]], limit: int) -> tuple[list[dict[str, Any]], bool]:
    """Up to ``limit`` conversations from the list script's rows, and whether more remain."""
    page = [records.conversation(records.text(cid), *rest) for cid, *rest in rows[:limit]]
    return page, len(rows) > limit
