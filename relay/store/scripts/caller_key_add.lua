-- Add a caller key unless the instance is gone or already has too many (each key
-- is two fields: its record, and its id under its hash).
-- KEYS: instance hash, keys hash.  ARGV: key id, record, hash field, max.
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HLEN', KEYS[2]) >= 2 * tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[1])
return 1
