"""The Lua scripts of the Redis backend, and the key layout they share.

Every key starts with the namespace (``EVENTBUS_REDIS_NAMESPACE``, default
``eventbus``).  A *queue* is ``<service>.<queue>`` (the service scopes it); the
keys of one queue share the hash tag ``{<queue>}``::

    {ns}:{q}:q              LIST  ready entry ids (FIFO); "" is a wake-up token
    {ns}:{q}:d              ZSET  delayed entry ids (retries), scored by due time (ms)
    {ns}:{q}:m              HASH  entry id -> the whole dramatiq message (JSON)
    {ns}:{q}:a:{worker}     LIST  entry ids a worker took and has not acked yet
    {ns}:{q}:p:{actor}      LIST  entry ids parked for a handler no live worker of
                                  this queue has yet (a rolling deploy)
    {ns}:{q}:n              HASH  actor -> its events not finished yet (the backlog)

    {ns}:t:{topic}          HASH  "<service>|<actor>" -> "<queue>\\n<message prefix>"
    {ns}:subs               HASH  "<service>|<topic>|<actor>" -> {"queue": ...}
    {ns}:seen               ZSET  "<service>|<topic>|<actor>" -> last heartbeat (ms)
    {ns}:queues             SET   every queue with a subscription
    {ns}:heartbeats         ZSET  worker id -> last heartbeat (ms, Redis clock)
    {ns}:workers            HASH  worker id -> comma-separated queues it consumes
    {ns}:wsubs              HASH  worker id -> its subscriptions, one per line

**Subscriptions live here.**  A worker writes the subscriptions of its handlers
when it boots (``eventbus subscriptions sync`` writes them without a worker), and
they outlive it.  :data:`PUBLISH` fans an event out to every subscription of its
topic, of every service, inside Redis, all or none, whatever the publishing
process imported.

**Messages are named by entry id.**  The message body lives once in the queue's
``m`` hash from publish until ack; lists hold only ids, so ack, requeue and
recovery move or delete a few bytes, never the message.  A message is moved
atomically from ``q`` to the worker's ``a`` list when it is taken (``LPOP`` +
``RPUSH`` in :data:`FETCH`, or ``BLMOVE``) and deleted when acked.

Times come from the Redis server's clock (``TIME``), so hosts with skewed clocks
agree on who is dead and what is due.

**Redis Cluster.**  The keys of one queue share a hash slot, so the worker's
scripts touch one slot each; :data:`PUBLISH` and the heartbeat touch the keys of
every subscription of a topic and are not cluster-safe.  Use one primary (with
replicas and Sentinel for failover); Redis Cluster is not supported.
"""

from __future__ import annotations

_NOW = """
local __t = redis.call('TIME')
local now = tonumber(__t[1]) * 1000 + math.floor(tonumber(__t[2]) / 1000)
"""

#: Fan events out to every subscription of their topics.
#: ARGV: namespace, strict ("1": write nothing if any topic has no subscription),
#: message timestamp (ms), then 4 per event: topic, envelope JSON, options JSON,
#: entry id base (the n-th subscription's entry is "<base>.<n>").
#: Returns {1, unrouted topics...}, or {0, unrouted topics...} when strict
#: refused (nothing written).
PUBLISH = """
local ns, strict, ts = ARGV[1], ARGV[2] == '1', ARGV[3]
local subs_of, unrouted = {}, {}
for i = 4, #ARGV, 4 do
  local topic = ARGV[i]
  if subs_of[topic] == nil then
    local flat = redis.call('HGETALL', ns .. ':t:' .. topic)
    subs_of[topic] = flat
    if #flat == 0 then unrouted[#unrouted + 1] = topic end
  end
end
if strict and #unrouted > 0 then
  table.insert(unrouted, 1, 0)
  return unrouted
end
for i = 4, #ARGV, 4 do
  local flat = subs_of[ARGV[i]]
  local tail = '],"kwargs":{},"options":' .. ARGV[i + 2] .. ',"message_id":"'
  for j = 2, #flat, 2 do
    local value = flat[j]
    local nl = string.find(value, '\\n', 1, true)
    local tag = ns .. ':{' .. string.sub(value, 1, nl - 1) .. '}'
    local eid = ARGV[i + 3] .. '.' .. (j / 2)
    local sub = flat[j - 1]
    redis.call('HSET', tag .. ':m', eid, string.sub(value, nl + 1) .. ',"args":[' ..
      ARGV[i + 1] .. tail .. eid .. '","message_timestamp":' .. ts .. '}')
    redis.call('RPUSH', tag .. ':q', eid)
    redis.call('HINCRBY', tag .. ':n', string.sub(sub, string.find(sub, '|', 1, true) + 1), 1)
  end
end
table.insert(unrouted, 1, 1)
return unrouted
"""

