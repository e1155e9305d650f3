"""The identifiers and secrets the store mints, and its replies read as text.

Instance ids; agent tokens (``ira_…``), handed out once and kept only as
their SHA-256 hash, which is also how every lookup finds them; and
:func:`text`, how an id or a hash comes back out of Redis (the client is not
set to decode).
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

TOKEN_PREFIX = "ira_"


def new_token() -> str:
    # 32 random bytes = 256 bits, url-safe so it survives headers and shells.
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    # Tokens carry 256 bits of entropy, so a fast hash is enough: there is
    # nothing to brute-force, and agents authenticate on every reconnect.
    return hashlib.sha256(token.encode()).hexdigest()


def text(value: bytes | str | Any) -> str:
    """A Redis reply as text (the client is not set to decode: chunks stay bytes elsewhere)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def new_instance_id() -> str:
    return secrets.token_hex(8)
