-- Activity: the conversation moves to the front of its indexes and every key
-- it has lives `ttl` ms from now.  updated_at never goes back: nodes' clocks
-- differ a little.  The message index entries (one key per message) are
-- refreshed only by turns (`xprefix` given), which read the whole history
-- anyway: a rename or a feedback stays O(1) however long the conversation.
local function touch(conv, msgs, order, scope, all, sizes, cid, now, ttl, xprefix)
  local prev = tonumber(redis.call('HGET', conv, 'updated_at'))
  if not prev or tonumber(now) > prev then redis.call('HSET', conv, 'updated_at', now) end
  redis.call('ZADD', scope, 'GT', now, cid)
  redis.call('ZADD', all, 'GT', now, cid)
  for _, key in ipairs({conv, msgs, order, scope, all, sizes}) do redis.call('PEXPIRE', key, ttl) end
  if xprefix == '' then return end
  for _, mid in ipairs(redis.call('ZRANGE', order, 0, -1)) do redis.call('PEXPIRE', xprefix .. mid, ttl) end
end
