-- uses: live_entries, pick_agent
--
-- One pick on its own.  KEYS: agents, load, instance.  ARGV: tie, op, here, model, number of live
-- nodes, the live nodes, then the nodes to exclude.
local alive_to = 5 + tonumber(ARGV[5])
return pick_agent(KEYS[1], KEYS[2], KEYS[3], node_set(6, alive_to), ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                  node_set(alive_to + 1, #ARGV))
