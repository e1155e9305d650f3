-- Move one instance's caller keys and build their index by hash, in one step (a
-- crash between the two would leave keys nobody can use, and a second run would
-- skip them).  One server only, so the two names may be in different slots.
-- KEYS: old name, new name.  Returns 1 when moved.
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RENAME', KEYS[1], KEYS[2])
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  redis.call('HSET', KEYS[2], 'h:' .. cjson.decode(all[i + 1])['key_hash'], all[i])
end
return 1
