-- Node liveness, on the Redis clock (KEYS: the nodes zset).
-- A heartbeat: ARGV node, TTL ms.  Returns 1 when the node was alive until now.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0')
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if until_ms > now then return 1 end
return 0
