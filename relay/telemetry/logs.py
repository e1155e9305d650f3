"""Log lines: plain text or one JSON object per line, ids on every line.

Every line written while a request is being served carries three ids, kept
in context variables so that tasks a request starts inherit them:

``request_id``   one per HTTP request (also the ``X-Request-Id`` response
                 header) or per agent websocket connection; travels with a
                 cross-node stream, so both nodes log the same id
``instance_id``  the instance the request is about, when there is one
``node_id``      the relay node writing the line

A message is cut at ``MAX_MESSAGE_CHARS`` characters, whatever it quotes.

``RELAY_LOG_FORMAT=json`` gives ``{"ts", "level", "logger", "msg",
"request_id", "instance_id", "node_id"}`` (+ ``"exc"``) per line, for log
shippers; anything else gives the familiar plain format.

What never reaches a log above DEBUG: prompts and answers (nothing logs a
request body or a chunk), agent tokens, API keys and ``Authorization``
values.  The filter below redacts anything shaped like one as a last line of
defence, so a careless message cannot leak a credential.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import IO

from wire.redaction import contains_secret, redact

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("relay_request_id", default=None)
instance_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("relay_instance_id", default=None)
node_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("relay_node_id", default=None)

#: Set when the relay ends a response or handshake on purpose (a refused
#: agent, a client that stopped reading): uvicorn's complaint about it is noise.
_ended_on_purpose: contextvars.ContextVar[bool] = contextvars.ContextVar("relay_ended_on_purpose", default=False)

_VARS = {"request_id": request_id, "instance_id": instance_id, "node_id": node_id}

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s%(ids)s: %(message)s"

#: Characters of one log message kept; the rest is replaced by a count.  Messages
#: quote what agents and callers declare (an agent id, a model name, an error an
#: agent reported): each is bounded where it is accepted, and this bounds the
#: line whatever a future message quotes, so no peer can make the node write
#: megabytes per line.
MAX_MESSAGE_CHARS = 4096


def bind(**ids: str | None) -> None:
    """Set some of the ids for the rest of this task (and tasks it starts)."""
    for name, value in ids.items():
        _VARS[name].set(value)


def ended_on_purpose() -> None:
    """This task's response is being cut short deliberately (see :class:`DeliberateEndings`)."""
    _ended_on_purpose.set(True)


def current() -> dict[str, str | None]:
    return {name: var.get() for name, var in _VARS.items()}


class ContextFilter(logging.Filter):
    """Stamp each record with the current ids; redact secrets above DEBUG.

    Installed on the handler, so it sees records of every logger (the
    relay's, uvicorn's, third parties') on their way out.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        rid, iid, nid = request_id.get(), instance_id.get(), node_id.get()
        record.request_id, record.instance_id, record.node_id = rid, iid, nid
        parts = [f"node={nid}" if nid else "", f"req={rid}" if rid else "", f"inst={iid}" if iid else ""]
        joined = " ".join(p for p in parts if p)
        record.ids = f" [{joined}]" if joined else ""
        message = record.getMessage()
        if len(message) > MAX_MESSAGE_CHARS:
            message = f"{message[:MAX_MESSAGE_CHARS]}... [{len(message) - MAX_MESSAGE_CHARS} more characters]"
            record.msg, record.args = message, None
        if record.levelno > logging.DEBUG and contains_secret(message):
            record.msg, record.args = redact(message), None
        return True


class DeliberateEndings(logging.Filter):
    """Drop uvicorn's errors for responses the relay ends on purpose, and only those.

    The relay refuses agent handshakes with a real HTTP response (the ASGI
    websocket denial extension) and cuts off clients that stopped reading;
    uvicorn reports both as if the application had failed.  Our own log line
    already says what happened, at the right level.  uvicorn logs from the
    request's own task, so the flag set by :func:`ended_on_purpose` is seen
    here for that request alone: any other incomplete response still shows.
    """

    _MESSAGES = ("ASGI callable returned without completing",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "uvicorn.error" and _ended_on_purpose.get()
                    and str(record.msg).startswith(self._MESSAGES))


class JSONFormatter(logging.Formatter):
    """One JSON object per line; the ids are always present (null when unknown)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "instance_id": getattr(record, "instance_id", None),
            "node_id": getattr(record, "node_id", None),
        }
        if record.exc_info:
            exc = self.formatException(record.exc_info)
            entry["exc"] = exc if record.levelno <= logging.DEBUG else redact(exc)
        return json.dumps(entry, ensure_ascii=False, default=str)

    @staticmethod
    def _timestamp(created: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def make_handler(fmt: str = "plain", stream: IO[str] | None = None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.addFilter(DeliberateEndings())
    handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter(PLAIN_FORMAT))
    handler._relay_handler = True  # type: ignore[attr-defined]
    return handler


def configure(level: str = "info", fmt: str = "plain", stream: IO[str] | None = None) -> logging.Handler:
    """Send every logger's records through one handler on the root logger.

    Idempotent: a previous handler installed here is replaced.  uvicorn is
    configured with ``log_config=None`` (see ``server/edge.py``) so its lines come
    through here too, in the same format.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_relay_handler", False)]:
        root.removeHandler(old)
    handler = make_handler(fmt, stream)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request it makes at INFO (the demo's registration): noise.
    logging.getLogger("httpx").setLevel(logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING)
    return handler
