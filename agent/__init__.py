"""The instance-relay agent: runs next to the model, keeps one websocket to the relay.

It depends on the wire protocol (the ``wire`` package) and its HTTP and
websocket clients, and on nothing of the relay's: ``import agent`` never
pulls in starlette, uvicorn or redis (tests/test_agent_imports.py).
"""

from wire import __version__

__all__ = ["__version__"]
