-- Push the expiry of live leases forward.  KEYS: sets (of one slot); ARGV: TTL
-- ms, then the lease id in each set.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  local id = ARGV[i + 1]
  if redis.call('ZSCORE', KEYS[i], id) then
    redis.call('ZADD', KEYS[i], now + ttl, id)
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return 0
