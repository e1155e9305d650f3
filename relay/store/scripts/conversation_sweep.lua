-- uses: conversation_sizes
--
-- Drop index entries whose conversation expired, from the least recently
-- active end, stopping at the first live one (the rest expire later).
-- `sizes` given (the instance index): their bytes are given back too.
local function sweep_head(index, cprefix, budget, sizes)
  for _ = 1, budget do
    local head = redis.call('ZRANGE', index, 0, 0)[1]
    if not head or redis.call('EXISTS', cprefix .. head) == 1 then return end
    if sizes then forget(index, sizes, head) else redis.call('ZREM', index, head) end
  end
end

-- Every expired entry, wherever it sits (order by score is only nearly the
-- order of expiry).  Used only on a scope at its limit: that index holds at
-- most max_conversations entries.
local function sweep_all(index, cprefix)
  for _, cid in ipairs(redis.call('ZRANGE', index, 0, -1)) do
    if redis.call('EXISTS', cprefix .. cid) == 0 then redis.call('ZREM', index, cid) end
  end
end
