-- Remove an agent only if the entry still belongs to the session that is
-- leaving: a reconnect may already have replaced it with a newer session.
-- KEYS: agents, instance, load.  ARGV: agent id, session, now.
redis.call('HDEL', KEYS[3], ARGV[2])
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw and cjson.decode(raw)['session'] == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HSET', KEYS[2], 'last_seen', ARGV[3])
  return 1
end
return 0
