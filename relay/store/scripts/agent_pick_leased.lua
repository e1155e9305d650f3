-- uses: live_entries, pick_agent, lease
--
-- A request's first pick and its stream lease, in one script: the lease is
-- checked first (as when it was taken on its own, before the pick), and taken
-- only when an agent was picked, so a request that finds no agent holds none.
-- KEYS: agents, load, instance (the pick's), then the lease's sets.  ARGV:
-- tie break, op, here, model (the pick's), lease id, TTL ms, one limit per
-- set, then the live nodes.  Returns the pick's answer, or {'full', index}.
local sets = {unpack(KEYS, 4)}
local limits_to = 6 + #sets
local now = lease_now()
local full = lease_full(sets, {unpack(ARGV, 7, limits_to)}, now)
if full > 0 then return {'full', full} end
local picked = pick_agent(KEYS[1], KEYS[2], KEYS[3], node_set(limits_to + 1, #ARGV), ARGV[1], ARGV[2], ARGV[3],
                          ARGV[4], {})
if picked[1] == 'ok' then lease_take(sets, ARGV[5], tonumber(ARGV[6]), now) end
return picked
