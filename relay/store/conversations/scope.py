"""Whose conversations (:class:`Scope`), and the 404s that everything outside a scope gets.

Whatever is outside the scope (an unknown id, an id of another scope, an
expired conversation) gets the same 404: an id found in another scope must
look exactly like an id that never existed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import orjson

from relay.errors import NotFound


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose conversations: an instance, a caller (``key:<key_id>`` or ``anon``), a Dify user."""

    instance_id: str
    caller: str
    user: str

    @property
    def digest(self) -> str:
        """The scope as a fixed-size key part (the user is arbitrary text)."""
        return hashlib.sha256(orjson.dumps([self.caller, self.user])).hexdigest()


def not_found(param: str = "conversation_id") -> NotFound:
    """``conversation_not_found``: no conversation of this scope has that id (any more)."""
    return NotFound("conversation not found", param=param, code="conversation_not_found")


def message_not_found(param: str = "message_id") -> NotFound:
    """``message_not_found``: no message of this scope's conversations has that id (any more)."""
    return NotFound("message not found", param=param, code="message_not_found")
