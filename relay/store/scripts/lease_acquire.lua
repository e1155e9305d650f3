-- uses: lease
--
-- KEYS: the sets.  ARGV: lease id, TTL ms, then one limit per set.
local now = lease_now()
local full = lease_full(KEYS, {unpack(ARGV, 3)}, now)
if full == 0 then lease_take(KEYS, ARGV[1], tonumber(ARGV[2]), now) end
return full
