-- Whether one node is alive.  KEYS: the nodes zset.  ARGV: node.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0') > now then return 1 end
return 0
