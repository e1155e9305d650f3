-- Change some fields of an instance that still exists.  KEYS: instance hash.  ARGV: field, value, ...
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if #ARGV > 0 then redis.call('HSET', KEYS[1], unpack(ARGV)) end
return 1
