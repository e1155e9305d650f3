"""instance-relay: a public, OpenAI-compatible chat URL for a model on your own machine.

The relay server.  It shares the wire protocol (the ``wire`` package) with
the agent; the version of the whole distribution is ``wire.__version__``.
"""

from wire import __version__

__all__ = ["__version__"]
