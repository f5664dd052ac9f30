"""The Lua scripts of the Redis backend, and the key layout they share.

Every key starts with the namespace (``EVENTBUS_REDIS_NAMESPACE``, default
``eventbus``)::

    {ns}:q:{queue}          LIST  ready messages (whole encoded messages, FIFO)
    {ns}:d:{queue}          ZSET  delayed messages (retries), scored by due time (ms)
    {ns}:a:{worker}:{queue} LIST  messages a worker took and has not acked yet
    {ns}:heartbeats         ZSET  worker id -> last heartbeat (ms, Redis clock)
    {ns}:workers            HASH  worker id -> comma-separated queues it consumes

A message is moved atomically from ``q`` to the worker's ``a`` list when it is
taken (``LPOP`` + ``RPUSH`` in :data:`FETCH`, or ``BLMOVE``) and deleted from
there when acked, so at any moment it is in exactly one place.  An empty string
in a ``q`` list is a wake-up token (see :data:`SCHEDULE`), never a message.

Times come from the Redis server's clock (``TIME``), so hosts with skewed
clocks agree on who is dead and what is due.  The scripts build key names at
run time, so the backend does not support Redis Cluster (like dramatiq's).
"""

from __future__ import annotations

_NOW = """
local __t = redis.call('TIME')
local now = tonumber(__t[1]) * 1000 + math.floor(tonumber(__t[2]) / 1000)
"""

#: Move due delayed messages of a queue to its ready list, then take up to
#: ARGV[1] ready messages into the worker's in-flight list.
#: KEYS: ready list, delayed zset, in-flight list.  ARGV: count, promote limit.
#: Returns the messages taken followed by one last element: the milliseconds until
#: the next delayed message is due ("-1": none).
FETCH = (
    _NOW
    + """
local ready, delayed, inflight = KEYS[1], KEYS[2], KEYS[3]
local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
if #due > 0 then
  redis.call('RPUSH', ready, unpack(due))
  redis.call('ZREM', delayed, unpack(due))
end
local out = {}
local items = redis.call('LPOP', ready, tonumber(ARGV[1]))
if items then
  for i = 1, #items do
    if items[i] ~= '' then out[#out + 1] = items[i] end
  end
  if #out > 0 then redis.call('RPUSH', inflight, unpack(out)) end
end
local nxt = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
if #nxt > 0 then
  out[#out + 1] = tostring(math.max(0, tonumber(nxt[2]) - now))
else
  out[#out + 1] = '-1'
end
return out
"""
)

#: Schedule a message ARGV[2] to become ready in ARGV[1] milliseconds.  When it
#: is now the earliest delayed message, push a wake-up token on the ready list so
#: a blocked consumer re-reads the schedule instead of sleeping past it.
#: KEYS: delayed zset, ready list.  Returns the due time (ms).
SCHEDULE = (
    _NOW
    + """
local eta = now + tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], eta, ARGV[2])
local first = redis.call('ZRANGE', KEYS[1], 0, 0)
if first[1] == ARGV[2] then redis.call('RPUSH', KEYS[2], '') end
return eta
"""
)

_REQUEUE_WORKER = """
local function requeue_worker(ns, w)
  local moved = 0
  local qs = redis.call('HGET', ns .. ':workers', w)
  if qs then
    for q in string.gmatch(qs, '[^,]+') do
      local inflight = ns .. ':a:' .. w .. ':' .. q
      local ready = ns .. ':q:' .. q
      while redis.call('LMOVE', inflight, ready, 'RIGHT', 'LEFT') do moved = moved + 1 end
    end
  end
  redis.call('ZREM', ns .. ':heartbeats', w)
  redis.call('HDEL', ns .. ':workers', w)
  return moved
end
"""

#: Heartbeat of worker ARGV[2] (registering the queues ARGV[3] it consumes), then
#: recovery: every worker silent for ARGV[4] ms has its in-flight messages put
#: back at the front of their queues and is forgotten.
#: ARGV: namespace, worker id, queues (comma-separated), timeout ms, max dead per pass.
#: Returns how many messages were put back.
BEAT = (
    _NOW
    + _REQUEUE_WORKER
    + """
local ns, wid = ARGV[1], ARGV[2]
redis.call('ZADD', ns .. ':heartbeats', now, wid)
redis.call('HSET', ns .. ':workers', wid, ARGV[3])
local dead = redis.call('ZRANGEBYSCORE', ns .. ':heartbeats', '-inf', now - tonumber(ARGV[4]),
  'LIMIT', 0, tonumber(ARGV[5]))
local moved = 0
for _, w in ipairs(dead) do
  if w ~= wid then moved = moved + requeue_worker(ns, w) end
end
return moved
"""
)

#: A stopping worker ARGV[2] puts back whatever it still holds and unregisters.
#: ARGV: namespace, worker id.  Returns how many messages were put back.
RELEASE = _REQUEUE_WORKER + "return requeue_worker(ARGV[1], ARGV[2])\n"

#: Put back messages a consumer found in its own in-flight list without having
#: received them (the reply of a fetch lost with the connection).  Each one still
#: in the list moves to the front of the ready list, in its original order; one
#: already gone (acked meanwhile) is left alone.  Wake-up tokens are dropped.
#: KEYS: in-flight list, ready list.  ARGV: the messages.  Returns how many moved.
RECLAIM = """
local moved = 0
for i = #ARGV, 1, -1 do
  if redis.call('LREM', KEYS[1], 1, ARGV[i]) == 1 and ARGV[i] ~= '' then
    redis.call('LPUSH', KEYS[2], ARGV[i])
    moved = moved + 1
  end
end
return moved
"""

#: Messages not finished yet on the queues ARGV[2..]: ready (wake-up tokens not
#: counted), delayed, and in flight in any registered worker.  ARGV[1]: namespace.
PENDING = """
local ns = ARGV[1]
local workers = redis.call('HKEYS', ns .. ':workers')
local total = 0
for i = 2, #ARGV do
  local q = ARGV[i]
  local ready = ns .. ':q:' .. q
  total = total + redis.call('LLEN', ready) - #redis.call('LPOS', ready, '', 'COUNT', 0)
  total = total + redis.call('ZCARD', ns .. ':d:' .. q)
  for _, w in ipairs(workers) do
    total = total + redis.call('LLEN', ns .. ':a:' .. w .. ':' .. q)
  end
end
return total
"""

#: The queues of every worker whose last heartbeat is at most ARGV[2] ms old,
#: one comma-separated string per worker.  ARGV[1]: namespace.
LIVE_WORKERS = (
    _NOW
    + """
local ns = ARGV[1]
local alive = redis.call('ZRANGEBYSCORE', ns .. ':heartbeats', now - tonumber(ARGV[2]), '+inf')
local out = {}
for _, w in ipairs(alive) do
  local qs = redis.call('HGET', ns .. ':workers', w)
  if qs then out[#out + 1] = qs end
end
return out
"""
)


def ready_key(namespace: str, queue: str) -> str:
    """The list of ready messages of ``queue``."""
    return f"{namespace}:q:{queue}"


def delayed_key(namespace: str, queue: str) -> str:
    """The sorted set of delayed messages of ``queue``."""
    return f"{namespace}:d:{queue}"


def inflight_key(namespace: str, worker_id: str, queue: str) -> str:
    """The list of messages of ``queue`` that ``worker_id`` took and has not acked."""
    return f"{namespace}:a:{worker_id}:{queue}"
