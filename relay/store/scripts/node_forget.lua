-- After a sweep: forget a node dead for longer than ARGV[2] ms (1).  If it came
-- back meanwhile (2), end its liveness now: its next heartbeat then finds it
-- ended and re-asserts all its agents, some of which the sweep may have deleted.
-- KEYS: the nodes zset.  ARGV: node, ms.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not until_ms then return 0 end
if tonumber(until_ms) < now - tonumber(ARGV[2]) then return redis.call('ZREM', KEYS[1], ARGV[1]) end
if tonumber(until_ms) > now then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
  return 2
end
return 0
