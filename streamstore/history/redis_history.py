"""History kept in Redis itself (``redis+history://host:port/db``, storage type ``redis``):
messages are never trimmed, only deleted by retention, and every batch is one Lua script.

Keys live under their own prefix (``?prefix=``, default ``ssh``), never the live tier's, with
one hash tag per session::

    {prefix}:{h:<session>}:c   hash: the catalog entry (codec's session row, count, last pos)
    {prefix}:{h:<session>}:m   sorted set, all scores 0: <pos><message id>, in stream-id order
    {prefix}:{h:<session>}:r   hash: <pos> -> JSON of codec.message_row (session id left out)
    {prefix}:{h:<session>}:i   hash: message id -> <pos> (dedup by id)
    {prefix}:index             sorted set, scores 0: session ids (list_sessions by id)
    {prefix}:ages              sorted set: <pos><session id> by message timestamp (retention)
    {prefix}:ended             sorted set: closed/deleted session ids by last activity
    {prefix}:total             string: messages stored in all

``<pos>`` is the stream id as 32 hex digits (ms and seq, each offset by 2**63), so byte order
is stream-id order. A batch touches several sessions and the global keys in one script: a
Redis Cluster is not supported (``+cluster`` URLs are refused). The server must persist (AOF
or RDB save points) and never evict (``noeviction``), unless ``?allow_volatile=true``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, Final, cast
from urllib.parse import urlencode, urlunsplit

import orjson
import redis.exceptions
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from streamstore.codec import message_row, messages_from_rows, session_from_row, session_row
from streamstore.config import Settings
from streamstore.errors import (
    BackpressureError,
    ConfigurationError,
    ConnectionLostError,
    HistoryCorruptError,
    HistoryError,
    HistoryUnavailableError,
    ServerError,
    StreamStoreError,
    translate_redis_errors,
)
from streamstore.history.backend import RetentionDriver, split_url
from streamstore.models import Message, Session, StreamId
from streamstore.redis.connection import connect, url_user

__all__ = ["RedisHistory"]

_SCHEMES: Final = {"redis+history": "redis", "rediss+history": "rediss", "unix+history": "unix"}
_USAGE: Final = (
    "expected redis+history://host:port/db, rediss+history://host:port/db or "
    "unix+history:///path.sock?db=0, with ?prefix=NAME and ?allow_volatile=true as options"
)
_OFFSET: Final = 2**63
_MAX_POS: Final = 2**64 - 1
_POS_LEN: Final = 32
_RETENTION_CHUNK: Final = 1000  # messages deleted per script call: the server is not held long
_CATALOG_PAGE: Final = 1000
_CORRUPT: Final = "SSHCORRUPT"

# Every script first checks the types of the keys it will write, so a failure (a key of
# another type planted or left there) happens before its first write: Redis does not undo the
# writes of a script that fails half-way. Past the first write the server's OOM check is no
# longer made (scripts without flags), so memory cannot interrupt it either.
_LUA_CHECKS: Final = """
local function corrupt(what)
  return redis.error_reply('SSHCORRUPT ' .. what)
end
local function wrong_type(key, expected)
  local t = redis.call('TYPE', key)['ok']
  return t ~= 'none' and t ~= expected
end
"""

_WRITE_BATCH: Final = (
    _LUA_CHECKS
    + """
-- KEYS: index, ages, ended, total, then c, m, r, i of each session of the batch.
-- ARGV: S, S session ids; N, N x (k, participants, created_at, last_active_at, ttl, metadata,
-- state); G, G x (k, created_at, n, n x (pos, message id, timestamp, row)).
local RANK = {active = 0, closed = 1, deleted = 2}
local GLOBAL = {'zset', 'zset', 'zset', 'string'}
local PER_SESSION = {'hash', 'zset', 'hash', 'hash'}
for j = 1, 4 do
  if wrong_type(KEYS[j], GLOBAL[j]) then return corrupt('a key holds another type') end
