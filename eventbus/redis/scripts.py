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
    {ns}:{q}:c:{actor}      ZSET  "<worker id> <message id>" -> since when (ms): the
                                  runs of a handler with a concurrency limit

    {ns}:t:{topic}          HASH  "<service>|<actor>" -> "<queue>\\n<message prefix>";
                                  "~warm" -> until when the topic warms up (ms)
    {ns}:subs               HASH  "<service>|<topic>|<actor>" -> {"queue": ...}
    {ns}:seen               ZSET  "<service>|<topic>|<actor>" -> last heartbeat (ms)
    {ns}:queues             SET   every queue with a subscription
    {ns}:heartbeats         ZSET  worker id -> last heartbeat (ms, Redis clock)
    {ns}:workers            HASH  worker id -> comma-separated queues it consumes
    {ns}:wsubs              HASH  worker id -> its subscriptions, one per line
    {ns}:winfo              HASH  worker id -> JSON: host, pid, eventbus version, the
                                  code fingerprint of each subscription it serves

    {ns}:u:{topic}          LIST  events of the topic kept for subscriptions not
                                  created yet (the unrouted window), oldest first
    {ns}:utopics            SET   topics with kept events
    {ns}:unrouted           HASH  "seq" (last kept event), "b:<topic>" (bytes kept),
                                  "c:<topic>" (seq last handed to a new subscription),
                                  "d:<topic>" / "dropped" / "dropped_at" (events that
                                  left the window without reaching a subscription),
                                  "s:<subscription>" (seq when it was removed)
    {ns}:stage:{id}         LIST  the chunks of one large publish, until its commit
    {ns}:ptopics            HASH  topic -> when a publisher process first published
                                  to it (ms): the mistyped-topic check (checks.py)

**Subscriptions live here.**  A worker writes the subscriptions of its handlers
when it boots (``eventbus subscriptions sync`` writes them without a worker), and
they outlive it.  :data:`PUBLISH` fans an event out to every subscription of its
topic, of every service, inside Redis, all or none, whatever the publishing
process imported.  Events of a topic without a subscription are kept for a
bounded window and handed to the subscription created within it
(:data:`SUBSCRIBE`): ``docs/redis.md``, "Unrouted events".

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

One concept past ~500 lines: the key layout and every Lua script that reads or
writes it (two thirds of the module), kept together so that a change to a key is
made in every script that touches it at once.
"""

from __future__ import annotations

#: First write of the scripts a worker needs to drain a full Redis: with
#: ``maxmemory`` reached and ``noeviction``, Redis refuses a script's "denyoom"
#: command (RPUSH, HINCRBY, HSET...) only while the script has written nothing;
#: a DEL of a key that never exists is a write Redis allows when full, so the
#: script's later writes run (works on Redis 6.2 and 7.x, unlike the 7.0-only
#: ``#!lua flags=allow-oom``).  The scripts that drain only shrink Redis or move
#: entries between lists.
_ALLOW_WHEN_FULL = """
redis.call('DEL', 'eventbus:oom-guard:never-set')
"""

_NOW = """
local __t = redis.call('TIME')
local now = tonumber(__t[1]) * 1000 + math.floor(tonumber(__t[2]) / 1000)
"""

#: Lua helpers of the scripts that write events: refuse, before any write, a key
#: of the wrong type or a counter that is not an integer (Redis does not roll a
#: script back: a runtime error after a write would leave the call half done).
#: :data:`PUBLISH` undoes its fan-out writes instead (no check on its hot path).
_CHECKS = """
local function refuse(what)
  error({err = 'ERR eventbus: ' .. what})
end
local function need(key, kind)
  local t = redis.call('TYPE', key)['ok']
  if t ~= kind and t ~= 'none' then
    refuse('key ' .. key .. ' holds a ' .. t .. ', not a ' .. kind ..
      ' (written by something else: delete or rename it)')
  end
