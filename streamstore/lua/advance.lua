-- Run by a persister after its batch is committed to history and acknowledged.
-- 1. The feed's safe point: every feed entry below it is acknowledged (the group's oldest
--    pending entry, or just after the last delivered one when nothing is pending).
-- 2. For each session of the batch whose newest entry in the batch lies below the safe point,
--    every one of its messages up to that entry is in history: raise its persisted watermark
--    and trim its stream below min(watermark, now - hot tail), recording that floor.
-- 3. Trim the feed below the safe point.
-- KEYS: 1 feed, then (meta, session stream) per session
-- ARGV: 1 group, 2 now (ms), 3 hot tail (ms), then (watermark stream id, feed id) per session
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

local safe = nil
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
for _, group in ipairs(groups) do
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

local cut = string.format('%d-0', math.max(0, tonumber(ARGV[2]) - tonumber(ARGV[3])))
for i = 2, #KEYS, 2 do
  local mark, feed_id = ARGV[i + 2], ARGV[i + 3]
  if less(feed_id, safe) and redis.call('EXISTS', KEYS[i]) == 1 then
    local persisted = redis.call('HGET', KEYS[i], 'persisted')
    if not persisted or less(persisted, mark) then
      persisted = mark
      redis.call('HSET', KEYS[i], 'persisted', mark)
    end
    local floor = persisted
    if less(cut, floor) then
      floor = cut
    end
    local old = redis.call('HGET', KEYS[i], 'floor')
    if not old or less(old, floor) then
      redis.call('XTRIM', KEYS[i + 1], 'MINID', floor)
      redis.call('HSET', KEYS[i], 'floor', floor)
    end
  end
end
redis.call('XTRIM', KEYS[1], 'MINID', safe)
return safe
