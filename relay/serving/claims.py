"""What one request holds while its answer is sent, passed down as a value.

``admission.leased`` makes a :class:`Claim` for the request it admits: the
concurrent-stream lease it must take (not taken yet) and, once the router
has picked, the agent slot it took.  The router's first pick takes the
lease in the same script as the pick (one round trip), and the agent slot
is given back with the lease when the response ends (one round trip too).
The claim travels as an argument (``leased`` → the door's ``run`` →
``operations.run_op`` → ``StreamRouter.open``), so every function that can
take or give back a slot says so in its signature.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.store.leases import PendingLease


@dataclass(slots=True)
class Claim:
    #: The lease while nobody has taken it: the router's first pick takes it (``StreamLeases.pick``).
    pending: PendingLease | None
    #: Agent slots to give back with the lease: (instance id, agent session).
    agents: list[tuple[str, str]] = field(default_factory=list)
    #: The lease was given back: a slot released later goes back on its own.
    settled: bool = False

    def take_pending(self) -> PendingLease | None:
        """The lease still to take, handed to one taker only (the first pick)."""
        pending, self.pending = self.pending, None
        return pending

    def defer_agent_release(self, instance_id: str, session: str) -> bool:
        """Give this agent slot back with the lease; False once the lease went back on its own."""
        if self.settled:
            return False
        self.agents.append((instance_id, session))
        return True
