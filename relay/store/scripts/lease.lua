-- Take a lease in every set, or in none.  Expired leases (their node died
-- without releasing them) are swept first.  ``lease_full`` returns 0, or the
-- index of the first set that is full; ``lease_take`` adds the lease.  Lua
-- functions, so that the pick can take the lease in the same script.
local function lease_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function lease_full(sets, limits, now)
  for i, set in ipairs(sets) do
    redis.call('ZREMRANGEBYSCORE', set, '-inf', now)
    if redis.call('ZCARD', set) >= tonumber(limits[i]) then return i end
  end
  return 0
end
local function lease_take(sets, id, ttl, now)
  for _, set in ipairs(sets) do
    redis.call('ZADD', set, now + ttl, id)
    redis.call('PEXPIRE', set, ttl)
  end
end
