-- Forget every caller key of a deleted instance.  KEYS: keys hash.  Returns their hashes.
local hashes = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if string.sub(all[i], 1, 2) ~= 'h:' then table.insert(hashes, cjson.decode(all[i + 1])['key_hash']) end
end
redis.call('DEL', KEYS[1])
return hashes
