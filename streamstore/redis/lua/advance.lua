-- Raise persisted watermarks, trim session streams below them, trim the feed. Run by a
-- persister after its batch is committed and acknowledged (with the batch's marks), and by the
-- sweeper (with none) so that deferred marks are applied even when a partition falls quiet.
--
-- The feed's safe point: every feed entry below it is acknowledged (the group's oldest pending
-- entry, or just after the last delivered one when nothing is pending). A mark (session, newest
-- stream id in the batch, its feed id) lying below the safe point proves that every message of
-- that session up to the stream id is in history (a session's entries enter the feed in stream
-- order). A mark at or above it (an older entry is still pending with another consumer) is
-- deferred in a hash and applied by a later call.
-- KEYS: 1 feed, 2 deferred marks hash
-- ARGV: 1 group, 2 now (ms), 3 hot tail (ms), 4 meta key prefix, 5 stream key prefix,
--       then (session id, watermark stream id, feed id) per session
-- Under maxmemory the writes that grow memory may be refused: they use pcall, and a refused
-- watermark is simply raised by a later call (a stale watermark only delays trimming).
-- Returns the safe point, or false when the group does not exist (nothing is trimmed).
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end

if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
local safe = nil
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #group, 2 do
    info[group[i]] = group[i + 1]
  end
  if info['name'] == ARGV[1] then
    if tonumber(info['pending']) > 0 then
      safe = redis.call('XPENDING', KEYS[1], ARGV[1])[2]
    else
      local ms, seq = parse(info['last-delivered-id'])
      safe = string.format('%d-%d', ms, seq + 1)
    end
  end
end
if not safe then
  return false
end
-- Trim the feed first: it frees memory and needs none.
redis.call('XTRIM', KEYS[1], 'MINID', safe)

local cut = string.format('%d-0', math.max(0, tonumber(ARGV[2]) - tonumber(ARGV[3])))
local function refused(reply)
  -- true when the server is out of memory; any other error (a missing ACL permission, a
  -- wrong key type) still fails the script loudly
  if type(reply) == 'table' and reply['err'] ~= nil then
    if string.sub(reply['err'], 1, 3) == 'OOM' then
      return true
    end
    error(reply)
  end
  return false
end
local function apply(session, mark)
  local meta, stream = ARGV[4] .. session, ARGV[5] .. session
  if redis.call('EXISTS', meta) == 0 then
    return
  end
  local persisted = redis.call('HGET', meta, 'persisted')
  if not persisted or less(persisted, mark) then
    if refused(redis.pcall('HSET', meta, 'persisted', mark)) then
      return
    end
    persisted = mark
  end
  local floor = persisted
  if less(cut, floor) then
    floor = cut
  end
  local old = redis.call('HGET', meta, 'floor')
  if not old or less(old, floor) then
    -- The floor is recorded before the trim: a reader must never see entries missing above
    -- the floor it reads.
    if not refused(redis.pcall('HSET', meta, 'floor', floor)) then
      redis.call('XTRIM', stream, 'MINID', floor)
    end
  end
end

for i = 6, #ARGV, 3 do
  local session, mark, feed_id = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if less(feed_id, safe) then
    apply(session, mark)
  else
    local held = redis.call('HGET', KEYS[2], session)
    if not held or less(string.match(held, '^(%S+)'), mark) then
      refused(redis.pcall('HSET', KEYS[2], session, mark .. ' ' .. feed_id))
    end
  end
end
local deferred = redis.call('HGETALL', KEYS[2])
for i = 1, #deferred, 2 do
  local mark, feed_id = string.match(deferred[i + 1], '^(%S+) (%S+)$')
  if less(feed_id, safe) then
    apply(deferred[i], mark)
    redis.call('HDEL', KEYS[2], deferred[i])
  end
end
return safe
