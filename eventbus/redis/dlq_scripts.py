"""The Lua scripts of :class:`~eventbus.redis.dlq.RedisDeadLetterStore`.

Each one changes a record and its indexes in one atomic step: listing or
unlisting a record always updates ``{ns}:dlq:ix`` and the per-topic, per-handler,
per-error-type and per-group sorted sets, the group counts and the summaries
together (see the key layout in :mod:`eventbus.redis.dlq`).  Writing or deleting
a record also keeps ``{ns}:dlq:bytes`` (the bytes of every record and summary
stored) true; ``ADD`` counts them once from the hash when the key is missing (a
store written by a version without it, or just cleared).
"""

from __future__ import annotations

NOW = """
local __t = redis.call('TIME')
local now = tonumber(__t[1]) * 1000 + math.floor(tonumber(__t[2]) / 1000)
"""

# Index upkeep shared by the scripts.  P is the key prefix "{ns}:dlq"; a summary
# is the JSON of _summary_json().  A group is "<bytes of handler>:<handler><error type>".
INDEX = """
local P = ARGV[1]
local function group(s)
  return string.len(s.handler) .. ':' .. s.handler .. s.error_type
end
local function index_keys(s)
  return {P .. ':ix:t:' .. s.topic, P .. ':ix:h:' .. s.handler,
          P .. ':ix:e:' .. s.error_type, P .. ':ix:g:' .. group(s)}
end
local function index(id, data)
  if not data then return end
  local s = cjson.decode(data)
  if redis.call('ZADD', P .. ':ix', s.t, id) == 0 then return end
  for _, k in ipairs(index_keys(s)) do
    redis.call('ZADD', k, s.t, id)
    redis.call('SADD', P .. ':ixkeys', k)
  end
  redis.call('HINCRBY', P .. ':groups', group(s), 1)
end
local function unindex(id, data)
  if not data or redis.call('ZREM', P .. ':ix', id) == 0 then return end
  local s = cjson.decode(data)
  if type(s) ~= 'table' or not s.handler then return end  -- no summary: nothing more
  for _, k in ipairs(index_keys(s)) do
    if redis.call('ZREM', k, id) == 1 and redis.call('EXISTS', k) == 0 then
      redis.call('SREM', P .. ':ixkeys', k)
    end
  end
  if redis.call('HINCRBY', P .. ':groups', group(s), -1) <= 0 then
    redis.call('HDEL', P .. ':groups', group(s))
  end
end
local function size_of(id)
  return redis.call('HSTRLEN', P, id) + redis.call('HSTRLEN', P .. ':sum', id)
end
local function count_bytes(delta)
  if delta ~= 0 and redis.call('EXISTS', P .. ':bytes') == 1 then
    if redis.call('INCRBY', P .. ':bytes', delta) < 0 then
      redis.call('SET', P .. ':bytes', 0)
    end
  end
end
"""

# ARGV: prefix, id, record json, summary json, max_size, max_bytes.  Evicts the
# oldest listed records (never the one it adds) while over either bound; returns
# how many it evicted.
ADD = (
    INDEX
    + """
if redis.call('EXISTS', P .. ':bytes') == 0 then
  local total = 0
  for _, k in ipairs(redis.call('HKEYS', P)) do total = total + size_of(k) end
  redis.call('SET', P .. ':bytes', total)
end
local id = ARGV[2]
local seq = redis.call('INCR', P .. ':seq')
local before = size_of(id)
unindex(id, redis.call('HGET', P .. ':sum', id))
redis.call('HSET', P, id, ARGV[3])
redis.call('HSET', P .. ':sum', id, ARGV[4])
count_bytes(string.len(ARGV[3]) + string.len(ARGV[4]) - before)
redis.call('ZREM', P .. ':claimed', id)
redis.call('ZADD', P .. ':order', seq, id)
index(id, ARGV[4])
local max_size, max_bytes = tonumber(ARGV[5]), tonumber(ARGV[6])
local evicted = 0
while redis.call('ZCARD', P .. ':order') > 1 do
  if redis.call('ZCARD', P .. ':order') <= max_size
      and tonumber(redis.call('GET', P .. ':bytes')) <= max_bytes then
    break
  end
  local victim = redis.call('ZRANGE', P .. ':order', 0, 0)[1]
  unindex(victim, redis.call('HGET', P .. ':sum', victim))
  count_bytes(-size_of(victim))
  redis.call('ZREM', P .. ':order', victim)
  redis.call('HDEL', P, victim)
  redis.call('HDEL', P .. ':sum', victim)
  evicted = evicted + 1
end
if evicted > 0 then redis.call('INCRBY', P .. ':evicted', evicted) end
return evicted
"""
)

