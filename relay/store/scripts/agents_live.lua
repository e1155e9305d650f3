-- uses: live_entries
--
-- KEYS: agents, load.  ARGV: the live nodes.  Flat {entries skipped, agent id, entry, ...}.
local live = live_entries(KEYS[1], KEYS[2], node_set(1, #ARGV))
local out = {redis.call('HLEN', KEYS[1]) - #live}
for _, e in ipairs(live) do
  table.insert(out, e[1])
  table.insert(out, e[2])
end
return out
