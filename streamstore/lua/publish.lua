-- Publish batches of messages, each batch to one session, atomically per batch: all of a
-- batch's messages land in the session stream AND the partition feed, or none of them does.
-- Several callers' batches travel in one call (the coalescer merges them); each one is checked
-- and answered on its own, so one refused batch does not refuse the others.
-- KEYS: per batch, six: meta, session stream, partition feed, deadlines zset,
--       dedup hash (current bucket), dedup hash (previous bucket)
-- ARGV: 1 now (seconds), 2 dedup bucket lifetime (ms), 3 high-water mark of a partition feed
--       (entries not yet persisted), then per batch: session id, message count, and one
--       (message id, payload) pair per message
-- Returns one array per batch: 'ok' then stream id, 1 (new) or 0 (duplicate: the first
-- stream id) per message; or a one-element array holding the refusal: SSNOSESSION (no such
-- live session), SSCLOSED <state>, SSBACKPRESSURE (the feed is at its high-water mark:
-- persistence lags), SSWRONGTYPE <why>.
-- Each redis.call costs the server a microsecond or more, so the dedup hashes are read and
-- written once per call for all batches: per batch there remain the session's meta (read and
-- write) and, per message, one XADD to the stream and one to the feed.
local now, lifetime, high_water = ARGV[1], ARGV[2], tonumber(ARGV[3])
local CHUNK = 1000 -- unpack() stays well inside Lua's stack limit

-- The batches: where their keys and messages are, and the dedup fields they ask about.
local batches, asked = {}, {}
local a, k = 4, 0
while a <= #ARGV do
  local session, count = ARGV[a], tonumber(ARGV[a + 1])
  local fields = {}
  for i = 1, count do
    fields[i] = session .. ':' .. ARGV[a + 2 * i]
  end
  for _, key in ipairs({KEYS[k + 5], KEYS[k + 6]}) do
    local list = asked[key] or {}
    asked[key] = list
    for i = 1, count do
      list[#list + 1] = fields[i]
    end
  end
  batches[#batches + 1] = {session = session, first = a + 2, fields = fields, k = k}
  a = a + 2 + 2 * count
  k = k + 6
end

-- What the dedup hashes already hold: known[field] = the first stream id.
local known = {}
for key, fields in pairs(asked) do
  for from = 1, #fields, CHUNK do
    local upto = math.min(from + CHUNK - 1, #fields)
    local values = redis.call('HMGET', key, unpack(fields, from, upto))
    for i = 1, #values do
      if values[i] then
        known[fields[from + i - 1]] = values[i]
      end
    end
  end
end

local lengths, marks = {}, {}

local function publish_batch(batch)
  local k = batch.k
  local meta = redis.call('HMGET', KEYS[k + 1], 'state', 'ttl', 'count', 'deadline')
  local state = meta[1]
  if not state then
    return {'SSNOSESSION'}
  end
  if state ~= 'active' then
    return {'SSCLOSED ' .. state}
  end
  local feed = KEYS[k + 3]
  local length = lengths[feed] or redis.call('XLEN', feed)
  if length >= high_water then
    return {'SSBACKPRESSURE'}
  end
  local out, added, last, new = {'ok'}, 0, nil, {}
  for i, field in ipairs(batch.fields) do
    local first = known[field]
    if first then
      out[#out + 1] = first
      out[#out + 1] = 0
    else
      local payload = ARGV[batch.first + 2 * i - 1]
      local id = redis.call('XADD', KEYS[k + 2], '*', 'd', payload)
      -- Redis does not roll back a script that fails half-way: if the feed cannot take the
      -- entry (a foreign key of another type, found at the first one), take the session
      -- entry back out and refuse the batch.
      local fed = redis.pcall('XADD', feed, '*', 'k', 'm', 's', batch.session, 'i', id, 'd', payload)
      if type(fed) == 'table' and fed['err'] then
        redis.call('XDEL', KEYS[k + 2], id)
        return {'SSWRONGTYPE the partition feed refused the entry'}
      end
      known[field] = id
      new[#new + 1] = field
      out[#out + 1] = id
      out[#out + 1] = 1
      added = added + 1
      last = id
    end
  end
  if added == 0 then
    return out
  end
  lengths[feed] = length + added
  local dedup = KEYS[k + 5]
  local list = marks[dedup] or {}
  marks[dedup] = list
  for _, field in ipairs(new) do
    list[#list + 1] = field
    list[#list + 1] = known[field]
  end
  local ttl = tonumber(meta[2])
  local deadline = meta[4]
  if ttl then
    -- Slide the idle deadline, but touch the deadlines zset only when it moved by more than
    -- a hundredth of the ttl (at most once a second per busy session, for an hour's ttl).
    local next_deadline = tonumber(now) + ttl
    if not deadline or next_deadline - tonumber(deadline) > ttl / 100 then
      redis.call('ZADD', KEYS[k + 4], next_deadline, batch.session)
      deadline = next_deadline
    end
  end
  redis.call('HSET', KEYS[k + 1], 'last_id', last, 'last_active', now,
    'count', (tonumber(meta[3]) or 0) + added, 'deadline', deadline or '')
  return out
end

local replies = {}
for i, batch in ipairs(batches) do
  replies[i] = publish_batch(batch)
end
for key, list in pairs(marks) do
  for from = 1, #list, 2 * CHUNK do
    redis.call('HSET', key, unpack(list, from, math.min(from + 2 * CHUNK - 1, #list)))
  end
  redis.call('PEXPIRE', key, lifetime)
end
return replies
