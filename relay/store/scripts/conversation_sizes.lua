-- The instance's stored bytes: `sizes` holds each conversation's bytes
-- (field <cid>) and their sum (field 'total'); and per caller: whose share a
-- conversation counts against (field 'w:<cid>', the caller's identity: its
-- key, or an address) and that caller's sum (field 'o:<identity>').  Every
-- change of a conversation's bytes changes the sums with it.  A conversation
-- leaves the instance index only through `forget`, which gives its bytes back
-- to both: deleted, purged or expired.
local function account(sizes, cid, delta)
  if delta == 0 then return end
  redis.call('HINCRBY', sizes, cid, delta)
  redis.call('HINCRBY', sizes, 'total', delta)
  local who = redis.call('HGET', sizes, 'w:' .. cid)
  if who then redis.call('HINCRBY', sizes, 'o:' .. who, delta) end
end

-- A conversation counts against `who`'s share from now on, with the bytes it
-- holds already (one stored before the shares existed has some).
local function adopt(sizes, cid, who)
  if redis.call('HSETNX', sizes, 'w:' .. cid, who) == 0 then return end
  local n = tonumber(redis.call('HGET', sizes, cid)) or 0
  if n ~= 0 then redis.call('HINCRBY', sizes, 'o:' .. who, n) end
end

local function forget(all, sizes, cid)
  redis.call('ZREM', all, cid)
  local n = tonumber(redis.call('HGET', sizes, cid))
  local who = redis.call('HGET', sizes, 'w:' .. cid)
  -- The hash is never emptied here (its 'total' stays, at 0 at least, until its TTL): on a
  -- cluster, a key a script deletes and then touches again is refused mid-script while its
  -- slot migrates, after the writes before it.
  if who and not n then redis.call('HINCRBY', sizes, 'total', 0) end
  if who then
    redis.call('HDEL', sizes, 'w:' .. cid)
    if redis.call('HINCRBY', sizes, 'o:' .. who, -(n or 0)) <= 0 then redis.call('HDEL', sizes, 'o:' .. who) end
  end
  if n then
    redis.call('HDEL', sizes, cid)
    redis.call('HINCRBY', sizes, 'total', -n)
  end
end

-- A sizes hash that counts nothing any more goes, as an emptied index does.  Only as a
-- script's last access to it: see forget.
local function settle(sizes)
  if redis.call('HLEN', sizes) == 1 and redis.call('HGET', sizes, 'total') == '0' then
    redis.call('DEL', sizes)
  end
end
