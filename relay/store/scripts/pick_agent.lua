-- uses: live_entries
--
-- Choose the agent for one request and count it, atomically, so that
-- concurrent requests on different nodes never overfill the same agent.
-- The least busy agent relative to its declared concurrency wins, among
-- those that can run the operation (``op``; an entry without capabilities
-- is a version-1 agent: chat only); agents at capacity, agents on nodes
-- in ``excluded`` (a set), and agents on other nodes that do not read this bus
-- envelope (entries of 0.1 nodes, during a rolling upgrade; ``here`` is the
-- calling node) are skipped.  Ties are broken by where the scan starts
-- (``tie``, rotated by the caller): scanning from the top let the first
-- agent win every tie, so a replica never got a request that arrived alone.
-- ``model``, when not empty, is a model the agent must serve for that operation
-- (its 'models', 'image_models' for images, 'transcribe_models' for transcribe): replicas may serve different
-- models, and the global /v1 door names one.
-- Returns {'ok', agent_id, entry} | {'busy'} | {'incapable'} | {'no_model'} |
-- {'offline'} | {'missing'}: incapable when no connected agent can run the
-- operation at all, no_model when those that can do not serve the model,
-- offline when those that can are out of reach.
-- A Lua function, so that the stream lease can be taken in the same
-- script (``agent_pick_leased``, ``StreamLeases.pick``).
local function pick_agent(agents_key, load_key, instance_key, alive, tie, op, here, model, excluded)
  local live = live_entries(agents_key, load_key, alive)
  if #live == 0 then
    if redis.call('EXISTS', instance_key) == 0 then return {'missing'} end
    return {'offline'}
  end
  local best, best_load = nil, nil
  local capable, has_model, reachable = false, false, false
  local count = #live
  local start = tonumber(tie) % count
  for k = 0, count - 1 do
    local e = live[((start + k) % count) + 1]
    local entry = e[3]
    local caps = entry['capabilities']
    local can = false
    if type(caps) == 'table' then
      for _, c in ipairs(caps) do
        if c == op then can = true end
      end
    else
      can = op == 'chat'
    end
    if can then
      capable = true
      if model ~= '' then
        local served_field = 'models'
        if op == 'images' then served_field = 'image_models'
        elseif op == 'transcribe' then served_field = 'transcribe_models' end
        local served = entry[served_field]
        can = false
        if type(served) == 'table' then
          for _, m in ipairs(served) do
            if m == model then can = true end
          end
        end
      end
    end
    if can then
      has_model = true
      local node = entry['node']
      if not excluded[node] and (node == here or entry['bus'] ~= nil) then
        reachable = true
        local inflight = tonumber(redis.call('HGET', load_key, entry['session']) or '0')
        if inflight < entry['max_concurrency'] then
          local load = inflight / entry['max_concurrency']
          if best_load == nil or load < best_load then
            best, best_load = e, load
          end
        end
      end
    end
  end
  if best == nil then
    if not capable then return {'incapable'} end
    if not has_model then return {'no_model'} end
    if not reachable then return {'offline'} end
    return {'busy'}
  end
  redis.call('HINCRBY', load_key, best[3]['session'], 1)
  return {'ok', best[1], best[2]}
end
