-- GCRA over several buckets at once.  Each key holds the bucket's "theoretical
-- arrival time" (TAT, ms on the Redis clock).  A request is allowed when now >= TAT - tau
-- in every bucket; then each TAT advances by T.
-- A Lua function other scripts include: charge one
-- request to every bucket of ``buckets`` (key names) whose ``periods[i]`` (emission
-- interval T, ms) is above 0, with ``taus[i]`` (burst tolerance tau, ms), or charge none.
-- Returns 0, 0 when charged, else the index of the first spent bucket and the ms to wait.
local function gcra(buckets, periods, taus)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local tats = {}
  for i = 1, #buckets do
    if periods[i] > 0 then
      local tat = tonumber(redis.call('GET', buckets[i]) or now)
      if tat < now then tat = now end
      if now < tat - taus[i] then return i, math.ceil(tat - taus[i] - now) end
      tats[i] = tat + periods[i]
    end
  end
  for i = 1, #buckets do
    if tats[i] then
      redis.call('SET', buckets[i], tostring(tats[i]), 'PX', math.max(1, math.ceil(tats[i] - now)))
    end
  end
  return 0, 0
end