end
local total = redis.call('GET', KEYS[4])
if total and not string.match(total, '^%-?%d+$') then
  return corrupt('the total is not a number')
end
local S = tonumber(ARGV[1])
local sids, catalog = {}, {}
for k = 1, S do
  sids[k] = ARGV[1 + k]
  local base = 4 * k
  for j = 1, 4 do
    if wrong_type(KEYS[base + j], PER_SESSION[j]) then
      return corrupt('a key of a session holds another type')
    end
  end
  local f = redis.call('HMGET', KEYS[base + 1], 'state', 'last_active_at', 'count', 'last')
  if f[1] then
    if RANK[f[1]] == nil or tonumber(f[2]) == nil or not string.match(f[3] or '', '^%d+$')
        or (f[4] and not string.match(f[4], '^%x+$')) then
      return corrupt('a catalog entry is damaged')
    end
    catalog[k] = {state = f[1], active = f[2], active_n = tonumber(f[2]),
                  count = tonumber(f[3]), last = f[4]}
  end
end
-- Checked: from here on nothing fails.
local delta, inserted = 0, 0
local a = S + 2
for _ = 1, tonumber(ARGV[S + 2]) do
  local k, state, active = tonumber(ARGV[a + 1]), ARGV[a + 7], ARGV[a + 4]
  local cur = catalog[k]
  if not cur then
    cur = {state = state, active = active, active_n = tonumber(active), count = 0, new = true}
    catalog[k] = cur
  else
    if tonumber(active) > cur.active_n then cur.active, cur.active_n = active, tonumber(active) end
    if RANK[state] > RANK[cur.state] then cur.state = state end
  end
  cur.participants, cur.created = ARGV[a + 2], ARGV[a + 3]
  cur.ttl, cur.metadata = ARGV[a + 5], ARGV[a + 6]
  cur.changed = true
  if state == 'deleted' then
    local base = 4 * k
    local members = redis.call('ZRANGE', KEYS[base + 2], 0, -1)
    for _, member in ipairs(members) do
      redis.call('ZREM', KEYS[2], string.sub(member, 1, 32) .. sids[k])
    end
    delta = delta - #members
    redis.call('DEL', KEYS[base + 2], KEYS[base + 3], KEYS[base + 4])
    cur.count = 0
  end
  a = a + 7
end
a = a + 1
for _ = 1, tonumber(ARGV[a]) do
  local k, created, n = tonumber(ARGV[a + 1]), ARGV[a + 2], tonumber(ARGV[a + 3])
  a = a + 3
  local cur = catalog[k]
  if cur and cur.state == 'deleted' then
    a = a + 4 * n  -- deleted stays deleted
  else
    if not cur then
      cur = {state = 'active', active = '0.0', active_n = 0, count = 0, participants = '[]',
             created = created, ttl = '', metadata = '{}', changed = true, new = true}
      catalog[k] = cur
    end
    local base = 4 * k
    for _ = 1, n do
      local pos, id, ts, row = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
      a = a + 4
      if redis.call('HEXISTS', KEYS[base + 4], id) == 0
          and redis.call('HEXISTS', KEYS[base + 3], pos) == 0 then
        redis.call('ZADD', KEYS[base + 2], 0, pos .. id)
        redis.call('HSET', KEYS[base + 3], pos, row)
        redis.call('HSET', KEYS[base + 4], id, pos)
        redis.call('ZADD', KEYS[2], ts, pos .. sids[k])
        cur.count = cur.count + 1
        inserted = inserted + 1
        if tonumber(ts) > cur.active_n then cur.active, cur.active_n = ts, tonumber(ts) end
        if not cur.last or pos > cur.last then cur.last = pos end
        cur.changed = true
      end
    end
  end
