-- uses: release_agent
--
-- A request's end: its lease out of every set, and each agent slot it took
-- given back.  KEYS: the lease's sets, then the agents' load hashes; ARGV:
-- lease id, how many sets, then the agents' sessions.
local sets = tonumber(ARGV[2])
for i = 1, sets do redis.call('ZREM', KEYS[i], ARGV[1]) end
for i = sets + 1, #KEYS do release_agent(KEYS[i], ARGV[i - sets + 2]) end
return 0