# ARGV: prefix, claim timeout ms.  Lists stale claims again.
RESTORE = (
    INDEX
    + NOW
    + """
local stale = redis.call('ZRANGEBYSCORE', P .. ':claimed', '-inf', now - tonumber(ARGV[2]),
  'LIMIT', 0, 1000)
for _, id in ipairs(stale) do
  redis.call('ZREM', P .. ':claimed', id)
  if redis.call('HEXISTS', P, id) == 1 then
    redis.call('ZADD', P .. ':order', redis.call('INCR', P .. ':seq'), id)
    index(id, redis.call('HGET', P .. ':sum', id))
  end
end
return #stale
"""
)

# ARGV: prefix, id.  Hides the record and returns it.
CLAIM = (
    INDEX
    + NOW
    + """
local id = ARGV[2]
if redis.call('ZREM', P .. ':order', id) == 0 then return false end
redis.call('ZADD', P .. ':claimed', now, id)
unindex(id, redis.call('HGET', P .. ':sum', id))
return redis.call('HGET', P, id)
"""
)

# ARGV: prefix, id.  Deletes a listed record and returns it.
REMOVE = (
    INDEX
    + """
local id = ARGV[2]
if redis.call('ZREM', P .. ':order', id) == 0 then return false end
unindex(id, redis.call('HGET', P .. ':sum', id))
local data = redis.call('HGET', P, id)
count_bytes(-size_of(id))
redis.call('HDEL', P, id)
redis.call('HDEL', P .. ':sum', id)
return data
"""
)

# ARGV: prefix, id.  Deletes a claimed record (listed again meanwhile, or not).
COMPLETE = (
    INDEX
    + """
local id = ARGV[2]
redis.call('ZREM', P .. ':claimed', id)
if redis.call('ZREM', P .. ':order', id) == 1 then
  unindex(id, redis.call('HGET', P .. ':sum', id))
end
count_bytes(-size_of(id))
redis.call('HDEL', P, id)
redis.call('HDEL', P .. ':sum', id)
return 1
"""
)

# ARGV: prefix.  Deletes every record and index (the eviction counter stays; the
# byte count goes with the records).
CLEAR = """
local P = ARGV[1]
local keys = redis.call('SMEMBERS', P .. ':ixkeys')
for i = 1, #keys, 500 do
  redis.call('DEL', unpack(keys, i, math.min(i + 499, #keys)))
end
redis.call('DEL', P, P .. ':order', P .. ':claimed', P .. ':sum', P .. ':ix',
  P .. ':groups', P .. ':ixkeys', P .. ':bytes')
return 1
"""

# ARGV: prefix, then id, summary pairs.  Indexes listed records the indexes miss
# (written by a version without indexes) and unindexes unlisted ones.
REINDEX = (
    INDEX
    + """
local fixed = 0
for i = 2, #ARGV, 2 do
  local id, data = ARGV[i], ARGV[i + 1]
  local listed = redis.call('ZSCORE', P .. ':order', id)
  local indexed = redis.call('ZSCORE', P .. ':ix', id)
  if listed and not indexed then
    count_bytes(string.len(data) - redis.call('HSTRLEN', P .. ':sum', id))
    redis.call('HSET', P .. ':sum', id, data)
    index(id, data)
    fixed = fixed + 1
  elseif indexed and not listed then
    unindex(id, redis.call('HGET', P .. ':sum', id) or data)
    if redis.call('ZSCORE', P .. ':claimed', id) == false then
      count_bytes(-redis.call('HSTRLEN', P .. ':sum', id))
      redis.call('HDEL', P .. ':sum', id)
    end
    fixed = fixed + 1
  end
end
return fixed
"""
)
