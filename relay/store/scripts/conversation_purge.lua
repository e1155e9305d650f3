-- uses: conversation_reach, conversation_sizes
--
-- Delete up to `batch` conversations of an instance, least recently active
-- first.  Entries of expired conversations just leave the index (their keys
-- expire by themselves).  KEYS: instance index, instance sizes.
-- ARGV: batch, conversation, messages, order, index, scope and address index prefixes.
-- Returns {conversations deleted, entries left}.
-- Counted first: the index may be empty at the end, and an emptied key is not
-- touched again (on a migrating slot that too would refuse the script midway).
local entries = redis.call('ZCARD', KEYS[1])
local found = {}
for _, cid in ipairs(redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)) do
  local who = redis.call('HMGET', ARGV[2] .. cid, 'scope', 'addr')
  local scope, addr = who[1], who[2]
  local ids = {}
  if scope then
    ids = redis.call('ZRANGE', ARGV[4] .. cid, 0, -1)
    for _, mid in ipairs(ids) do reach(ARGV[5] .. mid) end
    reach(ARGV[3] .. cid) reach(ARGV[6] .. scope)
    if addr then reach(ARGV[7] .. addr) end
  end
  found[#found + 1] = {cid, scope, ids, addr}
end
local deleted = 0
for _, f in ipairs(found) do
  local cid, scope, ids, addr = f[1], f[2], f[3], f[4]
  if scope then
    for _, mid in ipairs(ids) do redis.call('DEL', ARGV[5] .. mid) end
    redis.call('UNLINK', ARGV[2] .. cid, ARGV[3] .. cid, ARGV[4] .. cid)
    redis.call('ZREM', ARGV[6] .. scope, cid)
    if addr then redis.call('ZREM', ARGV[7] .. addr, cid) end
    deleted = deleted + 1
  end
  forget(KEYS[1], KEYS[2], cid)
end
settle(KEYS[2])
return {deleted, entries - #found}
