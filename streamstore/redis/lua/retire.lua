-- Retire a closed session from Redis once every one of its messages is in history: drop its
-- stream and index entry and let its meta live on as a tombstone for the given time.
-- KEYS: 1 meta, 2 session stream, 3 sessions index, 4 closing zset
-- ARGV: 1 session id, 2 tombstone lifetime (ms)
-- Returns 1 when retired, 0 when messages still await persistence.
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local meta = redis.call('HMGET', KEYS[1], 'state', 'last_id', 'persisted')
if meta[1] ~= 'closed' then
  redis.call('ZREM', KEYS[4], ARGV[1])
  return 0
end
if meta[2] then
  if not meta[3] then
    return 0
  end
  local lm, ls = parse(meta[2])
  local pm, ps = parse(meta[3])
  if pm < lm or (pm == lm and ps < ls) then
    return 0
  end
end
redis.call('DEL', KEYS[2])
if meta[2] then
  -- Everything up to last_id is in history and the stream is gone: readers take it all from
  -- history (read_tail's rule: every message below the floor is in history).
  local lm, ls = parse(meta[2])
  redis.call('HSET', KEYS[1], 'floor', string.format('%d-%d', lm, ls + 1))
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
