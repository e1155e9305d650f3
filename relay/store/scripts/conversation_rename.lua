-- uses: conversation_owned, conversation_touch, conversation_sizes
--
-- Rename a conversation of the scope (activity: see conversation_touch).
-- KEYS: conversation, messages, order, scope index, instance index, instance sizes.
-- ARGV: caller, user, cid, name, now, ttl ms, index prefix.
if not owned(KEYS[1], ARGV[1], ARGV[2]) then return {'missing'} end
local delta = #ARGV[4] - redis.call('HSTRLEN', KEYS[1], 'name')
redis.call('HSET', KEYS[1], 'name', ARGV[4])
account(KEYS[6], ARGV[3], delta)
touch(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], ARGV[3], ARGV[5], tonumber(ARGV[6]), '')
return {'ok', redis.call('HMGET', KEYS[1], 'name', 'inputs', 'created_at', 'updated_at')}
