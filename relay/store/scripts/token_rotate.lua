-- Replace an instance's agent token if (and only if) the presented one is still
-- current: two concurrent rotations with the same old token cannot both win.
-- KEYS: instance hash.  ARGV: old hash, new hash.
if redis.call('HGET', KEYS[1], 'token_hash') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'token_hash', ARGV[2])
return 1
