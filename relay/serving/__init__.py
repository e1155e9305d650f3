"""The path every door shares, from admission to the agent and back.

Admission (``admission``, ``overload``), an operation answered
(``operations``), the pick of an agent (``router``), one stream in flight
(``inflight``), the agent's websocket and its sessions (``gateway``,
``sessions``, ``presence``), and the link to the other nodes (``crossnode``,
``subscriber``: pub/sub, the one Redis traffic not in :mod:`relay.store`).
Requests, uploads, upload budgets and the shape of a chat request are
bounded here too (``request_limits``, ``agent_limits``, ``uploads``,
``claims``).
"""
