"""The bounds a turn is checked against, and the error of each one it meets.

Every bound but the sizes of what a turn brings (:func:`check_sizes`, before
any script) is checked by the turn script (``conversation_turn.lua``): when
the turn is prepared, and again, atomically, when it is stored; :func:`refusal`
is the error of what it refused.  0 turns a bound off.

* ``max_message_bytes`` — a query larger (UTF-8) is refused (422
  ``message_too_large``), and so are inputs whose JSON is larger (422
  ``inputs_too_large``); an answer larger is cut on a character boundary and
  marked ``"truncated": true``.
* ``max_messages`` — a conversation holding that many messages takes no more
  turns (422 ``conversation_full``).
* ``max_conversations`` — per scope; creating one more is 422
  ``too_many_conversations``.  422 (``ValidationFailed``) rather than 429:
  waiting never helps, deleting a conversation does, and clients retry a 429
  on their own.  It is also what the relay answers when an instance has too
  many caller keys (``too_many_keys``).  For an anonymous caller the same
  limit also holds per client address (``Bounds.address``, from the door):
  ``user`` is whatever the client says, so a new one per conversation must
  not sidestep it.
* ``Bounds.conversations`` / ``Bounds.bytes`` (given per turn by the door) —
  what one instance keeps in all: past the first, a new conversation is 422
  ``instance_conversations_full`` (turns in existing ones go on); past the
  second, every new turn is.  Bytes are those of the stored values (queries,
  answers, names, inputs), counted by every script that writes or removes
  them (checkpoints included) in the instance's sizes hash; a conversation
  leaves the count when it leaves the instance index (deleted, purged, or
  found expired: a creation drops expired entries from the index's least
  recently active end, many when the instance looks full), so expiry gives
  its place back.  A turn already accepted is finished whatever the bound:
  the bytes may pass it by what the turns in flight store.
* ``Bounds.caller_bytes`` — one caller's share of those bytes, so that one
  caller cannot fill the instance for everyone: a conversation counts against
  the share of the caller that made it (its key, or without one its client
  address: :meth:`Bounds.identity`), accounted in the same hash by the same
  scripts and given back the same way; past the share, that caller's new
  turns are 422 ``caller_conversations_full`` (others' go on).  A
  conversation stored before the shares existed joins its caller's share at
  its next turn, with all its bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from relay.errors import ValidationFailed
from relay.store.conversations.scope import Scope


@dataclass(frozen=True, slots=True)
class Bounds:
    """What a new turn is checked against besides the store's own bounds (0: none).

    ``conversations`` and ``bytes``: what one instance may keep in all
    (``instance_conversations_full``); ``address``: the client address of an
    anonymous caller, whose conversations count per address as well as per
    ``user`` (the per-scope limit applies to both), so that naming a new
    ``user`` for each conversation does not sidestep it; ``caller_bytes``:
    the bytes of one caller's conversations (its :meth:`identity`), past
    which its turns are ``caller_conversations_full``.
    """

    conversations: int = 0
    bytes: int = 0
    address: str | None = None
    caller_bytes: int = 0

    @property
    def address_digest(self) -> str:
        return hashlib.sha256((self.address or "").encode()).hexdigest()

    def identity(self, scope: Scope) -> str:
        """Whose share of the instance's bytes a new conversation counts against: the caller
        key (``key:<id>``), else the client address (``addr:<hex SHA-256>``, the
        conversation's ``addr``); "" (none) for an anonymous caller without one."""
        if scope.caller.startswith("key:"):
            return scope.caller
        return f"addr:{self.address_digest}" if self.address is not None else ""


NO_BOUNDS = Bounds()


def check_sizes(query: str, inputs: dict[str, Any] | None, max_message_bytes: int) -> None:
    """``max_message_bytes`` on what a turn brings: its query, and a new conversation's
    ``inputs`` (None: the turn continues one, whose inputs are stored)."""
    if not max_message_bytes:
        return
    size = len(query.encode())
    if size > max_message_bytes:
        raise ValidationFailed(
            f"query is {size} bytes; the limit is {max_message_bytes}",
            param="query", code="message_too_large",
        )
    if inputs is not None:
        inputs_json = orjson.dumps(inputs)
        if len(inputs_json) > max_message_bytes:
            raise ValidationFailed(
                f"inputs are {len(inputs_json)} bytes of JSON; the limit is {max_message_bytes}",
                param="inputs", code="inputs_too_large",
            )


def refusal(verdict: str, bounds: Bounds, *, max_messages: int, max_conversations: int) -> ValidationFailed | None:
    """The error of a turn the turn script refused for a bound (its ``verdict``); None for
    any other verdict."""
    if verdict == "full":
        return ValidationFailed(
            f"this conversation already holds {max_messages} messages; start a new one",
            param="conversation_id", code="conversation_full",
        )
    if verdict == "too_many":
        return ValidationFailed(
            f"at most {max_conversations} conversations per user; delete one first",
            code="too_many_conversations",
        )
    if verdict == "too_many_here":
        return ValidationFailed(
            f"at most {max_conversations} conversations per client address without a caller key; "
            "delete one first", code="too_many_conversations",
        )
    if verdict == "instance_full":
        return ValidationFailed(
            f"this instance keeps {bounds.conversations} conversations, its limit: continue one of yours, "
            "or ask its owner to delete old ones", code="instance_conversations_full",
        )
    if verdict == "caller_bytes_full":
        return ValidationFailed(
            f"your conversations on this instance hold {bounds.caller_bytes} bytes, the most one caller "
            "(a caller key, or without one a client address) may keep: delete some of them "
            "(DELETE /conversations/{conversation_id}) to store new turns",
            code="caller_conversations_full",
        )
    if verdict == "instance_bytes_full":
        return ValidationFailed(
            f"this instance's conversations hold {bounds.bytes} bytes, its limit: "
            "delete conversations, or ask its owner to", code="instance_conversations_full",
        )
    return None
