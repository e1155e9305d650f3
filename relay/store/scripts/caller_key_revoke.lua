-- Revoke one key: its record and its id under its hash go together.
-- KEYS: keys hash.  ARGV: key id.  Returns the key's hash (nil: no such key).
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return nil end
local key_hash = cjson.decode(raw)['key_hash']
redis.call('HDEL', KEYS[1], ARGV[1], 'h:' .. key_hash)
return key_hash
