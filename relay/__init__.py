"""instance-relay: a public, OpenAI-compatible chat URL for a model on your own machine.

This package must stay import-light: the agent imports ``relay.protocol`` and
must not pull in the server stack (starlette, uvicorn, redis) by doing so.
"""

__version__ = "0.1.0"
