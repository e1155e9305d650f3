-- uses: conversation_reach, conversation_owned, conversation_touch
--
-- Set (rating) or clear ("") a message's feedback, found by message id.
-- KEYS: message index entry, scope index, instance index, instance sizes.
-- ARGV: caller, user, mid, rating or "", now, ttl ms, index prefix,
--       conversation prefix, messages prefix, order prefix.
local cid = redis.call('GET', KEYS[1])
if not cid then return 0 end
local conv, msgs, order = ARGV[8] .. cid, ARGV[9] .. cid, ARGV[10] .. cid
reach(conv) reach(msgs) reach(order)
if not owned(conv, ARGV[1], ARGV[2]) or redis.call('HEXISTS', msgs, ARGV[3]) == 0 then return 0 end
if ARGV[4] == '' then
  redis.call('HDEL', msgs, ARGV[3] .. ':f')
else
  redis.call('HSET', msgs, ARGV[3] .. ':f', ARGV[4])
end
touch(conv, msgs, order, KEYS[2], KEYS[3], KEYS[4], cid, ARGV[5], tonumber(ARGV[6]), '')
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[6]))  -- the rated message's own index entry: O(1)
return 1
