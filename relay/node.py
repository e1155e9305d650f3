"""This relay node's identity and the one flag every part reads: is it draining?

Built once by the composition root and handed to the parts that need it;
nothing else is node-wide state.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field


@dataclass(slots=True)
class NodeState:
    #: Random per process: a restarted node is a new node (its agents reconnect).
    node_id: str = field(default_factory=lambda: secrets.token_hex(6))
    #: Set when shutdown begins: new chats get 503, /readyz turns 503.
    draining: bool = False
    #: False until the data in Redis is known to be in this relay's key layout
    #: (``relay.store.migrate``): until then chats and agents get 503, /readyz too.
    layout_ready: bool = True
