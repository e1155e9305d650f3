-- uses: conversation_sizes
--
-- One page of a scope's conversations, most recently active first, after
-- last_id when given; drops the entries of expired conversations it meets.
-- Ranks rather than scores make the cursor: ties of activity time stay in one
-- order (Redis orders equal scores by member).
-- KEYS: scope index, instance index, instance sizes.  ARGV: caller, user,
-- last_id or "", count, conversation prefix.
local pos = 0
if ARGV[3] ~= '' then
  local rank = redis.call('ZREVRANK', KEYS[1], ARGV[3])
  if not rank then return {'no_last'} end
  if redis.call('EXISTS', ARGV[5] .. ARGV[3]) == 0 then
    redis.call('ZREM', KEYS[1], ARGV[3])
    forget(KEYS[2], KEYS[3], ARGV[3])
    settle(KEYS[3])
    return {'no_last'}
  end
  pos = rank + 1
end
local count = tonumber(ARGV[4])
local out = {}
while #out < count do
  local batch = redis.call('ZREVRANGE', KEYS[1], pos, pos + count - 1)
  if #batch == 0 then break end
  for _, cid in ipairs(batch) do
    local f = redis.call('HMGET', ARGV[5] .. cid, 'caller', 'user', 'name', 'inputs', 'created_at', 'updated_at')
    if not f[1] then
      -- expired: the entries after it move up one rank, so pos stays
      redis.call('ZREM', KEYS[1], cid)
      forget(KEYS[2], KEYS[3], cid)
    else
      pos = pos + 1
      if f[1] == ARGV[1] and f[2] == ARGV[2] then
        out[#out + 1] = {cid, f[3], f[4], f[5], f[6]}
        if #out == count then break end
      end
    end
  end
end
settle(KEYS[3])
return {'ok', out}
