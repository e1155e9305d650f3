-- uses: release_agent
--
-- Give a slot back.  The agent's own node may have zeroed the counter already
-- (it reconciles counters of agents it sees idle, see ``reset_load``), so the
-- counter never goes below zero: a negative one would let a busy agent be
-- picked past its concurrency.  KEYS: load.  ARGV: session.
release_agent(KEYS[1], ARGV[1])
return 0
