-- Publish batches of messages, each batch to one session, atomically per batch: all of a
-- batch's messages land in the session stream AND the partition feed, or none of them does.
-- Several callers' batches travel in one call (the coalescer merges them); each one is checked
-- and answered on its own, so one refused batch does not refuse the others.
-- KEYS: per batch, six: meta, session stream, partition feed, deadlines zset,
--       dedup hash (current bucket), dedup hash (previous bucket)
-- ARGV: 1 now (seconds), 2 dedup bucket lifetime (ms), 3 high-water mark of a partition feed
--       (entries not yet persisted), then per batch: session id, message count (at most
--       1,000), check ('1': look the ids up in the dedup hashes; '0': ids the caller has just
--       generated, which no earlier call can have stored, so only their marks are written),
--       and one (message id, payload) pair per message
-- Returns one flat array: per batch, 'ok' then stream id and 1 (new) or 0 (duplicate: the
-- first stream id) per message; or, for a refused batch, only the refusal: SSNOSESSION (no
-- such live session), SSCLOSED <state>, SSBACKPRESSURE (the feed is at its high-water mark:
-- persistence lags), SSWRONGTYPE <why>.
-- Cost: every redis.call, write above all, and every Lua table or closure costs the server
-- measurably next to the XADDs that are the point (INFO commandstats), so the loop is flat, the
-- reply is one table, and each dedup hash is written once per call however many batches use
-- it.
local now, lifetime, high_water = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out, lengths, marks, seen, none = {}, {}, {}, {}, {}
local a, k = 4, 0
while a <= #ARGV do
  local session, count, check = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2] == '1'
  local meta = redis.call('HMGET', KEYS[k + 1], 'state', 'ttl', 'count', 'deadline')
  local state, feed = meta[1], KEYS[k + 3]
  local length = state == 'active' and (lengths[feed] or redis.call('XLEN', feed))
  if not state then
    out[#out + 1] = 'SSNOSESSION'
  elseif state ~= 'active' then
    out[#out + 1] = 'SSCLOSED ' .. state
  elseif length >= high_water then
    out[#out + 1] = 'SSBACKPRESSURE'
  else
    local fields = {}
    for i = 1, count do
      fields[i] = session .. ':' .. ARGV[a + 1 + 2 * i]
    end
    local current, previous = none, none
    if check then
      current = redis.call('HMGET', KEYS[k + 5], unpack(fields))
      previous = redis.call('HMGET', KEYS[k + 6], unpack(fields))
    end
    local list = marks[KEYS[k + 5]] or {}
    marks[KEYS[k + 5]] = list
    local start, added, last = #out, 0, nil
    out[start + 1] = 'ok'
    for i = 1, count do
      local field = fields[i]
      local first = current[i] or previous[i] or seen[field]
      if first then
        out[start + 2 * i] = first
        out[start + 2 * i + 1] = 0
      else
        local payload = ARGV[a + 2 + 2 * i]
        local id = redis.call('XADD', KEYS[k + 2], '*', 'd', payload)
        -- Redis does not roll back a script that fails half-way: if the feed cannot take
        -- the entry (a foreign key of another type, found at the first one), take the
        -- session entry back out and refuse the batch.
        local fed = redis.pcall('XADD', feed, '*', 'k', 'm', 's', session, 'i', id, 'd', payload)
        if type(fed) == 'table' and fed['err'] then
          redis.call('XDEL', KEYS[k + 2], id)
          for j = #out, start + 1, -1 do
            out[j] = nil
          end
          out[start + 1] = 'SSWRONGTYPE the partition feed refused the entry'
          added = 0
          break
        end
        seen[field] = id
        list[#list + 1] = field
        list[#list + 1] = id
        out[start + 2 * i] = id
        out[start + 2 * i + 1] = 1
        added = added + 1
        last = id
      end
    end
    if added > 0 then
      lengths[feed] = length + added
      local total = (tonumber(meta[3]) or 0) + added
      local ttl, deadline = tonumber(meta[2]), meta[4]
      -- Slide the idle deadline, but touch it (and the deadlines zset) only when it moved
      -- by more than a hundredth of the ttl (at most once a second per busy session, for an
      -- hour's ttl).
      local next_deadline = ttl and tonumber(now) + ttl
      if next_deadline and (not deadline or next_deadline - tonumber(deadline) > ttl / 100) then
        redis.call('ZADD', KEYS[k + 4], next_deadline, session)
        redis.call('HSET', KEYS[k + 1], 'last_id', last, 'last_active', now, 'count', total,
          'deadline', next_deadline)
      else
        redis.call('HSET', KEYS[k + 1], 'last_id', last, 'last_active', now, 'count', total)
      end
    end
  end
  a = a + 3 + 2 * count
  k = k + 6
end
for key, list in pairs(marks) do
  if #list > 0 then
    redis.call('HSET', key, unpack(list))
    -- Every mark must outlive the dedup window (half the bucket's lifetime): renew the
    -- expiry when less than that is left, not at every call.
    if redis.call('PTTL', key) < lifetime / 2 then
      redis.call('PEXPIRE', key, lifetime)
    end
  end
end
return out