end
for k = 1, S do
  local cur = catalog[k]
  if cur and cur.changed then
    local fields = {'state', cur.state, 'last_active_at', cur.active, 'count', cur.count}
    if cur.last then
      table.insert(fields, 'last'); table.insert(fields, cur.last)
    end
    if cur.participants then
      for _, pair in ipairs({{'participants', cur.participants}, {'created_at', cur.created},
                             {'ttl', cur.ttl}, {'metadata', cur.metadata}}) do
        table.insert(fields, pair[1]); table.insert(fields, pair[2])
      end
    end
    redis.call('HSET', KEYS[4 * k + 1], unpack(fields))
    if cur.new then redis.call('ZADD', KEYS[1], 0, sids[k]) end
    if cur.state ~= 'active' then redis.call('ZADD', KEYS[3], cur.active, sids[k]) end
  end
end
if delta + inserted ~= 0 then redis.call('INCRBY', KEYS[4], delta + inserted) end
return inserted
"""
)

_READ: Final = """
-- KEYS: m, r. ARGV: min, max, limit, '1' for newest first. Rows in the order asked.
local members
if ARGV[4] == '1' then
  members = redis.call('ZREVRANGEBYLEX', KEYS[1], ARGV[2], ARGV[1], 'LIMIT', 0, ARGV[3])
else
  members = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], ARGV[2], 'LIMIT', 0, ARGV[3])
