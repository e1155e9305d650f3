-- uses: conversation_owned
--
-- One page of messages, newest first, older than first_id when given.
-- KEYS: conversation, messages, order.  ARGV: caller, user, first_id or "", count.
if not owned(KEYS[1], ARGV[1], ARGV[2]) then return {'missing'} end
local count = tonumber(ARGV[4])
local ids
if ARGV[3] ~= '' then
  local seq = redis.call('ZSCORE', KEYS[3], ARGV[3])
  if not seq then return {'no_first'} end
  ids = redis.call('ZREVRANGEBYSCORE', KEYS[3], '(' .. seq, '-inf', 'LIMIT', 0, count)
else
  ids = redis.call('ZREVRANGE', KEYS[3], 0, count - 1)
end
local fields = {}
for _, mid in ipairs(ids) do
  for _, suffix in ipairs({'', ':s', ':r', ':f'}) do fields[#fields + 1] = mid .. suffix end
end
local values = {}
if #fields > 0 then values = redis.call('HMGET', KEYS[2], unpack(fields)) end
return {'ok', redis.call('HGET', KEYS[1], 'inputs'), ids, values}
