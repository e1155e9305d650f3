"""The instance-relay agent: runs next to the model, keeps one websocket to the relay.

Import-light by design: ``import agent`` pulls in the wire protocol and the
HTTP/websocket clients, never the relay's server stack (starlette, uvicorn,
redis).  tests/test_agent_imports.py keeps it that way.
"""

__version__ = "0.1.0"
