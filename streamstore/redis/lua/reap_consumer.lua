-- Remove a consumer from the group only if it holds nothing pending and has been idle long
-- enough, in one atomic step (XGROUP DELCONSUMER would silently drop its pending entries).
-- KEYS: 1 feed
-- ARGV: 1 group, 2 consumer, 3 minimum idle (ms)
-- Returns 1 when removed, 0 otherwise.
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then
  return 0
end
for _, consumer in ipairs(consumers) do
  local info = {}
  for i = 1, #consumer, 2 do
    info[consumer[i]] = consumer[i + 1]
  end
  if info['name'] == ARGV[2] then
    if tonumber(info['pending']) == 0 and tonumber(info['idle']) >= tonumber(ARGV[3]) then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
      return 1
    end
    return 0
  end
end
return 0
