-- uses: gcra
--
-- KEYS: the buckets; ARGV: (interval, tolerance) ms per bucket.  Returns {0, 0} when allowed,
-- else {index of the first full bucket, ms until it has room}.
local periods, taus = {}, {}
for i = 1, #KEYS do periods[i], taus[i] = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i]) end
local index, wait = gcra(KEYS, periods, taus)
return {index, wait}
