"""Every Lua script the consumer runs in Redis, with its calling convention.

Two rules hold for all of them, because whatever a client writes ends up in their keys:

* **Bounded reads.** Entries are read inside a script (``_BOUND``), and any field value
  larger than its limit (``input``: ``MAX_INPUT_BYTES``; every other field:
  ``protocol.MAX_FIELD_BYTES``), any field name longer than ``protocol.MAX_FIELD_NAME_BYTES``
  and any field beyond the first ``protocol.MAX_FIELDS`` is withheld: the consumer gets its
  name and size, never its bytes. So one read costs the consumer at most
  ``count x (MAX_INPUT_BYTES + a constant)``, whatever the entries hold. Each entry comes
  back as ``{id, kept field/value pairs (nil: deleted entry), withheld name/size pairs}``.
  A field given twice counts by its last copy, whether that one is kept or withheld.
* **Completion cannot half-fail.** A reply key or ``reply_to`` inbox that a client made
  into another type is skipped and counted (``TYPE`` first; never ``EXPIRE`` on a key we
  did not write), so the reply, the other inbox pushes and every ack of the batch still
  happen; nothing a client wrote can make the script stop half-way and be retried.
"""

from __future__ import annotations

import hashlib

# Shared by the read scripts: ARGV[1..4] are the limits (input, other field, fields, name).
_BOUND = """
local limit_input, limit_field = tonumber(ARGV[1]), tonumber(ARGV[2])
local limit_fields, limit_name = tonumber(ARGV[3]), tonumber(ARGV[4])
-- A field given twice: only its last copy counts, kept (last < 0) or withheld (last = its
-- position, recorded for each withheld copy in `at`).
local function last_copies(kept, withheld, at, last)
  local k, w = {}, {}
  for i = 1, #kept, 2 do
    if last[kept[i]] < 0 then k[#k + 1] = kept[i]; k[#k + 1] = kept[i + 1] end
  end
  for j = 1, #at do
    if last[at[j][1]] == at[j][2] then
      w[#w + 1] = withheld[2 * j - 1]; w[#w + 1] = withheld[2 * j]
    end
  end
  return k, w
end
local function bound(entry)
  local fields = entry[2]
  if not fields then return {entry[1], false, {}} end
  local kept, withheld, at, last, twice = {}, {}, {}, {}, false
  for i = 1, #fields, 2 do
    local name, value = fields[i], fields[i + 1]
    local limit = limit_field
    if name == 'input' then limit = limit_input end
    twice = twice or last[name] ~= nil
    if #name > limit_name or #value > limit or #kept >= 2 * limit_fields then
      withheld[#withheld + 1] = string.sub(name, 1, limit_name)
      withheld[#withheld + 1] = #value
      at[#at + 1] = {name, i}
      last[name] = i
    else
      kept[#kept + 1] = name
      kept[#kept + 1] = value
      last[name] = -i
    end
  end
  if twice then kept, withheld = last_copies(kept, withheld, at, last) end
  return {entry[1], kept, withheld}
end
local function bound_all(entries)
  local out = {}
  for i = 1, #entries do out[i] = bound(entries[i]) end
  return out
end
"""

READ_LUA = (
    _BOUND
    + """
-- Prioritised read. KEYS: the request streams, highest priority first. ARGV: limits, group,
-- consumer, count, share. Every lower level first gets up to `share` entries (so a flood of
-- p0 cannot starve it), then the rest of `count` is filled strictly by priority.
-- Returns {{level, entries}, ...}.
local group, consumer = ARGV[5], ARGV[6]
local count, share = tonumber(ARGV[7]), tonumber(ARGV[8])
local out, got = {}, 0
local function take(level, n)
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n,
                       'STREAMS', KEYS[level], '>')
  if r then
    out[#out + 1] = {level - 1, bound_all(r[1][2])}
    got = got + #r[1][2]
  end
end
for level = 2, #KEYS do take(level, share) end
for level = 1, #KEYS do
  if got >= count then break end
  take(level, count - got)
end
return out
"""
)

