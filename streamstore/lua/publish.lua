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
local meta = redis.call('HMGET', KEYS[1], 'state', 'ttl')
local state = meta[1]
if not state then
  return redis.error_reply('SSNOSESSION')
end
if state ~= 'active' then
  return redis.error_reply('SSCLOSED ' .. state)
end
-- Refuse up front anything that would make a write fail half-way (Redis does not roll back a
-- script that errors after writing): both streams must be streams or absent.
for _, key in ipairs({KEYS[2], KEYS[3]}) do
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'stream' and kind ~= 'none' then
    return redis.error_reply('SSWRONGTYPE ' .. key .. ' is a ' .. kind)
  end
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
    redis.call('XADD', KEYS[3], '*', 'k', 'm', 's', session, 'i', id, 'd', ARGV[i + 1])
    redis.call('HSET', KEYS[5], field, id)
    out[#out + 1] = id
    out[#out + 1] = 1
    added = added + 1
    last = id
  end
end
if added > 0 then
  redis.call('PEXPIRE', KEYS[5], ARGV[3])
  redis.call('HSET', KEYS[1], 'last_id', last, 'last_active', now)
  redis.call('HINCRBY', KEYS[1], 'count', added)
  if meta[2] and meta[2] ~= '' then
    redis.call('ZADD', KEYS[4], tonumber(now) + tonumber(meta[2]), session)
  end
end
return out
