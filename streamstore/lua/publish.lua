-- Publish a batch of messages to one session, atomically: all of them land in the session
-- stream AND the partition feed, or (on an error reply) none of them does.
-- KEYS: 1 meta, 2 session stream, 3 partition feed, 4 deadlines zset,
--       5 dedup hash (current bucket), 6 dedup hash (previous bucket)
-- ARGV: 1 session id, 2 now (seconds), 3 dedup bucket lifetime (ms), 4 high-water mark of
--       the partition feed (entries not yet persisted), then one (message id, payload) pair
--       per message
-- Returns a flat array: stream id, 1 (new) or 0 (duplicate: the first stream id), per message.
-- Errors: SSNOSESSION (no such live session), SSCLOSED <state>, SSBACKPRESSURE (the feed is
-- at its high-water mark: persistence lags), SSWRONGTYPE.
-- Each redis.call costs the server about a microsecond: this script makes as few as it can.
local meta = redis.call('HMGET', KEYS[1], 'state', 'ttl', 'count', 'deadline')
local state = meta[1]
if not state then
  return redis.error_reply('SSNOSESSION')
end
if state ~= 'active' then
  return redis.error_reply('SSCLOSED ' .. state)
end
if redis.call('XLEN', KEYS[3]) >= tonumber(ARGV[4]) then
  return redis.error_reply('SSBACKPRESSURE')
end
local session, now = ARGV[1], ARGV[2]
local out, added, last = {}, 0, nil
for i = 5, #ARGV, 2 do
  local field = session .. ':' .. ARGV[i]
  local first = redis.call('HGET', KEYS[5], field) or redis.call('HGET', KEYS[6], field)
  if first then
    out[#out + 1] = first
    out[#out + 1] = 0
  else
    local id = redis.call('XADD', KEYS[2], '*', 'd', ARGV[i + 1])
    -- Redis does not roll back a script that fails half-way: if the feed cannot take the
    -- entry (a foreign key of another type), take the session entry back out and refuse.
    local fed = redis.pcall('XADD', KEYS[3], '*', 'k', 'm', 's', session, 'i', id, 'd', ARGV[i + 1])
    if type(fed) == 'table' and fed['err'] then
      redis.call('XDEL', KEYS[2], id)
      return redis.error_reply('SSWRONGTYPE the partition feed refused the entry')
    end
    redis.call('HSET', KEYS[5], field, id)
    out[#out + 1] = id
    out[#out + 1] = 1
    added = added + 1
    last = id
  end
end
if added > 0 then
  redis.call('PEXPIRE', KEYS[5], ARGV[3])
  local ttl = tonumber(meta[2])
  local deadline = meta[4]
  if ttl then
    -- Slide the idle deadline, but touch the deadlines zset only when it moved by more than
    -- a hundredth of the ttl (at most once a second per busy session, for an hour's ttl).
    local next_deadline = tonumber(now) + ttl
    if not deadline or next_deadline - tonumber(deadline) > ttl / 100 then
      redis.call('ZADD', KEYS[4], next_deadline, session)
      deadline = next_deadline
    end
  end
  redis.call('HSET', KEYS[1], 'last_id', last, 'last_active', now,
    'count', (tonumber(meta[3]) or 0) + added, 'deadline', deadline or '')
end
return out