READ_OWN_PENDING_LUA = (
    _BOUND
    + """
-- Our own pending entries after given IDs. KEYS: request streams; ARGV: limits, group,
-- consumer, count, then one "after" ID per stream. Returns {{level, entries}, ...}.
local group, consumer, count = ARGV[5], ARGV[6], ARGV[7]
local out = {}
for level = 1, #KEYS do
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count,
                       'STREAMS', KEYS[level], ARGV[7 + level])
  if r and #r[1][2] > 0 then out[#out + 1] = {level - 1, bound_all(r[1][2])} end
end
return out
"""
)

RECLAIM_LUA = (
    _BOUND
    + """
-- XAUTOCLAIM, bounded, with each claimed entry's delivery count. KEYS[1]: a request stream;
-- ARGV: limits, group, consumer, min idle ms, cursor, count.
-- Returns {next cursor, entries, {id, deliveries, ...}}.
local stream, group, consumer = KEYS[1], ARGV[5], ARGV[6]
local r = redis.call('XAUTOCLAIM', stream, group, consumer, ARGV[7], ARGV[8], 'COUNT', ARGV[9])
local deliveries = {}
for _, entry in ipairs(r[2]) do
  local p = redis.call('XPENDING', stream, group, entry[1], entry[1], 1)
  if #p == 1 then
    deliveries[#deliveries + 1] = entry[1]
    deliveries[#deliveries + 1] = p[1][4]
  end
end
return {r[1], bound_all(r[2]), deliveries}
"""
)

# A reply or inbox push that checks the key's type first. Returns true if pushed.
_PUSH = """
local function push(key, doc, ttl)
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'none' and kind ~= 'list' then return false end
  redis.call('RPUSH', key, doc)
  redis.call('EXPIRE', key, ttl)
  return true
end
"""

COMPLETE_LUA = (
    _PUSH
    + """
-- Fenced completion of a batch on one node. KEYS, per entry i: stream, reply key, inbox key
-- (the reply key again if none). ARGV: group, consumer, ttl_s, then per entry: entry id,
-- document, "1" if the inbox is used. An entry still pending for this consumer gets its
-- reply (only if its reply key is empty) and inbox push, and is acked; one that is not
-- (another consumer took it over) is left alone and counted stale.
-- Returns {stale, reply keys of another type, inboxes of another type}.
local group, consumer, ttl = ARGV[1], ARGV[2], ARGV[3]
local stale, bad_reply, bad_inbox = 0, 0, 0
for i = 1, #KEYS / 3 do
  local stream, reply, inbox = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local id, doc, notify = ARGV[3 * i + 1], ARGV[3 * i + 2], ARGV[3 * i + 3]
  if #redis.call('XPENDING', stream, group, id, id, 1, consumer) == 1 then
    local kind = redis.call('TYPE', reply)['ok']
    if kind == 'none' then
      redis.call('RPUSH', reply, doc)
      redis.call('EXPIRE', reply, ttl)
      if notify == '1' and not push(inbox, doc, ttl) then bad_inbox = bad_inbox + 1 end
    elseif kind ~= 'list' then
      bad_reply = bad_reply + 1
    end
    redis.call('XACK', stream, group, id)
  else
    stale = stale + 1
  end
end
return {stale, bad_reply, bad_inbox}
"""
)

# Redis Cluster: a reply key has its own hash slot, so one script cannot write it and ack its
# entry. There, replies are written first, each at most once, then each entry is acked only
# if still pending for this consumer (ACK_OWNED_LUA: the request streams share one hash tag).
# Nothing is lost (a reply precedes its ack), and a reply is still written once; what is
# weaker than on one node is the fence: a stale owner's reply can land before the new
# owner's (both are answers to the same request; only the first is kept) and its ack is
# still refused and counted.

