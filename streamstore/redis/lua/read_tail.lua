-- Read a session stream together with the session's state and trim floor, in one atomic step.
-- Every message below the floor is in history and nothing at or above it has been trimmed,
-- so a reader that finds the floor above its cursor takes (cursor, floor) from history and
-- the rest from these entries: no gap, no duplicate.
-- KEYS: 1 meta, 2 session stream
-- ARGV: 1 'fwd' or 'rev', 2 exclusive bound (cursor for fwd, '+' or an id for rev), 3 count
-- Returns {state or false, floor or false, entries}.
local meta = redis.call('HMGET', KEYS[1], 'state', 'floor')
local entries
if ARGV[1] == 'fwd' then
  entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[2], '+', 'COUNT', ARGV[3])
else
  local top = ARGV[2]
  if top ~= '+' then
    top = '(' .. top
  end
  entries = redis.call('XREVRANGE', KEYS[2], top, '-', 'COUNT', ARGV[3])
end
return {meta[1], meta[2], entries}