end
local rows = {}
for start = 1, #members, 500 do
  local positions = {}
  for j = start, math.min(start + 499, #members) do
    table.insert(positions, string.sub(members[j], 1, 32))
  end
  for _, row in ipairs(redis.call('HMGET', KEYS[2], unpack(positions))) do
    table.insert(rows, row or '')
  end
end
return rows
"""

# Deleting messages, shared by the retention scripts: KEYS[1] ages, KEYS[2] total.
_LUA_DROP: Final = (
    _LUA_CHECKS
    + """
local function check(keys, types)
  for j, key in ipairs(keys) do
    if wrong_type(key, types[j]) then return true end
  end
  return false
end
-- Drop these members of a session's m set; the catalog count goes down with them.
local function drop(sid, c, m, r, i, members)
  for _, member in ipairs(members) do
    local pos = string.sub(member, 1, 32)
    redis.call('ZREM', m, member)
    redis.call('HDEL', r, pos)
    redis.call('HDEL', i, string.sub(member, 33))
    redis.call('ZREM', KEYS[1], pos .. sid)
  end
  if #members > 0 then
    if redis.call('EXISTS', c) == 1 then redis.call('HINCRBY', c, 'count', -#members) end
    redis.call('INCRBY', KEYS[2], -#members)
  end
end
"""
)

_EXPIRE: Final = (
    _LUA_DROP
    + """
-- KEYS: ages, total, then c, m, r, i of each session. ARGV: older_than ('(' bound), budget,
-- S, S session ids. Deletes the oldest messages below the bound among these sessions.
local S = tonumber(ARGV[3])
local slot = {}
for k = 1, S do
  slot[ARGV[3 + k]] = 4 * k - 1
  if check({KEYS[4 * k - 1], KEYS[4 * k], KEYS[4 * k + 1], KEYS[4 * k + 2]},
           {'hash', 'zset', 'hash', 'hash'}) then
    return corrupt('a key of a session holds another type')
  end
end
if check({KEYS[1], KEYS[2]}, {'zset', 'string'}) then return corrupt('a key holds another type') end
local deleted = 0
local aged = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, entry in ipairs(aged) do
  local pos, sid = string.sub(entry, 1, 32), string.sub(entry, 33)
  local b = slot[sid]
  if b then
    local found = redis.call('ZRANGEBYLEX', KEYS[b + 1], '[' .. pos, '(' .. pos .. '\\255',
                             'LIMIT', 0, 1)
    if #found > 0 then
      drop(sid, KEYS[b], KEYS[b + 1], KEYS[b + 2], KEYS[b + 3], found)
      deleted = deleted + 1
    else
      redis.call('ZREM', KEYS[1], entry)  -- an age with no message: forget it
    end
  end
end
return deleted
"""
)

_CAP: Final = (
    _LUA_DROP
    + """
-- KEYS: ages, total, c, m, r, i. ARGV: session id, cap, budget. Returns {deleted, excess left}.
if check(KEYS, {'zset', 'string', 'hash', 'zset', 'hash', 'hash'}) then
  return corrupt('a key holds another type')
end
local excess = redis.call('ZCARD', KEYS[4]) - tonumber(ARGV[2])
if excess <= 0 then return {0, 0} end
local members = redis.call('ZRANGE', KEYS[4], 0, math.min(excess, tonumber(ARGV[3])) - 1)
drop(ARGV[1], KEYS[3], KEYS[4], KEYS[5], KEYS[6], members)
return {#members, excess - #members}
"""
)

_REMOVE_ENDED: Final = (
    _LUA_DROP
    + """
-- KEYS: ages, total, index, ended, c, m, r, i. ARGV: session id, cap, budget.
-- Returns {deleted, removed, status}: 'cap' (no more to remove), 'moved' (another session is
-- the least recently active now), 'more' (budget spent) or 'removed'.
if check(KEYS, {'zset', 'string', 'zset', 'zset', 'hash', 'zset', 'hash', 'hash'}) then
  return corrupt('a key holds another type')
end
if redis.call('ZCARD', KEYS[3]) <= tonumber(ARGV[2]) then return {0, 0, 'cap'} end
local first = redis.call('ZRANGE', KEYS[4], 0, 0)
if #first == 0 then return {0, 0, 'cap'} end
if first[1] ~= ARGV[1] then return {0, 0, 'moved'} end
if redis.call('HGET', KEYS[5], 'state') == 'active' then
  redis.call('ZREM', KEYS[4], ARGV[1])
  return {0, 0, 'moved'}
end
local members = redis.call('ZRANGE', KEYS[6], 0, tonumber(ARGV[3]) - 1)
drop(ARGV[1], KEYS[5], KEYS[6], KEYS[7], KEYS[8], members)
if redis.call('ZCARD', KEYS[6]) > 0 then return {#members, 0, 'more'} end
redis.call('DEL', KEYS[5], KEYS[6], KEYS[7], KEYS[8])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return {#members, 1, 'removed'}
"""
)


class RedisHistory(RetentionDriver):
    """A :class:`~streamstore.history.HistoryStore` in a Redis-compatible server, built from
    ``redis+history://`` URLs by :meth:`from_url`.

    Retention uses the shared driver (:class:`~streamstore.history.backend.RetentionDriver`):
    its three passes here are scripts deleting at most 1000 messages per call.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        prefix: str = "ssh",
        allow_volatile: bool = False,
        settings: Settings | None = None,
    ) -> None:
        """``redis_url`` is a streamstore Redis URL (``redis://``, ``rediss://``, ``unix://``).

        Raises:
            ConfigurationError: an empty prefix, or a cluster URL.
        """
        if not prefix or any(c in prefix for c in "{}:") or not prefix.isprintable():
            raise ConfigurationError("the redis history prefix must be a name without {, } or :")
        if "cluster" in redis_url.partition("://")[0]:
            raise ConfigurationError(
                "the redis history does not support a Redis Cluster: each batch is one script "
                "over several sessions' keys"
            )
        self._url = redis_url
        self._settings = settings if settings is not None else Settings()
        self._prefix = prefix.encode()
        self._allow_volatile = allow_volatile
        self._client: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._retention_chunk = _RETENTION_CHUNK

    @classmethod
    def from_url(cls, url: str, settings: Settings | None = None) -> RedisHistory:
        """Build (not open) a store from ``redis+history://host:port/db?prefix=ssh``.

        Options: ``prefix`` (of every key, default ``ssh``) and ``allow_volatile`` (``true``
        accepts a server that does not persist or may evict), and ``db`` (for
        ``unix+history://``). TLS files come from ``settings`` (default:
        ``Settings.from_env()``).

        Raises:
            ConfigurationError: the URL is malformed, names a cluster, or has a bad option.
        """
        if "cluster" in url.partition("://")[0]:
            raise ConfigurationError(
                "the redis history does not support a Redis Cluster (a batch is one script)"
            )
        parts, options, others = split_url(
            url, schemes=tuple(_SCHEMES), usage=_USAGE, known=("prefix", "allow_volatile", "db")
        )
        if others:
            raise ConfigurationError(
                f"unknown redis history URL option {others[0][0][:40]!r}: expected prefix, "
                "allow_volatile, db"
            )
        volatile = options.get("allow_volatile", "false").lower()
        if volatile not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigurationError(f"allow_volatile must be true or false, got {volatile[:20]!r}")
        redis_url = urlunsplit(
            parts._replace(
                scheme=_SCHEMES[parts.scheme],
                query=urlencode({"db": options["db"]} if "db" in options else {}),
            )
        )
        return cls(
            redis_url,
            prefix=options.get("prefix", "ssh"),
            allow_volatile=volatile in ("true", "1", "yes"),
            settings=settings if settings is not None else Settings.from_env(),
        )

    # -- life cycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and check that the server keeps what it is given.

        Raises:
            ConfigurationError: the server neither appends to a file nor saves snapshots, or
                its ``maxmemory-policy`` is not ``noeviction`` (unless ``allow_volatile``); or
                it runs in cluster mode.
            HistoryUnavailableError: the server cannot be reached.
            HistoryError: already open, or the server refused.
        """
        if self._client is not None:
            raise HistoryError("the redis history is already open")
        client = connect(self._url, self._settings)
        assert isinstance(client, Redis)  # cluster URLs were refused when built
        try:
            with self._translated():
                await self._check_server(client)
        except BaseException:
            await client.aclose()
            raise
        self._scripts = {
            name: client.register_script(source)
            for name, source in (
                ("write", _WRITE_BATCH),
                ("read", _READ),
                ("expire", _EXPIRE),
                ("cap", _CAP),
                ("remove_ended", _REMOVE_ENDED),
            )
        }
        self._client = client

    async def close(self) -> None:
        """Close the connections. Idempotent."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _check_server(self, client: Redis) -> None:
        info = await client.info()
        if str(info.get("cluster_enabled", 0)) == "1":
            raise ConfigurationError("the redis history does not support a Redis Cluster")
        if self._allow_volatile:
            return
        policy = str(info.get("maxmemory_policy", "noeviction"))
        if policy != "noeviction":
            raise ConfigurationError(
                f"the server's maxmemory-policy is {policy!r}: it may evict history; set it to "
                "noeviction (or add ?allow_volatile=true to the history URL)"
            )
        if str(info.get("aof_enabled", 0)) == "1":
            return
        try:
            save = await client.config_get("save")
        except redis.exceptions.ResponseError:  # CONFIG is refused to this user
            save = {}
        points = [v.decode() if isinstance(v, bytes) else str(v) for v in save.values()]
        if not any(point.strip() for point in points):
            raise ConfigurationError(
                "the server does not persist (no append-only file, no RDB save points): a "
                "restart would lose the history; enable appendonly (or add "
                "?allow_volatile=true to the history URL)"
            )

    # -- the protocol -------------------------------------------------------------------------

    async def write_batch(
        self, messages: Sequence[Message], sessions: Sequence[Session] = ()
    ) -> int:
        """Store a batch in one script and return how many messages were new.

        See :meth:`streamstore.history.HistoryStore.write_batch`: the same rules as the memory
        store's. The script checks every key it will write before its first write.

        Raises:
            HistoryError: not open, or a message cannot be encoded (nothing was written).
            HistoryUnavailableError: the server cannot be reached or is out of memory.
            HistoryCorruptError: a key of the batch holds damaged data or another type.
        """
        client = self._require_client()
        slots: dict[str, int] = {}
        snapshot_args: list[bytes | str] = []
        for session in sessions:
            row = session_row(session)
            _finite(row[2], row[3])
            snapshot_args += [
                str(_slot(slots, session.id)),
                row[1],
                repr(row[2]),
                repr(row[3]),
                "" if row[4] is None else repr(row[4]),
                row[5],
                row[6],
            ]
        groups: dict[str, list[list[bytes | str]]] = {}
        for message in messages:
            fields = message_row(message)
            _finite(fields[8])
            encoded = _dumps(fields[1:])
            groups.setdefault(fields[0], []).append(
                [_pos(fields[1], fields[2]), fields[3], repr(fields[8]), encoded]
            )
        group_args: list[bytes | str] = []
        for session_id in sorted(groups):
            group = groups[session_id]
            oldest = min(float(entry[2]) for entry in group)
            group_args += [str(_slot(slots, session_id)), repr(oldest), str(len(group))]
            for entry in group:
                group_args += entry
        if not slots:
            return 0
        ids = list(slots)
        keys = [self._key(b"index"), self._key(b"ages"), self._key(b"ended"), self._key(b"total")]
        for session_id in ids:
            keys += self._session_keys(session_id)
        args: list[bytes | str] = [
            str(len(ids)),
            *ids,
            str(len(sessions)),
            *snapshot_args,
            str(len(groups)),
            *group_args,
        ]
        encoded_args = [_encode(arg) for arg in args]
        with self._translated():
            inserted = await self._scripts["write"](keys=keys, args=encoded_args, client=client)
        return int(inserted)

    async def read(
        self,
        session_id: str,
        *,
        after: StreamId | None = None,
        before: StreamId | None = None,
        limit: int = 100,
        newest_first: bool = False,
    ) -> list[Message]:
        """Messages of one session with ``after < stream_id < before``, at most ``limit``.

        Raises:
            HistoryError: not open.
            HistoryUnavailableError: the server cannot be reached.
            HistoryCorruptError: a stored row does not decode.
        """
        client = self._require_client()
        if limit <= 0:
            return []
        low, high = b"-", b"+"
        if after is not None and (floor := _floor(*after)) is not None:
            low = b"(" + floor.encode() + b"\xff"  # past every member at that position
        if before is not None and (ceiling := _ceiling(*before)) is not None:
            high = b"(" + ceiling.encode()
        keys = self._session_keys(session_id)
        with self._translated():
            rows = await self._scripts["read"](
                keys=[keys[1], keys[2]],
                args=[low, high, str(limit), "1" if newest_first else "0"],
                client=client,
            )
        try:
            return messages_from_rows(session_id, [orjson.loads(row) for row in rows])
        except (orjson.JSONDecodeError, ValueError, TypeError):
            raise HistoryCorruptError(
                f"a stored message of session {session_id!r} does not decode"
            ) from None

    async def get_session(self, session_id: str) -> Session | None:
        """The catalog entry of a session, or None.

        Raises:
            HistoryError: not open.
            HistoryUnavailableError: the server cannot be reached.
            HistoryCorruptError: the entry does not decode.
        """
        client = self._require_client()
        with self._translated():
            fields = await client.hgetall(self._session_keys(session_id)[0])
        return _session(session_id, fields) if fields else None

    async def list_sessions(self, *, after: str | None = None, limit: int = 100) -> list[Session]:
        """Catalog entries ordered by session id, starting after ``after``.

        Raises:
            HistoryError: not open.
            HistoryUnavailableError: the server cannot be reached.
            HistoryCorruptError: an entry does not decode.
        """
        client = self._require_client()
        if limit <= 0:
            return []
        low = b"-" if after is None else b"(" + _encode(after)
        with self._translated():
            ids = _members(
                await client.zrangebylex(self._key(b"index"), low, b"+", start=0, num=limit)
            )
            async with client.pipeline(transaction=True) as pipe:
                for raw in ids:
                    pipe.hgetall(self._session_keys(raw.decode())[0])
                entries = await pipe.execute()
        return [
            _session(raw.decode(), fields)
            for raw, fields in zip(ids, entries, strict=True)
            if fields
        ]

    async def count_messages(self, session_id: str | None = None) -> int:
        """How many messages are stored, in one session or in all.

        Raises:
            HistoryError: not open.
            HistoryUnavailableError: the server cannot be reached.
        """
        client = self._require_client()
        with self._translated():
            if session_id is None:
                total = await client.get(self._key(b"total"))
                return int(total or 0)
            return int(await client.zcard(self._session_keys(session_id)[1]))

    # -- retention passes (the driver is RetentionDriver.enforce_retention) ------------------------

    def _require_open(self) -> None:
        self._require_client()

    async def _remove_sessions_beyond(self, cap: int) -> tuple[int, int]:
        client = self._require_client()
        messages = sessions = 0
        while True:
            with self._translated():
                first = _members(await client.zrange(self._key(b"ended"), 0, 0))
                if not first:
                    break
                session_id = first[0].decode()
                deleted, removed, status = await self._scripts["remove_ended"](
                    keys=[
                        self._key(b"ages"),
                        self._key(b"total"),
                        self._key(b"index"),
                        self._key(b"ended"),
                        *self._session_keys(session_id),
                    ],
                    args=[first[0], str(cap), str(self._retention_chunk)],
                    client=client,
                )
            messages += int(deleted)
            sessions += int(removed)
            if status == b"cap":
                break
        return messages, sessions

    async def _delete_older_than(self, older_than: float) -> int:
        client = self._require_client()
        bound = "(" + repr(older_than)
        deleted = 0
        while True:
            with self._translated():
                aged = _members(
                    await client.zrangebyscore(
                        self._key(b"ages"), "-inf", bound, start=0, num=self._retention_chunk
                    )
                )
                if not aged:
                    return deleted
                ids = sorted({entry[_POS_LEN:] for entry in aged})
                keys = [self._key(b"ages"), self._key(b"total")]
                for raw in ids:
                    keys += self._session_keys(raw.decode())
                deleted += int(
                    await self._scripts["expire"](
                        keys=keys,
                        args=[bound, str(self._retention_chunk), str(len(ids)), *ids],
                        client=client,
                    )
                )
            if len(aged) < self._retention_chunk:
                return deleted

    async def _cap_sessions(self, cap: int) -> int:
        client = self._require_client()
        deleted = 0
        low = b"-"
        while True:
            with self._translated():
                ids = _members(
                    await client.zrangebylex(
                        self._key(b"index"), low, b"+", start=0, num=_CATALOG_PAGE
                    )
                )
                if not ids:
                    return deleted
                async with client.pipeline(transaction=False) as pipe:
                    for raw in ids:
                        pipe.zcard(self._session_keys(raw.decode())[1])
                    counts = await pipe.execute()
                for raw, count in zip(ids, counts, strict=True):
                    excess = int(count) - cap
                    while excess > 0:
                        went, excess = await self._scripts["cap"](
                            keys=[
                                self._key(b"ages"),
                                self._key(b"total"),
                                *self._session_keys(raw.decode()),
                            ],
                            args=[raw, str(cap), str(self._retention_chunk)],
                            client=client,
                        )
                        deleted += int(went)
            low = b"(" + ids[-1]

    # -- keys, errors -------------------------------------------------------------------------

    def _key(self, name: bytes) -> bytes:
        return self._prefix + b":" + name

    def _session_keys(self, session_id: str) -> list[bytes]:
        """c, m, r, i: catalog, positions, rows, ids (single letters: no two kinds collide)."""
        base = self._prefix + b":{h:" + _encode(session_id) + b"}:"
        return [base + b"c", base + b"m", base + b"r", base + b"i"]

    def _require_client(self) -> Redis:
        if self._client is None:
            raise HistoryError("the redis history is not open (call open() first)")
        return self._client

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """Redis errors as history errors; none quotes a value."""
        try:
            with translate_redis_errors(user=url_user(self._url)):
                yield
        except (ConnectionLostError, BackpressureError) as exc:
            raise HistoryUnavailableError(f"the redis history is unavailable: {exc}") from exc
        except ServerError as exc:
            cause = exc.__cause__
            text = str(cause) if cause is not None else ""
            if _CORRUPT in text or "WRONGTYPE" in text:
                raise HistoryCorruptError(
                    "the redis history holds damaged data or a key of another type"
                ) from exc
            raise HistoryError(f"the redis history failed: {exc}") from exc


def _members(reply: Any) -> list[bytes]:
    """A reply listing sorted-set members (bytes: the client does not decode)."""
    return cast("list[bytes]", reply)


def _slot(slots: dict[str, int], session_id: str) -> int:
    """The 1-based index of a session in the batch's key list."""
    return slots.setdefault(session_id, len(slots) + 1)


_LOW: Final = -_OFFSET
_HIGH: Final = _OFFSET - 1


def _floor(ms: int, seq: int) -> str | None:
    """The greatest storable position at or below (ms, seq); None: below them all."""
    if ms > _HIGH:
        return _pos(_HIGH, _HIGH)
    if ms < _LOW or (ms == _LOW and seq < _LOW):
        return None
    if seq < _LOW:
        return _pos(ms - 1, _HIGH)
    return _pos(ms, min(seq, _HIGH))


def _ceiling(ms: int, seq: int) -> str | None:
    """The least storable position at or above (ms, seq); None: above them all."""
    if ms < _LOW:
        return _pos(_LOW, _LOW)
    if ms > _HIGH or (ms == _HIGH and seq > _HIGH):
        return None
    if seq > _HIGH:
        return _pos(ms + 1, _LOW)
    return _pos(ms, max(seq, _LOW))


def _pos_text(position: int) -> str:
    return f"{position:0{_POS_LEN}x}"


def _pos(ms: int, seq: int) -> str:
    """The stored position of a message.

    Raises:
        HistoryError: a part does not fit a 64-bit integer.
    """
    if not (-_OFFSET <= ms < _OFFSET and -_OFFSET <= seq < _OFFSET):
        raise HistoryError("a stream id does not fit 64-bit integers; nothing was written")
    return _pos_text(((ms + _OFFSET) << 64) | (seq + _OFFSET))


def _finite(*values: float) -> None:
    if any(math.isnan(value) for value in values):
        raise HistoryError("a timestamp is not a number (NaN); nothing was written")


def _dumps(value: object) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError may quote the text: drop it
        raise HistoryError(
            "a message holds text that is not valid Unicode (lone surrogate); nothing was written"
        ) from None


def _encode(value: bytes | str) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        return value.encode()
    except UnicodeEncodeError:
        raise HistoryError(
            "a message or session holds text that is not valid Unicode (lone surrogate)"
        ) from None


def _session(session_id: str, fields: dict[Any, Any]) -> Session:
    """A catalog hash as a Session.

    Raises:
        HistoryCorruptError: it does not decode.
    """
    try:
        last = fields.get(b"last")
        position = None if last is None else int(last, 16)
        ttl = fields[b"ttl"]
        return session_from_row(
            (
                session_id,
                fields[b"participants"],
                float(fields[b"created_at"]),
                float(fields[b"last_active_at"]),
                float(ttl) if ttl else None,
                fields[b"metadata"],
                fields[b"state"].decode(),
                int(fields[b"count"]),
                None if position is None else (position >> 64) - _OFFSET,
                None if position is None else (position & _MAX_POS) - _OFFSET,
            )
        )
    except (KeyError, ValueError, TypeError, StreamStoreError, orjson.JSONDecodeError):
        raise HistoryCorruptError(
            f"the catalog entry of session {session_id!r} does not decode"
        ) from None
