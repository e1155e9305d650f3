"""Everything that talks to Redis: the connection, the keys, the scripts, the data.

Every key is named in ``keys``; every Lua script is a file under
``scripts/``; a module here owns one kind of record (instances, agents and
node liveness, caller access, rates, stream leases, conversations).  Other
packages name keys through ``keys`` and never send a script; only the
pub/sub link between nodes (``relay.serving.subscriber``, ``crossnode``)
holds a Redis client of its own.
"""
