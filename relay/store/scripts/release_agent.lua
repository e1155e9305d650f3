-- Give an agent slot back: its counter down, the field gone at zero.  A Lua
-- function, so that a request's end (``lease_release``) gives it back the same way.
local function release_agent(load, session)
  if redis.call('HINCRBY', load, session, -1) <= 0 then redis.call('HDEL', load, session) end
end
