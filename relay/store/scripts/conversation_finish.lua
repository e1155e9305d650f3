-- uses: conversation_reach, conversation_touch, conversation_sizes
--
-- The final write of a message still answering (a second finish changes nothing).
-- KEYS: conversation, messages, order, scope index, instance index, instance sizes.
-- ARGV: cid, mid, status, state JSON, now, ttl ms, index prefix.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[2], ARGV[2] .. ':s') ~= 'answering' then return 0 end
for _, id in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do reach(ARGV[7] .. id) end
local delta = #ARGV[4] - redis.call('HSTRLEN', KEYS[2], ARGV[2] .. ':r')
redis.call('HSET', KEYS[2], ARGV[2] .. ':s', ARGV[3], ARGV[2] .. ':r', ARGV[4])
account(KEYS[6], ARGV[1], delta)
touch(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], ARGV[1], ARGV[5], tonumber(ARGV[6]), ARGV[7])
return 1
