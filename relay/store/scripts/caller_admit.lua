-- uses: gcra
--
-- Who is calling, and charge the rates: one script, so admission is one round trip.
-- All its keys are the instance's (one slot): the presented credential is found
-- by its hash in the instance's own caller keys.  KEYS: instance hash, the
-- instance's caller keys, the caller's bucket when anonymous (by address), the
-- caller's bucket when keyed (by key hash), the instance's bucket.  ARGV:
-- credential hash ('' = none), '1' if a credential was presented, then
-- (interval, tolerance) ms for the caller's and the instance's buckets (0 = not
-- charged).  Returns {verdict, key id, full bucket (1 caller, 2 instance, 0
-- none), wait ms}; 'unknown_key' when a private instance does not know the key
-- (the caller tells an unknown key from another instance's).
-- The rate part is gcra: nothing is charged unless all fit.
local found = redis.call('HMGET', KEYS[1], 'visibility', 'created_at')
if not found[2] then return {'missing', '', 0, 0} end
local key_id = ''
if ARGV[1] ~= '' then
  local kid = redis.call('HGET', KEYS[2], 'h:' .. ARGV[1])
  if kid then
    local raw = redis.call('HGET', KEYS[2], kid)
    if raw and cjson.decode(raw)['key_hash'] == ARGV[1] then key_id = kid end
  end
end
if key_id == '' and found[1] == 'private' then
  if ARGV[2] == '0' then return {'no_key', '', 0, 0} end
  return {'unknown_key', '', 0, 0}
end
local buckets = {key_id == '' and KEYS[3] or KEYS[4], KEYS[5]}
local full, wait = gcra(buckets, {tonumber(ARGV[3]), tonumber(ARGV[5])}, {tonumber(ARGV[4]), tonumber(ARGV[6])})
return {'ok', key_id, full, wait}
