"""OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``.

The relay answers every error in this shape, and the agent reads it from
model servers (and the relay) that answer in it; some servers put a bare
string under ``error`` instead, which is read as the message too.
"""

from __future__ import annotations

from typing import Any

import orjson


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_message(payload: bytes | str | dict[str, Any]) -> str | None:
    """The message of an OpenAI-shaped error, or None when ``payload`` is not one."""
    if isinstance(payload, dict):
        obj: Any = payload
    else:
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        message = err.get("message")
        return message if isinstance(message, str) else None
    if isinstance(err, str):
        return err
    return None
