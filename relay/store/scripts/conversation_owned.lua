-- owned: whether a conversation is the scope's (its caller and user).
local function owned(conv, caller, user)
  local who = redis.call('HMGET', conv, 'caller', 'user')
  return who[1] == caller and who[2] == user
end
