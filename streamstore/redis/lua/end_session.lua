-- Close or delete a session. Its meta hash stays as a tombstone, so that a late publish is
-- refused (SSCLOSED) and never recreates the session; a snapshot goes down the feed so the
-- history catalog records the new state after every message published before it.
-- Closed: the stream stays until the sweeper retires it (once fully persisted).
-- Deleted: the stream goes now (history deletes the messages when the snapshot arrives); the
-- tombstone expires after the given time.
-- KEYS: 1 meta, 2 session stream, 3 sessions index, 4 deadlines, 5 closing zset, 6 feed
-- ARGV: 1 session id, 2 'closed' or 'deleted', 3 now (seconds), 4 snapshot payload,
--       5 tombstone lifetime (ms), 6 only if idle: deadline bound (seconds) or ''
-- Returns the previous state, or false when there is no live session; 'busy' when the
-- idle condition no longer holds.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return false
end
if state == 'deleted' or state == ARGV[2] then
  return state
end
if ARGV[6] ~= '' then
  local deadline = redis.call('ZSCORE', KEYS[4], ARGV[1])
  if not deadline or tonumber(deadline) > tonumber(ARGV[6]) then
    return 'busy'
  end
end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'ended_at', ARGV[3])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('XADD', KEYS[6], '*', 'k', 's', 's', ARGV[1], 'd', ARGV[4])
if ARGV[2] == 'deleted' then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
else
  redis.call('ZADD', KEYS[5], tonumber(ARGV[3]), ARGV[1])
end
return state
