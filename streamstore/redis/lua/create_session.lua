-- Create a session: its meta hash, its index entries, and a snapshot in the partition feed
-- (so the history catalog learns of it through the same ordered path as its messages).
-- KEYS: 1 meta, 2 sessions index, 3 deadlines zset, 4 partition feed
-- ARGV: 1 session id, 2 now (seconds), 3 participants (JSON), 4 ttl seconds ('' = none),
--       5 metadata (JSON), 6 snapshot payload
-- Errors: SSEXISTS.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('SSEXISTS')
end
redis.call('HSET', KEYS[1], 'state', 'active', 'participants', ARGV[3], 'metadata', ARGV[5],
  'created_at', ARGV[2], 'last_active', ARGV[2], 'ttl', ARGV[4], 'count', 0)
redis.call('ZADD', KEYS[2], 0, ARGV[1])
if ARGV[4] ~= '' then
  redis.call('ZADD', KEYS[3], tonumber(ARGV[2]) + tonumber(ARGV[4]), ARGV[1])
end
redis.call('XADD', KEYS[4], '*', 'k', 's', 's', ARGV[1], 'd', ARGV[6])
return 1
