-- uses: conversation_reach, conversation_owned, conversation_sizes
--
-- Delete a conversation of the scope: its keys, its message index entries and its index entries.
-- KEYS: conversation, messages, order, scope index, instance index, instance sizes.
-- ARGV: caller, user, cid, index prefix, address index prefix.
if not owned(KEYS[1], ARGV[1], ARGV[2]) then return 0 end
local ids = redis.call('ZRANGE', KEYS[3], 0, -1)
for _, mid in ipairs(ids) do reach(ARGV[4] .. mid) end
local addr = redis.call('HGET', KEYS[1], 'addr')
if addr then reach(ARGV[5] .. addr) end
for _, mid in ipairs(ids) do redis.call('DEL', ARGV[4] .. mid) end
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[3])
if addr then redis.call('ZREM', ARGV[5] .. addr, ARGV[3]) end
forget(KEYS[5], KEYS[6], ARGV[3])
settle(KEYS[6])
return 1
