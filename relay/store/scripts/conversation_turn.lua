-- uses: conversation_reach, conversation_owned, conversation_touch, conversation_sizes, conversation_sweep
--
-- Check a new turn, and (unless only checking) reserve its message, creating
-- the conversation first when asked.  Mode "check": the checks and the history,
-- nothing written (sweeps of stale index entries aside), and the history as it is
-- before this message; "reserve": the checks again, then the writes.
-- KEYS: conversation, messages, order, scope index, instance index, instance
--       sizes, address index (used only when ARGV[20] is "1", else the conversation again).
-- ARGV: cid, mid, caller, user, now, ttl ms, index prefix, conversation prefix,
--       max messages, max conversations (per scope, and per address),
--       message head JSON, state JSON, create ("1"/"0"), name, inputs JSON,
--       scope digest, mode, instance max conversations, instance max bytes,
--       address ("1"/"0"), history bytes, history answered messages, address digest,
--       the caller's identity for its share of the bytes ("" none), the share.
--
-- Stale index entries a creation drops from the head of an index, at most:
-- more than the one entry it adds, so the index shrinks back to the live ones.
local SWEEP = 10
-- Stale entries a creation drops from the instance index when the instance
-- looks full: the expired ones are at its least recently active end.
local WIDE = 1000
local cid, mid, now, ttl, mode = ARGV[1], ARGV[2], ARGV[5], tonumber(ARGV[6]), ARGV[17]
local create = ARGV[13] == '1'
local function at_limit(index, limit)
  sweep_head(index, ARGV[8], SWEEP)
  if redis.call('ZCARD', index) < limit then return false end
  sweep_all(index, ARGV[8])
  return redis.call('ZCARD', index) >= limit
end
local function stored() return tonumber(redis.call('HGET', KEYS[6], 'total')) or 0 end
if create then
  sweep_head(KEYS[5], ARGV[8], SWEEP, KEYS[6])
  local limit = tonumber(ARGV[10])
  if limit > 0 and at_limit(KEYS[4], limit) then return {'too_many'} end
  if limit > 0 and ARGV[20] == '1' and at_limit(KEYS[7], limit) then return {'too_many_here'} end
  local most = tonumber(ARGV[18])
  if most > 0 and redis.call('ZCARD', KEYS[5]) >= most then
    sweep_head(KEYS[5], ARGV[8], WIDE, KEYS[6])
    if redis.call('ZCARD', KEYS[5]) >= most then return {'instance_full'} end
  end
  if redis.call('EXISTS', KEYS[1]) == 1 then return {'taken'} end
else
  if not owned(KEYS[1], ARGV[3], ARGV[4]) then return {'missing'} end
  local limit = tonumber(ARGV[9])
  if limit > 0 and redis.call('ZCARD', KEYS[3]) >= limit then return {'full'} end
end
-- Whose share the turn counts against: the conversation's (recorded when it
-- was made, or an older anonymous one's address), else this caller's.
local who = ARGV[24]
if not create then
  local addr = redis.call('HGET', KEYS[1], 'addr')
  who = redis.call('HGET', KEYS[6], 'w:' .. cid) or (addr and ('addr:' .. addr)) or who
end
local share = tonumber(ARGV[25])
local function held() return tonumber(redis.call('HGET', KEYS[6], 'o:' .. who)) or 0 end
if share > 0 and who ~= '' and held() >= share then
  sweep_head(KEYS[5], ARGV[8], WIDE, KEYS[6])
  if held() >= share then return {'caller_bytes_full'} end
end
local most_bytes = tonumber(ARGV[19])
if most_bytes > 0 and stored() >= most_bytes then
  sweep_head(KEYS[5], ARGV[8], WIDE, KEYS[6])
  if stored() >= most_bytes then return {'instance_bytes_full'} end
end
-- The history the model may see: the newest messages, until `most_bytes` of
-- them are read or `most_answered` answered ones (0: no bound); oldest first.
local function history()
  local most_bytes, most_answered = tonumber(ARGV[21]), tonumber(ARGV[22])
  local picked, fields, used, answered = {}, {}, 0, 0
  for _, id in ipairs(redis.call('ZREVRANGE', KEYS[3], 0, -1)) do
    if (most_bytes > 0 and used >= most_bytes) or (most_answered > 0 and answered >= most_answered) then break end
    local v = redis.call('HMGET', KEYS[2], id, id .. ':s', id .. ':r', id .. ':f')
    if v[1] then
      table.insert(picked, 1, id)
      for i, suffix in ipairs({'', ':s', ':r', ':f'}) do
        if v[i] then fields[#fields + 1] = id .. suffix; fields[#fields + 1] = v[i] end
      end
      used = used + #v[1] + #(v[3] or '')
      if v[3] and string.sub(v[3], 1, 13) ~= '{"answer":"",' then answered = answered + 1 end
    end
  end
  return picked, fields
end
if mode == 'check' then
  if create then return {'ok', ARGV[15], {}, {}} end
  local picked, fields = history()
  return {'ok', redis.call('HGET', KEYS[1], 'inputs'), picked, fields}
end
local ids = redis.call('ZRANGE', KEYS[3], 0, -1)
for _, id in ipairs(ids) do reach(ARGV[7] .. id) end
reach(ARGV[7] .. mid)
local size = #ARGV[11] + #ARGV[12]
if create then
  redis.call('HSET', KEYS[1], 'name', ARGV[14], 'inputs', ARGV[15], 'created_at', now, 'updated_at', now,
             'caller', ARGV[3], 'user', ARGV[4], 'scope', ARGV[16], 'seq', 0)
  size = size + #ARGV[14] + #ARGV[15]
  if ARGV[20] == '1' then
    redis.call('HSET', KEYS[1], 'addr', ARGV[23])
    redis.call('ZADD', KEYS[7], now, cid)
    redis.call('PEXPIRE', KEYS[7], ttl)
  end
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('ZADD', KEYS[3], seq, mid)
redis.call('HSET', KEYS[2], mid, ARGV[11], mid .. ':s', 'answering', mid .. ':r', ARGV[12])
redis.call('SET', ARGV[7] .. mid, cid, 'PX', ttl)
if who ~= '' then adopt(KEYS[6], cid, who) end
account(KEYS[6], cid, size)
touch(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], cid, now, ttl, ARGV[7])
return {'ok', redis.call('HGET', KEYS[1], 'inputs'), {}, {}}
