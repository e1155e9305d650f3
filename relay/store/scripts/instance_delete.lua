-- Delete an instance's own keys; 0 when there was no such instance.
-- KEYS: instance, agents, load.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
