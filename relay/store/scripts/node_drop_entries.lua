-- Drop an instance's entries of one dead node.  KEYS: agents, load.  ARGV: node.
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local entry = cjson.decode(entries[i + 1])
  if entry['node'] == ARGV[1] then
    redis.call('HDEL', KEYS[1], entries[i])
    redis.call('HDEL', KEYS[2], entry['session'])
  end
end
return 0
