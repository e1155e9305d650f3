"""Keep credentials out of every log record, DEBUG included.

Our own code never logs a token, a key or an ``Authorization`` value.  Two
libraries do at DEBUG level: websockets logs every handshake header (the
agent's ``Authorization: Bearer <agent_token>`` on both sides; uvicorn hands
its ``uvicorn.error`` logger to websockets).  :class:`RedactCredentials` is a
*logger* filter, so it rewrites the record before any handler (a file, a log
shipper, pytest's capture) sees it; the relay's handler applies
:func:`redact` to every line as well.  Stdlib only.
"""

from __future__ import annotations

import logging
import re

REDACTED = "[redacted]"

#: Agent tokens (``ira_``), caller keys (``irk_``), OpenAI-style keys
#: (``sk-``, e.g. an upstream API key) and any bearer credential.
SECRET = re.compile(r"\b(?:ira|irk)_[A-Za-z0-9_\-]{16,}|\bsk-[A-Za-z0-9_\-]{16,}|(?i:bearer)\s+[^\s\"',;]+")
#: Header names whose values are credentials.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})

#: Loggers known to write request headers at DEBUG.
HEADER_LOGGERS = ("uvicorn.error", "websockets", "websockets.client", "websockets.server", "websockets.protocol")


def redact(text: str) -> str:
    return SECRET.sub(REDACTED, text)


def contains_secret(text: str) -> bool:
    return SECRET.search(text) is not None


class RedactCredentials(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and args:
            if len(args) == 2 and isinstance(args[0], str) and args[0].lower() in SECRET_HEADERS:
                # websockets: logger.debug("> %s: %s", name, value)
                record.args = (args[0], REDACTED)
            else:
                record.args = tuple(redact(a) if isinstance(a, str) else a for a in args)
        if isinstance(record.msg, str) and ("_" in record.msg or "earer" in record.msg or "sk-" in record.msg):
            record.msg = redact(record.msg)
        return True


_FILTER = RedactCredentials()


def install(names: tuple[str, ...] = HEADER_LOGGERS) -> None:
    """Attach the filter to each named logger (idempotent)."""
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
