-- Record a connected agent; its models become the instance's last reported.
-- KEYS: agents, instance.  ARGV: agent id, entry, models (JSON), now.
-- Returns the entry it replaced, or nil.
local previous = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], 'models', ARGV[3], 'last_seen', ARGV[4])
return previous
