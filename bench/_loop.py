"""Run a coroutine on uvloop when it is installed (it is, with uvicorn[standard]).

The load generator, the fake upstream and the idle-agent connector use the
fastest loop available so that their own overhead stays small next to the
relay's.  The relay picks its loop itself (uvicorn's ``loop="auto"``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