#: Move due delayed entries of a queue to its ready list, then take up to ARGV[1]
#: ready entries into the worker's in-flight list.
#: KEYS: ready list, delayed zset, in-flight list, bodies hash.  ARGV: count,
#: promote limit.  Returns id, body pairs (an entry whose body is gone is dropped)
#: followed by one last element: the milliseconds until the next delayed entry is
#: due ("-1": none).
FETCH = (
    _NOW
    + """
local ready, delayed, inflight, bodies = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
if #due > 0 then
  redis.call('RPUSH', ready, unpack(due))
  redis.call('ZREM', delayed, unpack(due))
end
local out = {}
local items = redis.call('LPOP', ready, tonumber(ARGV[1]))
if items then
  local ids = {}
  for i = 1, #items do
    if items[i] ~= '' then ids[#ids + 1] = items[i] end
  end
  if #ids > 0 then
    local found = redis.call('HMGET', bodies, unpack(ids))
    local taken = {}
    for i = 1, #ids do
      if found[i] then
        taken[#taken + 1] = ids[i]
        out[#out + 1] = ids[i]
        out[#out + 1] = found[i]
      end
    end
    if #taken > 0 then redis.call('RPUSH', inflight, unpack(taken)) end
  end
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

#: Store message ARGV[3] of actor ARGV[4] under entry id ARGV[2] and make it ready
#: in ARGV[1] milliseconds (0: now).  When it is now the earliest delayed entry,
#: push a wake-up token on the ready list so a blocked consumer re-reads the
#: schedule instead of sleeping past it.
#: KEYS: delayed zset, ready list, bodies hash, backlog hash.  Returns the due time (ms).
SCHEDULE = (
    _NOW
    + """
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('HINCRBY', KEYS[4], ARGV[4], 1)
local delay = tonumber(ARGV[1])
if delay <= 0 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  return now
end
local eta = now + delay
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
      local tag = ns .. ':{' .. q .. '}'
      while redis.call('LMOVE', tag .. ':a:' .. w, tag .. ':q', 'RIGHT', 'LEFT') do
        moved = moved + 1
      end
    end
  end
  redis.call('ZREM', ns .. ':heartbeats', w)
  redis.call('HDEL', ns .. ':workers', w)
  redis.call('HDEL', ns .. ':wsubs', w)
  return moved
end
"""

#: Heartbeat of worker ARGV[2]: registers the queues ARGV[3] it consumes and, when
#: ARGV[6] is not "-" (every few beats) or Redis did not know the worker, its
#: subscriptions ARGV[8] (one per line, their last-seen time updated); moves the
#: entries parked for its handlers ARGV[7] (lines "<queue>|<actor>") back to their
#: ready lists, then recovers: every worker silent for ARGV[4] ms has its
#: in-flight entries put back at the front of their queues and is forgotten.
#: ARGV: namespace, worker id, queues (comma-separated), timeout ms, max dead per
#: pass, "-" or "+", handlers, subscriptions.  Returns {entries recovered, entries unparked,
#: 1 when Redis did not know the worker (its first beat, or Redis lost its data)}.
BEAT = (
    _NOW
    + _REQUEUE_WORKER
    + """
local ns, wid = ARGV[1], ARGV[2]
redis.call('ZADD', ns .. ':heartbeats', now, wid)
local unknown = redis.call('HSET', ns .. ':workers', wid, ARGV[3])
if ARGV[6] ~= '-' or unknown == 1 then
  redis.call('HSET', ns .. ':wsubs', wid, ARGV[8])
  for field in string.gmatch(ARGV[8], '[^\\n]+') do
    redis.call('ZADD', ns .. ':seen', now, field)
  end
end
local unparked = 0
for line in string.gmatch(ARGV[7], '[^\\n]+') do
  local bar = string.find(line, '|', 1, true)
  local tag = ns .. ':{' .. string.sub(line, 1, bar - 1) .. '}'
  local parked = tag .. ':p:' .. string.sub(line, bar + 1)
  while redis.call('LMOVE', parked, tag .. ':q', 'LEFT', 'RIGHT') do
    unparked = unparked + 1
  end
end
local dead = redis.call('ZRANGEBYSCORE', ns .. ':heartbeats', '-inf', now - tonumber(ARGV[4]),
  'LIMIT', 0, tonumber(ARGV[5]))
local moved = 0
for _, w in ipairs(dead) do
  if w ~= wid then moved = moved + requeue_worker(ns, w) end
end
return {moved, unparked, unknown}
"""
)

#: A stopping worker ARGV[2] puts back whatever it still holds and unregisters.
#: ARGV: namespace, worker id.  Returns how many entries were put back.
RELEASE = _REQUEUE_WORKER + "return requeue_worker(ARGV[1], ARGV[2])\n"

#: Put back entries a consumer found in its own in-flight list without having
#: received them (the reply of a fetch lost with the connection).  Each one still
#: in the list moves to the front of the ready list, in its original order; one
#: already gone (acked meanwhile) is left alone.  Wake-up tokens are dropped.
#: KEYS: in-flight list, ready list.  ARGV: the entry ids.  Returns how many moved.
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

#: Park an entry the worker cannot run (its handler is deployed on other workers
#: of the queue): move it from the in-flight list to the handler's parked list.
#: KEYS: in-flight list, parked list.  ARGV: entry id.  Returns 1 if it moved.
PARK = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""

#: Take an entry out of a queue wherever it waits (ready, delayed or parked) and
#: return its body (false when it is in flight or gone).
#: KEYS: ready list, delayed zset, parked list, bodies hash.  ARGV: entry id.
TAKE = """
local id = ARGV[1]
if redis.call('LREM', KEYS[1], 1, id) == 1 or redis.call('ZREM', KEYS[2], id) == 1
    or redis.call('LREM', KEYS[3], 1, id) == 1 then
  local body = redis.call('HGET', KEYS[4], id)
  redis.call('HDEL', KEYS[4], id)
  return body
end
return false
"""

#: Messages not finished yet on the queues ARGV[2..] (all with a subscription when
#: none are given): ready, delayed, parked or in flight.  ARGV[1]: namespace.
PENDING = """
local ns = ARGV[1]
local queues = {}
if #ARGV > 1 then
  for i = 2, #ARGV do queues[#queues + 1] = ARGV[i] end
else
  queues = redis.call('SMEMBERS', ns .. ':queues')
end
local total = 0
for _, q in ipairs(queues) do
  total = total + redis.call('HLEN', ns .. ':{' .. q .. '}:m')
end
return total
"""

#: The queues and subscriptions of every worker whose last heartbeat is at most
#: ARGV[2] ms old: {worker id, queues, subscriptions, ...}.  ARGV[1]: namespace.
LIVE_WORKERS = (
    _NOW
    + """
local ns = ARGV[1]
local alive = redis.call('ZRANGEBYSCORE', ns .. ':heartbeats', now - tonumber(ARGV[2]), '+inf')
local out = {}
for _, w in ipairs(alive) do
  out[#out + 1] = w
  out[#out + 1] = redis.call('HGET', ns .. ':workers', w) or ''
  out[#out + 1] = redis.call('HGET', ns .. ':wsubs', w) or ''
end
return out
"""
)


def queue_tag(namespace: str, queue: str) -> str:
    """The prefix of every key of ``queue`` (its hash tag)."""
    return f"{namespace}:{{{queue}}}"


def ready_key(namespace: str, queue: str) -> str:
    """The list of ready entry ids of ``queue``."""
    return f"{namespace}:{{{queue}}}:q"


def delayed_key(namespace: str, queue: str) -> str:
    """The sorted set of delayed entry ids of ``queue``."""
    return f"{namespace}:{{{queue}}}:d"


def bodies_key(namespace: str, queue: str) -> str:
    """The hash of the messages of ``queue``, by entry id."""
    return f"{namespace}:{{{queue}}}:m"


def backlog_key(namespace: str, queue: str) -> str:
    """The hash of the unfinished events of ``queue``, by handler."""
    return f"{namespace}:{{{queue}}}:n"


def inflight_key(namespace: str, worker_id: str, queue: str) -> str:
    """The list of entry ids of ``queue`` that ``worker_id`` took and has not acked."""
    return f"{namespace}:{{{queue}}}:a:{worker_id}"


def parked_key(namespace: str, queue: str, actor: str) -> str:
    """The list of entry ids of ``queue`` parked for the handler ``actor``."""
    return f"{namespace}:{{{queue}}}:p:{actor}"


def topic_key(namespace: str, topic: str) -> str:
    """The hash of the subscriptions of ``topic``."""
    return f"{namespace}:t:{topic}"


def subscription_field(service: str, topic: str, actor: str) -> str:
    """The name of a subscription in the ``subs`` hash and the ``seen`` zset."""
    return f"{service}|{topic}|{actor}"
