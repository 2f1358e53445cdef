-- Give the deployment its epoch (a random id, set once), written through a script like every
-- message. A server that drops the effects of scripts when it reloads its append-only file
-- (DESIGN.md section 7: AOF + a restricted `default` ACL user) drops the epoch too, while the
-- partition count, written by a plain command once the epoch is there, survives: a count
-- without an epoch means the server lost acknowledged messages. Two writes, so that the server
-- logs this call as MULTI/EXEC, exactly as it logs a publish.
-- KEYS: 1 deployment hash
-- ARGV: 1 a new random epoch, 2 now (seconds)
-- Returns {epoch in force, state}: 'kept' (it was there), 'new' (a new deployment) or 'lost'
-- (a partition count without an epoch: the caller records the loss).
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch then
  return {epoch, 'kept'}
end
redis.call('HSET', KEYS[1], 'epoch', ARGV[1])
redis.call('HSET', KEYS[1], 'epoch_at', ARGV[2])
if redis.call('HGET', KEYS[1], 'partitions') then
  return {ARGV[1], 'lost'}
end
return {ARGV[1], 'new'}