end
local function need_int(key, field)
  local v = redis.call('HGET', key, field)
  if v and not (#v < 19 and string.match(v, '^%-?%d+$')) then
    refuse('field ' .. field .. ' of ' .. key .. ' is not an integer')
  end
  return tonumber(v or '0')
end
local function fmt(n) return string.format('%d', n) end
"""

#: Lua helpers of the unrouted window.  The events of a topic kept for
#: subscriptions not created yet are the list ``{ns}:u:{topic}``, oldest first;
#: each entry is ``<u|r><seq> <ms> <entry id base> <options JSON>\n<envelope>``
#: (``u``: it reached no subscription; ``r``: it was routed, and kept because the
#: topic was warming up).  ``seq`` orders every kept event of the namespace.
_RETAINED = """
local function parse(entry)
  local sp1 = string.find(entry, ' ', 2, true)
  local sp2 = sp1 and string.find(entry, ' ', sp1 + 1, true)
  local sp3 = sp2 and string.find(entry, ' ', sp2 + 1, true)
  local nl = sp3 and string.find(entry, '\\n', sp3 + 1, true)
  if not nl then return nil end
  local seq = tonumber(string.sub(entry, 2, sp1 - 1))
  local at = tonumber(string.sub(entry, sp1 + 1, sp2 - 1))
  if not seq or not at then return nil end
  return string.sub(entry, 1, 1), seq, at, string.sub(entry, sp2 + 1, sp3 - 1),
    string.sub(entry, sp3 + 1, nl - 1), string.sub(entry, nl + 1)
end
local function check_retained(ns, topic)
  need(ns .. ':u:' .. topic, 'list')
  need(ns .. ':unrouted', 'hash')
  need(ns .. ':utopics', 'set')
  need_int(ns .. ':unrouted', 'b:' .. topic)
  need_int(ns .. ':unrouted', 'd:' .. topic)
  need_int(ns .. ':unrouted', 'dropped')
  need_int(ns .. ':unrouted', 'seq')
end
local function count_dropped(ns, topic, count, now)
  local meta = ns .. ':unrouted'
  redis.call('HINCRBY', meta, 'd:' .. topic, count)
  redis.call('HINCRBY', meta, 'dropped', count)
  redis.call('HSET', meta, 'dropped_at', fmt(now))
end
-- Drop the kept events of topic that no subscription can be handed any more:
-- all of them once the topic has a subscription and its warm-up is over, else
-- the oldest beyond the bounds (age in ms, count, bytes).  Returns how many of
-- those had reached no subscription at all (dropped; also counted in Redis).
local function trim(ns, topic, now, keep, max_n, max_b)
  local list, meta, tkey = ns .. ':u:' .. topic, ns .. ':unrouted', ns .. ':t:' .. topic
  local n = redis.call('LLEN', list)
  local warm = tonumber(redis.call('HGET', tkey, '~warm') or '0') or 0
  local subscribed = redis.call('HLEN', tkey)
  if warm > 0 then subscribed = subscribed - 1 end
  local all = subscribed > 0 and warm <= now
  if warm > 0 and warm <= now then redis.call('HDEL', tkey, '~warm') end
  local bytes = tonumber(redis.call('HGET', meta, 'b:' .. topic) or '0') or 0
  local copied = tonumber(redis.call('HGET', meta, 'c:' .. topic) or '0') or 0
  local dropped = 0
  while n > 0 do
    local head = redis.call('LINDEX', list, 0)
    local flag, seq, at = parse(head)
    if flag and not all and n <= max_n and bytes <= max_b and at > now - keep then break end
    redis.call('LPOP', list)
    n = n - 1
    bytes = bytes - #head
    if flag == 'u' and seq > copied then dropped = dropped + 1 end
  end
  if n == 0 then
    redis.call('DEL', list)
    redis.call('HDEL', meta, 'b:' .. topic, 'c:' .. topic)
    redis.call('SREM', ns .. ':utopics', topic)
  else
    redis.call('HSET', meta, 'b:' .. topic, fmt(math.max(bytes, 0)))
  end
  if dropped > 0 then count_dropped(ns, topic, dropped, now) end
  return dropped
end
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

#: Lua helpers of :data:`PUBLISH` alone (the unrouted window's keys, read and
#: checked in one command, and its trim after a call's writes).
_PUBLISH_WINDOW = """
-- The fields of {ns}:unrouted a call keeping events of topics needs, in one
-- HMGET (which also refuses a key of the wrong type before any write): seq and
-- dropped, and per topic b: (bytes), d: (dropped), c: (seq last handed over).
local function read_window(ns, topics)
  local meta = ns .. ':unrouted'
  local fields = {'seq', 'dropped'}
  for _, topic in ipairs(topics) do
    fields[#fields + 1] = 'b:' .. topic
    fields[#fields + 1] = 'd:' .. topic
    fields[#fields + 1] = 'c:' .. topic
  end
  local got = {}
  for s = 1, #fields, 1000 do  -- (Lua's unpack has a bound)
    local part = redis.pcall('HMGET', meta, unpack(fields, s, math.min(s + 999, #fields)))
    if part['err'] then need(meta, 'hash') refuse(part['err']) end
    for k = 1, #part do got[s + k - 1] = part[k] end
  end
  local out = {}
  for k, field in ipairs(fields) do
    local v = got[k]
    if string.sub(field, 1, 2) == 'c:' then
      out[field] = tonumber(v or '0') or 0
    else
      if v and not (#v < 19 and string.match(v, '^%-?%d+$')) then
        refuse('field ' .. field .. ' of ' .. meta .. ' is not an integer')
      end
      out[field] = tonumber(v or '0')
    end
  end
  return out
end
-- trim() of a topic this call kept events of, warming up or unsubscribed (so
-- none of its events can go yet but those beyond the bounds), whose length and
-- bytes the call knows.  Returns the length, bytes and dropped count left.
local function trim_kept(ns, topic, n, bytes, copied, now, keep, max_n, max_b)
  local list = ns .. ':u:' .. topic
  local dropped = 0
  while n > 0 do
    local head = redis.call('LINDEX', list, 0)
    local flag, seq, at = parse(head)
    if flag and n <= max_n and bytes <= max_b and at > now - keep then break end
    redis.call('LPOP', list)
    n = n - 1
    bytes = bytes - #head
    if flag == 'u' and seq > copied then dropped = dropped + 1 end
  end
  return n, math.max(bytes, 0), dropped
end
"""

#: Fan events out to every subscription of their topics, all or none.  Redis
#: does not roll a script back, so the writes are undone when one fails (a key of
#: the wrong type, a counter that is not an integer): nothing of a failed call
#: stays, and a caller's retry cannot deliver twice.  Events of a topic without a
#: subscription, and every event of a topic warming up (its first subscription
#: was written less than the warm-up ago), are kept in ``{ns}:u:{topic}`` within
#: bounds, for the subscriptions written next (:data:`SUBSCRIBE`;
#: ``docs/redis.md``, "Unrouted events"); the window's counters are read and
#: checked before any write, in one command.
#: The writes of a call are grouped by key: one HSET of every body per queue, one
#: RPUSH of every entry id per list (each list gets the call's ids in the order
#: of the events), one HINCRBY per backlog counter, or one HMGET and one HSET for
#: the counters of several handlers of one queue.
#: ARGV: namespace, strict ("1": write nothing if any topic has no subscription),
#: message timestamp (ms), staged list key ("": none), "<retention ms (0: keep
#: nothing)> <most events kept per topic> <most bytes kept per topic>" (read only
#: when an event is kept), then 4 per event: topic, envelope JSON, options JSON,
#: entry id base (the n-th subscription's entry is "<base>.<n>"; "<base>@<ms>":
#: delayed, its entries go to each queue's delayed set due in <ms> by the Redis
#: clock, with a wake-up token when one becomes the earliest).  With a staged
#: list key, the events are that list's items instead (a large call arrives in
#: bounded chunks) and it is deleted.  Returns {1 (0 when strict refused: nothing
#: written), number of unrouted topics, those topics..., then topic, events
#: dropped, ... for the events that left the window unrouted}.
#: A call of one event due now, to a topic with subscriptions and past its warm-up
#: (a service publishing one by one, all day) takes a short path once the
#: subscriptions are read: the same writes, bodies and undo without the grouping
#: (~20 % less script time per call).
PUBLISH = (
    _CHECKS
    + _RETAINED
    + _PUBLISH_WINDOW
    + """
local ns, strict, ts = ARGV[1], ARGV[2] == '1', ARGV[3]
local A, first, stage = ARGV, 6, ARGV[4]
if stage ~= '' then
  need(stage, 'list')
  A, first = redis.call('LRANGE', stage, 0, -1), 1
  if #A == 0 then refuse('the staged events ' .. stage .. ' expired before their commit') end
end
-- Per topic, its subscriptions: {messages key, ready key, backlog key, message
-- prefix, actor, events written, delayed key}.
local subs_of, unrouted, warming = {}, {}, nil
for i = first, #A, 4 do
  local topic = A[i]
  if subs_of[topic] == nil then
    local flat = redis.call('HGETALL', ns .. ':t:' .. topic)
    local subs = {}
    for j = 2, #flat, 2 do
      local field, value = flat[j - 1], flat[j]
      if field == '~warm' then  -- the topic warms up until then (ms)
        warming = warming or {}
        warming[topic] = tonumber(value) or 0
      else
        local nl = string.find(value, '\\n', 1, true)
        local bar = string.find(field, '|', 1, true)
        if not nl or nl == 1 or not bar then
          refuse('subscription ' .. field .. ' of topic ' .. topic .. ' is malformed ' ..
            '(remove it: `eventbus subscriptions remove`, then write it again)')
        end
        local tag = ns .. ':{' .. string.sub(value, 1, nl - 1) .. '}'
        subs[#subs + 1] = {tag .. ':m', tag .. ':q', tag .. ':n', string.sub(value, nl + 1),
          string.sub(field, bar + 1), 0, tag .. ':d'}
      end
    end
    subs_of[topic] = subs
    if #subs == 0 then unrouted[#unrouted + 1] = topic end
  end
end
if strict and #unrouted > 0 then
  if stage ~= '' then redis.call('DEL', stage) end
  table.insert(unrouted, 1, #unrouted)
  table.insert(unrouted, 1, 0)
  return unrouted
end
-- Short path: one event due now, not staged, its topic routed and past its
-- warm-up (the steady state of a service publishing one by one).  The same
-- writes, message bodies and undo as below, without the grouping by key.
if stage == '' and #A == 9 and not warming and #unrouted == 0
    and not string.find(A[9], '@', 1, true) then
  local subs = subs_of[A[6]]
  local tail = ',"args":[' .. A[7] .. '],"kwargs":{},"options":' .. A[8] .. ',"message_id":"'
  local done, at = {}, ''
  local ok, failure = pcall(function()
    for j = 1, #subs do
      local sub = subs[j]
      local eid = A[9] .. '.' .. j
      at = sub[1]
      redis.call('HSET', at, eid, sub[4] .. tail .. eid .. '","message_timestamp":' .. ts .. '}')
      done[#done + 1] = {'HDEL', at, eid}
      at = sub[2]
      redis.call('RPUSH', at, eid)
      done[#done + 1] = {'LREM', at, eid}
      at = sub[3]
      local v = redis.call('HINCRBY', at, sub[5], 1)
      done[#done + 1] = {'HINCRBY', at, sub[5]}
      if v < 1 then  -- it was negative (a counter gone wrong): count from zero
        redis.call('HSET', at, sub[5], 1)
        done[#done] = {'HSET', at, sub[5], fmt(v - 1)}
      end
    end
  end)
  if ok then return {1, 0} end
  for k = #done, 1, -1 do
    local op = done[k]
    if op[1] == 'HDEL' then redis.call('HDEL', op[2], op[3])
    elseif op[1] == 'LREM' then redis.call('LREM', op[2], -1, op[3])
    elseif op[1] == 'HINCRBY' then redis.call('HINCRBY', op[2], op[3], -1)
    else redis.call('HSET', op[2], op[3], op[4]) end
  end
  local why = tostring(failure)
  if type(failure) == 'table' and failure.err then why = failure.err end
  return redis.error_reply('ERR eventbus: writing ' .. at .. ' failed: ' .. why ..
    ' (the writes of this call were undone)')
end
-- Which topics' events are kept: those nobody subscribes, and all of those of a
-- topic warming up.  The window's counters are read and checked before any
-- write; its keys' types are checked by writes the undo covers.  (All of this
-- is skipped in the steady state: every topic routed, none warming up.)
local kept, now, keep, max_n, max_b, window = nil, 0, 0, 0, 0, nil
if #unrouted > 0 or warming then
  now = clock()
  keep, max_n, max_b = string.match(ARGV[5], '^(%d+) (%d+) (%d+)$')
  keep, max_n, max_b = tonumber(keep), tonumber(max_n), tonumber(max_b)
  if warming then
    for topic, deadline in pairs(warming) do
      if deadline <= now then  -- its warm-up is over
        warming[topic] = nil
        redis.call('HDEL', ns .. ':t:' .. topic, '~warm')
      end
    end
  end
  if keep > 0 and max_n > 0 then
    local topics = {}
    for topic, subs in pairs(subs_of) do
      if #subs == 0 or (warming and warming[topic]) then
        kept = kept or {}
        kept[topic] = {}  -- its entries, in event order
        topics[#topics + 1] = topic
      end
    end
    if kept then window = read_window(ns, topics) end
  elseif #unrouted > 0 then
    need(ns .. ':unrouted', 'hash')
    for _, topic in ipairs(unrouted) do need_int(ns .. ':unrouted', 'd:' .. topic) end
    need_int(ns .. ':unrouted', 'dropped')
  end
end
local seq = 0
if kept then seq = window['seq'] end
-- Write, keeping in u what undoes each write, 4 slots each: HDEL key {fields and
-- values} from (every other one from there, CHUNK of them), ZREM key member,
-- LTRIM key 0 -(n + 1) (drops the n pushed), SREM key member, HINCRBY key field
-- by, HSET key field value, HSETS key {fields and values} (op, key, arg, value).
local CHUNK = 1000  -- values per command (Lua's unpack has a bound)
local u, nu, at = {}, 0, ''
local bodies, mkeys, ready, qkeys = {}, {}, {}, {}
local function push(key, ids)  -- RPUSH of ids in chunks; returns the list's length
  local len = 0
  for s = 1, #ids, CHUNK do
    local e = math.min(s + CHUNK - 1, #ids)
    at = key
    len = redis.call('RPUSH', key, unpack(ids, s, e))
    u[nu + 1], u[nu + 2], u[nu + 3], u[nu + 4] = 'LTRIM', key, 0, s - e - 2
    nu = nu + 4
  end
  return len
end
local ok, failure = pcall(function()
  for i = first, #A, 4 do
    local topic = A[i]
    local subs = subs_of[topic]
    local tail = '],"kwargs":{},"options":' .. A[i + 2] .. ',"message_id":"'
    local base, due = A[i + 3], nil
    local mark = string.find(base, '@', 1, true)
    if mark then  -- delayed: due in <ms> from now
      if now == 0 then now = clock() end
      due = now + tonumber(string.sub(base, mark + 1))
      base = string.sub(base, 1, mark - 1)
    end
    for j = 1, #subs do
      local sub = subs[j]
      local eid = base .. '.' .. j
      local b = bodies[sub[1]]
      if not b then
        b = {}
        bodies[sub[1]] = b
        mkeys[#mkeys + 1] = sub[1]
      end
      b[#b + 1] = eid
      b[#b + 1] = sub[4] .. ',"args":[' .. A[i + 1] .. tail .. eid ..
        '","message_timestamp":' .. ts .. '}'
      local id = eid
      if due then
        at = sub[7]
        redis.call('ZADD', at, due, eid)
        u[nu + 1], u[nu + 2], u[nu + 3] = 'ZREM', at, eid
        nu = nu + 4
        id = nil
        if redis.call('ZRANGE', at, 0, 0)[1] == eid then id = '' end  -- wake a consumer
      end
      if id then
        local q = ready[sub[2]]
        if not q then
          q = {}
          ready[sub[2]] = q
          qkeys[#qkeys + 1] = sub[2]
        end
        q[#q + 1] = id
      end
      sub[6] = sub[6] + 1
    end
    if kept and kept[topic] then
      seq = seq + 1
      local flag = 'r'
      if #subs == 0 then flag = 'u' end
      local entries = kept[topic]
      entries[#entries + 1] = flag .. fmt(seq) .. ' ' .. fmt(now) .. ' ' .. A[i + 3] .. ' ' ..
        A[i + 2] .. '\\n' .. A[i + 1]
    end
  end
  for _, key in ipairs(mkeys) do
    local b = bodies[key]
    for s = 1, #b, CHUNK do
      at = key
      redis.call('HSET', key, unpack(b, s, math.min(s + CHUNK - 1, #b)))
      -- (an entry id is 64 random bits: a field that existed is not told apart)
      u[nu + 1], u[nu + 2], u[nu + 3], u[nu + 4] = 'HDELS', key, b, s
      nu = nu + 4
    end
  end
  for _, key in ipairs(qkeys) do push(key, ready[key]) end
  if kept then
    for topic, entries in pairs(kept) do
      local bytes = 0
      for _, entry in ipairs(entries) do bytes = bytes + #entry end
      kept[topic] = {push(ns .. ':u:' .. topic, entries), bytes}
      at = ns .. ':utopics'
      if redis.call('SADD', at, topic) == 1 then
        u[nu + 1], u[nu + 2], u[nu + 3] = 'SREM', at, topic
        nu = nu + 4
      end
    end
  end
  -- The backlog counters, per key: HINCRBY for one handler; HMGET then one HSET
  -- for several (a topic with several handlers in one queue).
  local counts, nkeys = {}, {}
  for _, subs in pairs(subs_of) do
    for j = 1, #subs do
      local sub = subs[j]
      if sub[6] > 0 then
        local c = counts[sub[3]]
        if not c then
          c = {}
          counts[sub[3]] = c
          nkeys[#nkeys + 1] = sub[3]
        end
        c[#c + 1] = sub
      end
    end
  end
  for _, key in ipairs(nkeys) do
    local c = counts[key]
    at = key
    if #c == 1 or #c > 400 then  -- (Lua's unpack has a bound)
      for _, sub in ipairs(c) do
        local n = sub[6]
        local v = redis.call('HINCRBY', at, sub[5], n)
        u[nu + 1], u[nu + 2], u[nu + 3], u[nu + 4] = 'HINCRBY', at, sub[5], -n
        if v < n then  -- it was negative (a counter gone wrong): count from zero
          redis.call('HSET', at, sub[5], n)
          u[nu + 1], u[nu + 4] = 'HSET', fmt(v - n)
        end
        nu = nu + 4
      end
    else
      local fields = {}
      for k = 1, #c do fields[k] = c[k][5] end
      local got = redis.call('HMGET', at, unpack(fields))
      local new, old = {}, {}
      for k = 1, #c do
        local v = got[k] or '0'
        if not (#v < 19 and string.match(v, '^%-?%d+$')) then
          error({err = 'ERR hash value is not an integer'})
        end
        v = tonumber(v)
        local n = c[k][6]
        if v < 0 then v = 0 end  -- a counter gone wrong: count from zero
        new[#new + 1], new[#new + 2] = fields[k], fmt(v + n)
        old[#old + 1], old[#old + 2] = fields[k], got[k] or '0'
      end
      redis.call('HSET', at, unpack(new))
      u[nu + 1], u[nu + 2], u[nu + 3] = 'HSETS', at, old
      nu = nu + 4
    end
  end
end)
if not ok then
  for k = nu - 3, 1, -4 do
    local op = u[k]
    if op == 'HDELS' then
      local b, s, fields = u[k + 2], u[k + 3], {}
      for x = s, math.min(s + CHUNK - 1, #b), 2 do fields[#fields + 1] = b[x] end
      redis.call('HDEL', u[k + 1], unpack(fields))
    elseif op == 'HSETS' then redis.call('HSET', u[k + 1], unpack(u[k + 2]))
    elseif op == 'HDEL' or op == 'ZREM' or op == 'SREM' then
      redis.call(op, u[k + 1], u[k + 2])
    else redis.call(op, u[k + 1], u[k + 2], u[k + 3]) end
  end
  local why = tostring(failure)
  if type(failure) == 'table' and failure.err then why = failure.err end
  return redis.error_reply('ERR eventbus: writing ' .. at .. ' failed: ' .. why ..
    ' (the writes of this call were undone)')
end
local dropped = {}
if kept then
  local meta = ns .. ':unrouted'
  local fields = {'seq', fmt(seq)}
  for topic, got in pairs(kept) do
    local n, bytes, lost = trim_kept(ns, topic, got[1], window['b:' .. topic] + got[2],
      window['c:' .. topic], now, keep, max_n, max_b)
    if n == 0 then
      redis.call('DEL', ns .. ':u:' .. topic)
      redis.call('HDEL', meta, 'b:' .. topic, 'c:' .. topic)
      redis.call('SREM', ns .. ':utopics', topic)
    else
      fields[#fields + 1] = 'b:' .. topic
      fields[#fields + 1] = fmt(bytes)
    end
    if lost > 0 then
      count_dropped(ns, topic, lost, now)
      dropped[#dropped + 1] = topic
      dropped[#dropped + 1] = lost
    end
  end
  for s = 1, #fields, 1000 do
    redis.call('HSET', meta, unpack(fields, s, math.min(s + 999, #fields)))
  end
elseif #unrouted > 0 then
  local counts = {}
  for i = first, #A, 4 do counts[A[i]] = (counts[A[i]] or 0) + 1 end
  for _, topic in ipairs(unrouted) do
    count_dropped(ns, topic, counts[topic], now)
    dropped[#dropped + 1] = topic
    dropped[#dropped + 1] = counts[topic]
  end
end
if stage ~= '' then redis.call('DEL', stage) end
local out = {1, #unrouted}
for _, topic in ipairs(unrouted) do out[#out + 1] = topic end
for _, item in ipairs(dropped) do out[#out + 1] = item end
return out
"""
)

#: Write subscriptions of one service.  A subscription that did not exist gets
#: the kept events of its topic that it can take without a gap:
#:
#: * a topic's first subscription gets those that reached no subscription;
#: * a subscription *written again* because Redis forgot it (ARGV[7] "1": a
#:   restart without persistence; the worker knows, Redis does not) gets every
#:   kept event, those that reached no one and those routed to the subscriptions
#:   written again before it while the topic warmed up;
#: * any other new subscription (a handler deployed) starts from now, as a
#:   handler gets events from the moment its worker first registered it.
#:
#: Only events kept after the subscription's own last removal count.  The first
#: subscription of a topic starts the topic's warm-up.  Rewriting a subscription
#: that exists (every worker boot) hands it nothing.
#: ARGV: namespace, service, retention (ms), most events kept per topic, most
#: bytes kept per topic, warm-up (ms), "1" when Redis forgot these subscriptions
#: (else "0"), then 5 per handler: topic, actor, queue, message prefix,
#: subscription record (JSON).  Returns {events handed to new subscriptions,
#: {topic, events dropped, ...}}.
SUBSCRIBE = (
    _ALLOW_WHEN_FULL
    + _CHECKS
    + _RETAINED
    + """
local ns, service = ARGV[1], ARGV[2]
local keep, max_n, max_b = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local warm_ms, again = tonumber(ARGV[6]), ARGV[7] == '1'
need(ns .. ':subs', 'hash')
need(ns .. ':queues', 'set')
need(ns .. ':seen', 'zset')
for i = 8, #ARGV, 5 do
  local topic, actor, queue = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local tag = ns .. ':{' .. queue .. '}'
  need(ns .. ':t:' .. topic, 'hash')
  need(tag .. ':m', 'hash')
  need(tag .. ':q', 'list')
  need(tag .. ':d', 'zset')
  need(tag .. ':n', 'hash')
  need_int(tag .. ':n', actor)
  check_retained(ns, topic)
end
local now = clock()
local meta = ns .. ':unrouted'
local handed, dropped, before = 0, {}, {}
for i = 8, #ARGV, 5 do
  local topic, actor, queue, prefix = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local field = service .. '|' .. topic .. '|' .. actor
  local tkey = ns .. ':t:' .. topic
  -- The topic's subscriptions before this call (a service's handlers of one topic,
  -- written together, are all its first subscriptions).
  if before[topic] == nil then
    before[topic] = redis.call('HLEN', tkey) - redis.call('HEXISTS', tkey, '~warm')
  end
  if redis.call('HEXISTS', tkey, service .. '|' .. actor) == 0 then
    local others = before[topic]
    local lost = trim(ns, topic, now, keep, max_n, max_b)
    if lost > 0 then
      dropped[#dropped + 1] = topic
      dropped[#dropped + 1] = lost
    end
    local after = tonumber(redis.call('HGET', meta, 's:' .. field) or '0') or 0
    local tag = ns .. ':{' .. queue .. '}'
    local suffix = '.r' .. string.sub(redis.sha1hex(field), 1, 8)
    local count, last = 0, 0
    local entries = {}
    if others == 0 or again then entries = redis.call('LRANGE', ns .. ':u:' .. topic, 0, -1) end
    for _, entry in ipairs(entries) do
      local flag, seq, at, base, options, envelope = parse(entry)
      if flag and seq > after and (flag == 'u' or (again and others > 0)) then
        local due = 0
        local mark = string.find(base, '@', 1, true)
        if mark then  -- published with a delay: due <ms> after it was kept
          due = at + (tonumber(string.sub(base, mark + 1)) or 0)
          base = string.sub(base, 1, mark - 1)
        end
        local eid = base .. suffix
        redis.call('HSET', tag .. ':m', eid, prefix .. ',"args":[' .. envelope ..
          '],"kwargs":{},"options":' .. options .. ',"message_id":"' .. eid ..
          '","message_timestamp":' .. fmt(at) .. '}')
        if due > now then
          redis.call('ZADD', tag .. ':d', due, eid)
          redis.call('RPUSH', tag .. ':q', '')  -- wake a consumer to read the schedule
        else
          redis.call('RPUSH', tag .. ':q', eid)
        end
        count = count + 1
        last = seq
      end
    end
    if count > 0 then
      redis.call('HINCRBY', tag .. ':n', actor, count)
      local copied = tonumber(redis.call('HGET', meta, 'c:' .. topic) or '0') or 0
      redis.call('HSET', meta, 'c:' .. topic, fmt(math.max(copied, last)))
      handed = handed + count
    end
    redis.call('HDEL', meta, 's:' .. field)
    if others == 0 and warm_ms > 0 then
      redis.call('HSET', tkey, '~warm', fmt(now + warm_ms))
    end
  end
  redis.call('HSET', tkey, service .. '|' .. actor, queue .. '\\n' .. prefix)
  redis.call('HSET', ns .. ':subs', field, ARGV[i + 4])
  redis.call('SADD', ns .. ':queues', queue)
  redis.call('ZADD', ns .. ':seen', now, field)
end
return {handed, dropped}
"""
)

#: Remove a subscription: it stops receiving events, and if it is written again
#: later it gets only kept events that came after this removal.
#: ARGV: namespace, service, topic, actor.  Returns 1 if it existed.
UNSUBSCRIBE = (
    _CHECKS
    + """
local ns, service, topic, actor = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local field = service .. '|' .. topic .. '|' .. actor
need(ns .. ':t:' .. topic, 'hash')
need(ns .. ':subs', 'hash')
need(ns .. ':seen', 'zset')
need(ns .. ':unrouted', 'hash')
local existed = redis.call('HDEL', ns .. ':t:' .. topic, service .. '|' .. actor)
if redis.call('HLEN', ns .. ':t:' .. topic) == redis.call('HEXISTS', ns .. ':t:' .. topic, '~warm')
then
  redis.call('DEL', ns .. ':t:' .. topic)
end
redis.call('HDEL', ns .. ':subs', field)
redis.call('ZREM', ns .. ':seen', field)
redis.call('HSET', ns .. ':unrouted', 's:' .. field,
  redis.call('HGET', ns .. ':unrouted', 'seq') or '0')
return existed
"""
)

#: Take ARGV[2] events off handler ARGV[1]'s backlog counter (KEYS[1]), never
#: below zero.  Returns the new value.
UNCOUNT = """
local v = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') or 0
v = math.max(0, v - tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d', v))
return v
"""

#: Drop the kept events that no subscription can be handed any more (see
#: ``trim``), in every topic, so that a topic nobody publishes to any more still
#: frees its memory and its expired events are counted.
#: ARGV: namespace, retention (ms), most events, most bytes per topic.
#: Returns {topic, events dropped, ...}.
SWEEP = (
    _CHECKS
    + _RETAINED
    + """
local ns = ARGV[1]
local keep, max_n, max_b = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
need(ns .. ':utopics', 'set')
local topics = redis.call('SMEMBERS', ns .. ':utopics')
for _, topic in ipairs(topics) do check_retained(ns, topic) end
local now = clock()
local out = {}
for _, topic in ipairs(topics) do
  local lost = trim(ns, topic, now, keep, max_n, max_b)
  if lost > 0 then
    out[#out + 1] = topic
    out[#out + 1] = lost
  end
end
return out
"""
)

#: Move due delayed entries of a queue to its ready list, then take up to ARGV[1]
#: ready entries into the worker's in-flight list.
#: KEYS: ready list, delayed zset, in-flight list, bodies hash.  ARGV: count,
#: promote limit.  Returns id, body pairs (an entry whose body is gone is dropped)
#: followed by one last element: the milliseconds until the next delayed entry is
#: due ("-1": none).
FETCH = (
    _ALLOW_WHEN_FULL
    + _NOW
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

#: Hand an entry over again later: move it from the in-flight list to the delayed
#: set, due in ARGV[2] ms (Redis clock), with a wake-up token on the ready list when
#: it is now the earliest delayed entry (as :data:`SCHEDULE` does).  An entry no
#: longer in the list (recovered by another worker) is left alone.
#: KEYS: in-flight list, delayed zset, ready list.  ARGV: entry id, delay ms.
#: Returns 1 if it moved.
DEFER = (
    _ALLOW_WHEN_FULL
    + _NOW
    + """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
local first = redis.call('ZRANGE', KEYS[2], 0, 0)
if first[1] == ARGV[1] then redis.call('RPUSH', KEYS[3], '') end
return 1
"""
)

#: Take a slot of a handler's concurrency limit for one run, if one is free.  A
#: full set is first rid of the holders whose worker is dead (no heartbeat within
#: ARGV[3] ms: it was SIGKILLed while running them; only holders older than that
#: are looked at), so a crash frees its slots when its in-flight events are
#: recovered.
#: KEYS: the handler's slots zset, the heartbeats zset.  ARGV: holder ("<worker
#: id> <message id>"), limit, heartbeat timeout (ms).  Returns 1 if taken; when
#: not, -1 if every slot is held by the caller's worker, else 0.
ACQUIRE = (
    _NOW
    + """
local slots, holder, limit = KEYS[1], ARGV[1], tonumber(ARGV[2])
-- Refused: -1 when every slot is held by the caller's own worker (it hears of the
-- next one given back), else 0.
local function refused()
  local mine = string.match(holder, '^%S+ ') or holder
  for _, h in ipairs(redis.call('ZRANGE', slots, 0, -1)) do
    if string.sub(h, 1, #mine) ~= mine then return 0 end
  end
  return -1
end
if redis.call('ZSCORE', slots, holder) then return 1 end
if redis.call('ZCARD', slots) >= limit then
  -- Only a holder older than the timeout can belong to a worker declared dead.
  local stale = now - tonumber(ARGV[3])
  local old = redis.call('ZRANGEBYSCORE', slots, '-inf', stale)
  if #old == 0 then return refused() end
  for _, h in ipairs(old) do
    local w = string.match(h, '^(%S+) ')
    local beat = w and redis.call('ZSCORE', KEYS[2], w)
    if not beat or tonumber(beat) < stale then redis.call('ZREM', slots, h) end
  end
  if redis.call('ZCARD', slots) >= limit then return refused() end
end
redis.call('ZADD', slots, now, holder)
return 1
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
  redis.call('HDEL', ns .. ':winfo', w)
  return moved
end
"""

#: Heartbeat of worker ARGV[2]: registers the queues ARGV[3] it consumes and, when
#: ARGV[6] is not "-" (every few beats) or Redis did not know the worker, its
#: subscriptions ARGV[8] (one per line, their last-seen time updated) and its
#: description ARGV[9] (JSON: host, pid, code fingerprints); moves the
#: entries parked for its handlers ARGV[7] (lines "<queue>|<actor>") back to their
#: ready lists, then recovers: every worker silent for ARGV[4] ms has its
#: in-flight entries put back at the front of their queues and is forgotten.
#: ARGV: namespace, worker id, queues (comma-separated), timeout ms, max dead per
#: pass, "-" or "+", handlers, subscriptions, description.  Returns {entries
#: recovered, entries unparked, 1 when Redis did not know the worker (its first
#: beat, or Redis lost its data)}.
BEAT = (
    _ALLOW_WHEN_FULL
    + _NOW
    + _REQUEUE_WORKER
    + """
local ns, wid = ARGV[1], ARGV[2]
redis.call('ZADD', ns .. ':heartbeats', now, wid)
local unknown = redis.call('HSET', ns .. ':workers', wid, ARGV[3])
if ARGV[6] ~= '-' or unknown == 1 then
  redis.call('HSET', ns .. ':wsubs', wid, ARGV[8])
  if ARGV[9] then redis.call('HSET', ns .. ':winfo', wid, ARGV[9]) end
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
RECLAIM = (
    _ALLOW_WHEN_FULL
    + """
local moved = 0
for i = #ARGV, 1, -1 do
  if redis.call('LREM', KEYS[1], 1, ARGV[i]) == 1 and ARGV[i] ~= '' then
    redis.call('LPUSH', KEYS[2], ARGV[i])
    moved = moved + 1
  end
end
return moved
"""
)

#: Delete finished entries: ARGV is pairs (entry, handler or '') — LREM from the
#: in-flight list KEYS[1], HDEL from the bodies KEYS[2], and one off the handler's
#: backlog counter in KEYS[3].  One HDEL for all the bodies and one HINCRBY per
#: handler, not one of each per entry (a grouped ack of a steady flow deletes a
#: few entries per call).  Runs on a full Redis (it is how a worker drains it).
ACK = (
    _ALLOW_WHEN_FULL
    + """
local fields, counts = {}, {}
for i = 1, #ARGV, 2 do
  redis.call('LREM', KEYS[1], 1, ARGV[i])
  fields[#fields + 1] = ARGV[i]
  local handler = ARGV[i + 1]
  if handler ~= '' then counts[handler] = (counts[handler] or 0) + 1 end
end
for s = 1, #fields, 1000 do  -- unpack() has a bound
  redis.call('HDEL', KEYS[2], unpack(fields, s, math.min(s + 999, #fields)))
end
for handler, n in pairs(counts) do redis.call('HINCRBY', KEYS[3], handler, -n) end
return 1
"""
)

#: The entry at the tail of the in-flight list KEYS[1], its body in the bodies
#: hash KEYS[2] and the length of the ready list KEYS[3]: {entry, body or false,
#: entries still waiting}, or false when the in-flight list is empty.  Sent in one
#: pipeline after the idle consumer's ``BLMOVE``, which pushes the entry it takes
#: at that tail: Redis runs a blocked client's next command as it wakes it, so the
#: body comes back with the wake-up (no second round trip), and the consumer knows
#: whether a batch waits (fetch it next) or not (block again: no empty fetch while
#: consumers keep pace with a steady flow).  Read-only.
TAIL_BODY = """
local entry = redis.call('LINDEX', KEYS[1], -1)
if not entry then return false end
return {entry, redis.call('HGET', KEYS[2], entry), redis.call('LLEN', KEYS[3])}
"""

#: HSET of ARGV's (field, value) pairs into KEYS[1] that runs on a full Redis
#: (a worker registering its handlers' schemas must boot to drain it).
HSET_WHEN_FULL = (
    _ALLOW_WHEN_FULL
    + """
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""
)

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

#: The queues, subscriptions, description and last heartbeat of every worker whose
#: last heartbeat is at most ARGV[2] ms old: {worker id, queues, subscriptions,
#: description JSON, ms since its last heartbeat, ...}.  ARGV[1]: namespace.
LIVE_WORKERS = (
    _NOW
    + """
local ns = ARGV[1]
local alive = redis.call('ZRANGEBYSCORE', ns .. ':heartbeats', now - tonumber(ARGV[2]), '+inf',
  'WITHSCORES')
local out = {}
for i = 1, #alive, 2 do
  local w = alive[i]
  out[#out + 1] = w
  out[#out + 1] = redis.call('HGET', ns .. ':workers', w) or ''
  out[#out + 1] = redis.call('HGET', ns .. ':wsubs', w) or ''
  out[#out + 1] = redis.call('HGET', ns .. ':winfo', w) or ''
  out[#out + 1] = string.format('%d', math.max(0, now - tonumber(alive[i + 1])))
end
return out
"""
)


def service_of(queue: str) -> str:
    """The service of a ``<service>.<queue>`` queue name."""
    return queue.split(".", 1)[0]


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


def slots_key(namespace: str, queue: str, actor: str) -> str:
    """The sorted set of the runs in progress of ``actor``, a handler with a
    concurrency limit (see :data:`ACQUIRE`)."""
    return f"{namespace}:{{{queue}}}:c:{actor}"


def heartbeats_key(namespace: str) -> str:
    """The sorted set of live workers' last heartbeats."""
    return f"{namespace}:heartbeats"


def parked_key(namespace: str, queue: str, actor: str) -> str:
    """The list of entry ids of ``queue`` parked for the handler ``actor``."""
    return f"{namespace}:{{{queue}}}:p:{actor}"


#: The field of a topic's subscriptions hash that says until when (ms, Redis clock)
#: the topic warms up: every event of it is kept meanwhile (see :data:`SUBSCRIBE`).
WARM_FIELD = "~warm"


def topic_key(namespace: str, topic: str) -> str:
    """The hash of the subscriptions of ``topic``."""
    return f"{namespace}:t:{topic}"


def subscription_field(service: str, topic: str, actor: str) -> str:
    """The name of a subscription in the ``subs`` hash and the ``seen`` zset."""
    return f"{service}|{topic}|{actor}"