REPLY_ONCE_LUA = """
-- KEYS[1]: reply key; ARGV: document, ttl_s. Returns 1 written, 0 already there, -1 the key
-- holds another type (skipped).
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'list' then return 0 end
if kind ~= 'none' then return -1 end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# The fast path of the same, per primary: every reply whose key that primary owns, each
# written once, in one call. The reply keys come in ARGV, not KEYS: declared keys must share
# one slot, and each reply key has its own. The allow-cross-slot-keys flag (Redis 7) lets one
# script touch keys of several slots of its own node; a key the node does not own (a slot
# moved, a failover) is refused ("non local key") and the caller falls back to the cluster
# client, which follows the redirect. ARGV: ttl_s, then reply key, document pairs.
# Returns the number of reply keys of another type (skipped).
REPLIES_ON_NODE_LUA = """#!lua flags=allow-cross-slot-keys
local ttl, bad = ARGV[1], 0
for i = 2, #ARGV, 2 do
  local kind = redis.call('TYPE', ARGV[i])['ok']
  if kind == 'none' then
    redis.call('RPUSH', ARGV[i], ARGV[i + 1])
    redis.call('EXPIRE', ARGV[i], ttl)
  elseif kind ~= 'list' then
    bad = bad + 1
  end
end
return bad
"""
REPLIES_ON_NODE_SHA = hashlib.sha1(REPLIES_ON_NODE_LUA.encode()).hexdigest()

PUSH_INBOX_LUA = (
    _PUSH
    + """
-- KEYS[1]: an inbox; ARGV: ttl_s, documents. Returns 1 pushed, 0 the key holds another type.
if push(KEYS[1], ARGV[2], ARGV[1]) then
  if #ARGV > 2 then redis.call('RPUSH', KEYS[1], unpack(ARGV, 3)) end
  return 1
end
return 0
"""
)

ACK_OWNED_LUA = """
-- KEYS: the stream of each entry; ARGV: group, consumer, entry ids. Returns stale entries.
local group, consumer = ARGV[1], ARGV[2]
local stale = 0
for i = 1, #KEYS do
  local id = ARGV[i + 2]
  if #redis.call('XPENDING', KEYS[i], group, id, id, 1, consumer) == 1 then
    redis.call('XACK', KEYS[i], group, id)
  else
    stale = stale + 1
  end
end
return stale
"""

DEAD_LETTER_LUA = """
-- Cluster dead-lettering: KEYS dead stream, request stream; ARGV maxlen, entry id, group, then
-- the record's field/value pairs (both keys carry the queue's hash tag). The ack happens
-- even if the dead-letter stream cannot take the record (another type): returns 0 then.
local added = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 4))
redis.call('XACK', KEYS[2], ARGV[3], ARGV[2])
if type(added) == 'table' and added.err then return 0 end
return 1
"""

LEASE_LUA = """
-- Lease refresh, fenced: KEYS[i] is the stream of entry ARGV[i + 2]. Resets the idle time of
-- each entry still pending for this consumer (XCLAIM ... JUSTID does not count a delivery);
-- never takes back an entry another consumer has claimed. Returns how many another consumer
-- holds now (entries acked meanwhile are simply skipped).
local group, consumer = ARGV[1], ARGV[2]
local lost = 0
for i = 1, #KEYS do
  local id = ARGV[i + 2]
  local entry = redis.call('XPENDING', KEYS[i], group, id, id, 1)
  if #entry == 1 then
    if entry[1][2] == consumer then
      redis.call('XCLAIM', KEYS[i], group, consumer, 0, id, 'JUSTID')
    else
      lost = lost + 1
    end
  end
end
return lost
"""

FORGET_LUA = """
-- Forget this consumer only if it has no pending entry on any request stream.
for i = 1, #KEYS do
  if #redis.call('XPENDING', KEYS[i], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
end
for i = 1, #KEYS do redis.call('XGROUP', 'DELCONSUMER', KEYS[i], ARGV[1], ARGV[2]) end
return 1
"""
