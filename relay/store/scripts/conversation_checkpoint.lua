-- uses: conversation_sizes
--
-- Replace the partial answer of a message still answering.  Not activity (see
-- the module docstring): no TTL or index changes; its bytes are counted.
-- KEYS: conversation, messages, instance sizes.  ARGV: mid, state JSON, cid.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[2], ARGV[1] .. ':s') ~= 'answering' then return 0 end
local delta = #ARGV[2] - redis.call('HSTRLEN', KEYS[2], ARGV[1] .. ':r')
redis.call('HSET', KEYS[2], ARGV[1] .. ':r', ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 1 then account(KEYS[3], ARGV[3], delta) end
return 1
