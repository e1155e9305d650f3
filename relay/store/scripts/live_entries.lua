-- The agents of one instance whose node is alive, as {field, raw, decoded}.
-- ``alive`` is the set of live nodes, as the caller last read it (node
-- liveness is in another slot); an entry of any other node, dead or never
-- heard of, is skipped.  Skipped, not deleted: the caller's list may be up to
-- a second old, and a node that was dead for a moment (Redis unreachable
-- longer than its heartbeat timeout) has re-asserted its entries by then.  A
-- node dead for good has them swept (``NodeLiveness.sweep``).  ``node_set``
-- makes a set of ARGV[from..to].  Shared by the scripts that read agents.
local function node_set(from, to)
  local set = {}
  for i = from, to do set[ARGV[i]] = true end
  return set
end
local function live_entries(agents_key, load_key, alive)
  local entries = redis.call('HGETALL', agents_key)
  local live = {}
  for i = 1, #entries, 2 do
    local entry = cjson.decode(entries[i + 1])
    if alive[entry['node']] then table.insert(live, {entries[i], entries[i + 1], entry}) end
  end
  return live
end
