"""Dify-style conversations, kept in Redis: the relay holds the history, callers send one query.

A conversation belongs to one :class:`Scope` — instance, caller identity and Dify
``user`` — and every method acts on exactly that scope.  Whatever is outside it
(an unknown id, an id of another scope, an expired conversation) is the same
404, ``conversation_not_found`` or ``message_not_found``: an id found in another
scope must look exactly like an id that never existed, because for anonymous
callers a uuid4 id is the only credential.

A turn is checked and stored in steps: :meth:`ConversationStore.prepare_turn`
checks it against every bound and reads the history, storing nothing;
:meth:`~ConversationStore.reserve_turn` checks again and stores the message
(status ``answering``) — the Dify door calls it once an agent has taken the
request and before the answer is read, so a refused turn leaves no trace and
an accepted question is never lost (:meth:`~ConversationStore.start_turn` does
both in one call); :meth:`~ConversationStore.checkpoint` saves the partial
answer while it streams; :meth:`~ConversationStore.finish` writes the final
answer.  A message still ``answering`` whose last write is older than
``stale_after`` reads as ``interrupted``: the node answering it died.

Every operation is one Lua script (one round trip, checks and writes atomic),
and every key an instance's conversations use shares one Redis Cluster hash tag
(see ``keys.py`` for the layout), so each script touches one slot.

Retention: a conversation's keys expire ``retention_seconds`` after its last
activity.  Activity is every write but a checkpoint: starting and finishing a
turn, renaming, feedback.  A checkpoint only replaces the partial answer in
place (it neither moves the conversation up the list nor extends its life), so
the write repeated every few seconds while streaming stays O(1); the turn's
finish, a moment later, is the activity (a turn whose node died leaves its
conversation to expire ``retention_seconds`` after that turn started).  A
rename or a feedback refreshes the conversation and the one message it rates,
not every message's index entry (turns do that): they stay O(1), so the
entry that finds an old message for feedback can expire before its
conversation if only renames kept it alive since.  The
scope and instance indexes live
as long as their most recent conversation; entries of conversations that
expired are dropped when a list or a creation meets them.

Bounds (0 turns one off):

* ``max_message_bytes`` — a query larger (UTF-8) is refused (422
  ``message_too_large``), and so are inputs whose JSON is larger (422
  ``inputs_too_large``); an answer larger is cut on a character boundary and
  marked ``"truncated": true``.
* ``max_messages`` — a conversation holding that many messages takes no more
  turns (422 ``conversation_full``).
* ``max_conversations`` — per scope; creating one more is 422
  ``too_many_conversations``.  422 (``ValidationFailed``) rather than 429:
  waiting never helps, deleting a conversation does, and clients retry a 429
  on their own.  It is also what the relay answers when an instance has too
  many caller keys (``too_many_keys``).  For an anonymous caller the same
  limit also holds per client address (``Bounds.address``, from the door):
  ``user`` is whatever the client says, so a new one per conversation must
  not sidestep it.
* ``Bounds.conversations`` / ``Bounds.bytes`` (given per turn by the door) —
  what one instance keeps in all: past the first, a new conversation is 422
  ``instance_conversations_full`` (turns in existing ones go on); past the
  second, every new turn is.  Bytes are those of the stored values (queries,
  answers, names, inputs), counted by every script that writes or removes
  them (checkpoints included) in the instance's sizes hash; a conversation
  leaves the count when it leaves the instance index (deleted, purged, or
  found expired: a creation drops expired entries from the index's least
  recently active end, many when the instance looks full), so expiry gives
  its place back.  A turn already accepted is finished whatever the bound:
  the bytes may pass it by what the turns in flight store.
* ``Bounds.caller_bytes`` — one caller's share of those bytes, so that one
  caller cannot fill the instance for everyone: a conversation counts against
  the share of the caller that made it (its key, or without one its client
  address: :meth:`Bounds.identity`), accounted in the same hash by the same
  scripts and given back the same way; past the share, that caller's new
  turns are 422 ``caller_conversations_full`` (others' go on).  A
  conversation stored before the shares existed joins its caller's share at
  its next turn, with all its bytes.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from redis.asyncio import Redis

from relay.errors import NotFound, ValidationFailed
from relay.store import keys
from relay.store.cluster import ReachingScript

ANSWERING = "answering"
INTERRUPTED = "interrupted"
FINAL_STATUSES = frozenset({"normal", "stopped", "error"})
RATINGS = frozenset({"like", "dislike"})

#: Longest conversation name kept, in characters (a default name is shorter).
MAX_NAME_CHARS = 256
#: Characters of the first query that make a new conversation's default name.
DEFAULT_NAME_CHARS = 40
#: Largest token usage object stored with an answer, as JSON (a larger one is left out).
MAX_USAGE_BYTES = 4096
#: Largest page either list returns (Dify's own bound).
MAX_PAGE = 100
#: Stale index entries a creation drops from the head of an index, at most:
#: more than the one entry it adds, so the index shrinks back to the live ones.
_SWEEP = 10
#: Stale entries a creation drops from the instance index when the instance
#: looks full: the expired ones are at its least recently active end.
_WIDE_SWEEP = 1000

# -- Lua --------------------------------------------------------------------------------
#
# Shared functions, prepended to the scripts that need them.  Keys of other
# conversations (found through an index) are built from prefixes that keys.py
# gives as ARGV: they carry the instance's hash tag, so they are in the slot of
# the declared keys.  But Redis Cluster checks such undeclared keys only when a
# script reaches them: while the slot migrates away, one that is not on this
# master (moved already, or still to be created) fails the script there, and
# what it wrote before stays.  So every script reaches (`reach`) each
# undeclared key it will touch before its first write, and is sent again
# until the slot has moved (cluster_client.ReachingScript).  A key a script
# empties is not touched again by it (Redis checks that one the same way).
# The sweeps of stale index entries are the one exception to both: they only
# drop entries already found stale, which a rerun would drop anyway.

_LIB = """
local function reach(key) redis.call('EXISTS', key) end

local function owned(conv, caller, user)
  local who = redis.call('HMGET', conv, 'caller', 'user')
  return who[1] == caller and who[2] == user
end

-- Activity: the conversation moves to the front of its indexes and every key
-- it has lives `ttl` ms from now.  updated_at never goes back: nodes' clocks
-- differ a little.  The message index entries (one key per message) are
-- refreshed only by turns (`xprefix` given), which read the whole history
-- anyway: a rename or a feedback stays O(1) however long the conversation.
local function touch(conv, msgs, order, scope, all, sizes, cid, now, ttl, xprefix)
  local prev = tonumber(redis.call('HGET', conv, 'updated_at'))
  if not prev or tonumber(now) > prev then redis.call('HSET', conv, 'updated_at', now) end
  redis.call('ZADD', scope, 'GT', now, cid)
  redis.call('ZADD', all, 'GT', now, cid)
  for _, key in ipairs({conv, msgs, order, scope, all, sizes}) do redis.call('PEXPIRE', key, ttl) end
  if xprefix == '' then return end
  for _, mid in ipairs(redis.call('ZRANGE', order, 0, -1)) do redis.call('PEXPIRE', xprefix .. mid, ttl) end
end

-- The instance's stored bytes: `sizes` holds each conversation's bytes
-- (field <cid>) and their sum (field 'total'); and per caller: whose share a
-- conversation counts against (field 'w:<cid>', the caller's identity: its
-- key, or an address) and that caller's sum (field 'o:<identity>').  Every
-- change of a conversation's bytes changes the sums with it.  A conversation
-- leaves the instance index only through `forget`, which gives its bytes back
-- to both: deleted, purged or expired.
local function account(sizes, cid, delta)
  if delta == 0 then return end
  redis.call('HINCRBY', sizes, cid, delta)
  redis.call('HINCRBY', sizes, 'total', delta)
  local who = redis.call('HGET', sizes, 'w:' .. cid)
  if who then redis.call('HINCRBY', sizes, 'o:' .. who, delta) end
end

-- A conversation counts against `who`'s share from now on, with the bytes it
-- holds already (one stored before the shares existed has some).
local function adopt(sizes, cid, who)
  if redis.call('HSETNX', sizes, 'w:' .. cid, who) == 0 then return end
  local n = tonumber(redis.call('HGET', sizes, cid)) or 0
  if n ~= 0 then redis.call('HINCRBY', sizes, 'o:' .. who, n) end
end

local function forget(all, sizes, cid)
  redis.call('ZREM', all, cid)
  local n = tonumber(redis.call('HGET', sizes, cid))
  local who = redis.call('HGET', sizes, 'w:' .. cid)
  -- The hash is never emptied here (its 'total' stays, at 0 at least, until its TTL): on a
  -- cluster, a key a script deletes and then touches again is refused mid-script while its
  -- slot migrates, after the writes before it.
  if who and not n then redis.call('HINCRBY', sizes, 'total', 0) end
  if who then
    redis.call('HDEL', sizes, 'w:' .. cid)
    if redis.call('HINCRBY', sizes, 'o:' .. who, -(n or 0)) <= 0 then redis.call('HDEL', sizes, 'o:' .. who) end
  end
  if n then
    redis.call('HDEL', sizes, cid)
    redis.call('HINCRBY', sizes, 'total', -n)
  end
end

-- A sizes hash that counts nothing any more goes, as an emptied index does.  Only as a
-- script's last access to it: see forget.
local function settle(sizes)
  if redis.call('HLEN', sizes) == 1 and redis.call('HGET', sizes, 'total') == '0' then
    redis.call('DEL', sizes)
  end
end

-- Drop index entries whose conversation expired, from the least recently
-- active end, stopping at the first live one (the rest expire later).
-- `sizes` given (the instance index): their bytes are given back too.
local function sweep_head(index, cprefix, budget, sizes)
  for _ = 1, budget do
    local head = redis.call('ZRANGE', index, 0, 0)[1]
    if not head or redis.call('EXISTS', cprefix .. head) == 1 then return end
    if sizes then forget(index, sizes, head) else redis.call('ZREM', index, head) end
  end
end

-- Every expired entry, wherever it sits (order by score is only nearly the
-- order of expiry).  Used only on a scope at its limit: that index holds at
-- most max_conversations entries.
local function sweep_all(index, cprefix)
  for _, cid in ipairs(redis.call('ZRANGE', index, 0, -1)) do
    if redis.call('EXISTS', cprefix .. cid) == 0 then redis.call('ZREM', index, cid) end
  end
end
"""

# Check a new turn, and (unless only checking) reserve its message, creating
# the conversation first when asked.  Mode "check": the checks and the history,
# nothing written (sweeps of stale index entries aside), and the history as it is
# before this message; "reserve": the checks again, then the writes.
# KEYS: conversation, messages, order, scope index, instance index, instance
#       sizes, address index (used only when ARGV[20] is "1", else the conversation again).
# ARGV: cid, mid, caller, user, now, ttl ms, index prefix, conversation prefix,
#       max messages, max conversations (per scope, and per address),
#       message head JSON, state JSON, create ("1"/"0"), name, inputs JSON,
#       scope digest, mode, instance max conversations, instance max bytes,
#       address ("1"/"0"), history bytes, history answered messages, address digest,
#       the caller's identity for its share of the bytes ("" none), the share.
_START = _LIB + """
local cid, mid, now, ttl, mode = ARGV[1], ARGV[2], ARGV[5], tonumber(ARGV[6]), ARGV[17]
local create = ARGV[13] == '1'
local function at_limit(index, limit)
  sweep_head(index, ARGV[8], SWEEP)
  if redis.call('ZCARD', index) < limit then return false end
  sweep_all(index, ARGV[8])
  return redis.call('ZCARD', index) >= limit
end
local function stored() return tonumber(redis.call('HGET', KEYS[6], 'total')) or 0 end
if create then
  sweep_head(KEYS[5], ARGV[8], SWEEP, KEYS[6])
  local limit = tonumber(ARGV[10])
  if limit > 0 and at_limit(KEYS[4], limit) then return {'too_many'} end
  if limit > 0 and ARGV[20] == '1' and at_limit(KEYS[7], limit) then return {'too_many_here'} end
  local most = tonumber(ARGV[18])
  if most > 0 and redis.call('ZCARD', KEYS[5]) >= most then
    sweep_head(KEYS[5], ARGV[8], WIDE, KEYS[6])
    if redis.call('ZCARD', KEYS[5]) >= most then return {'instance_full'} end
  end
  if redis.call('EXISTS', KEYS[1]) == 1 then return {'taken'} end
else
  if not owned(KEYS[1], ARGV[3], ARGV[4]) then return {'missing'} end
  local limit = tonumber(ARGV[9])
  if limit > 0 and redis.call('ZCARD', KEYS[3]) >= limit then return {'full'} end
end
-- Whose share the turn counts against: the conversation's (recorded when it
-- was made, or an older anonymous one's address), else this caller's.
local who = ARGV[24]
if not create then
  local addr = redis.call('HGET', KEYS[1], 'addr')
  who = redis.call('HGET', KEYS[6], 'w:' .. cid) or (addr and ('addr:' .. addr)) or who
end
local share = tonumber(ARGV[25])
local function held() return tonumber(redis.call('HGET', KEYS[6], 'o:' .. who)) or 0 end
if share > 0 and who ~= '' and held() >= share then
  sweep_head(KEYS[5], ARGV[8], WIDE, KEYS[6])
  if held() >= share then return {'caller_bytes_full'} end
end
local most_bytes = tonumber(ARGV[19])
if most_bytes > 0 and stored() >= most_bytes then
  sweep_head(KEYS[5], ARGV[8], WIDE, KEYS[6])
  if stored() >= most_bytes then return {'instance_bytes_full'} end
end
-- The history the model may see: the newest messages, until `most_bytes` of
-- them are read or `most_answered` answered ones (0: no bound); oldest first.
local function history()
  local most_bytes, most_answered = tonumber(ARGV[21]), tonumber(ARGV[22])
  local picked, fields, used, answered = {}, {}, 0, 0
  for _, id in ipairs(redis.call('ZREVRANGE', KEYS[3], 0, -1)) do
    if (most_bytes > 0 and used >= most_bytes) or (most_answered > 0 and answered >= most_answered) then break end
    local v = redis.call('HMGET', KEYS[2], id, id .. ':s', id .. ':r', id .. ':f')
    if v[1] then
      table.insert(picked, 1, id)
      for i, suffix in ipairs({'', ':s', ':r', ':f'}) do
        if v[i] then fields[#fields + 1] = id .. suffix; fields[#fields + 1] = v[i] end
      end
      used = used + #v[1] + #(v[3] or '')
      if v[3] and string.sub(v[3], 1, 13) ~= '{"answer":"",' then answered = answered + 1 end
    end
  end
  return picked, fields
end
if mode == 'check' then
  if create then return {'ok', ARGV[15], {}, {}} end
  local picked, fields = history()
  return {'ok', redis.call('HGET', KEYS[1], 'inputs'), picked, fields}
end
local ids = redis.call('ZRANGE', KEYS[3], 0, -1)
for _, id in ipairs(ids) do reach(ARGV[7] .. id) end
reach(ARGV[7] .. mid)
local size = #ARGV[11] + #ARGV[12]
if create then
  redis.call('HSET', KEYS[1], 'name', ARGV[14], 'inputs', ARGV[15], 'created_at', now, 'updated_at', now,
             'caller', ARGV[3], 'user', ARGV[4], 'scope', ARGV[16], 'seq', 0)
  size = size + #ARGV[14] + #ARGV[15]
  if ARGV[20] == '1' then
    redis.call('HSET', KEYS[1], 'addr', ARGV[23])
    redis.call('ZADD', KEYS[7], now, cid)
    redis.call('PEXPIRE', KEYS[7], ttl)
  end
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('ZADD', KEYS[3], seq, mid)
redis.call('HSET', KEYS[2], mid, ARGV[11], mid .. ':s', 'answering', mid .. ':r', ARGV[12])
redis.call('SET', ARGV[7] .. mid, cid, 'PX', ttl)
if who ~= '' then adopt(KEYS[6], cid, who) end
account(KEYS[6], cid, size)
touch(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], cid, now, ttl, ARGV[7])
return {'ok', redis.call('HGET', KEYS[1], 'inputs'), {}, {}}
""".replace("SWEEP", str(_SWEEP)).replace("WIDE", str(_WIDE_SWEEP))

# Replace the partial answer of a message still answering.  Not activity (see
# the module docstring): no TTL or index changes; its bytes are counted.
# KEYS: conversation, messages, instance sizes.  ARGV: mid, state JSON, cid.
_CHECKPOINT = _LIB + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[2], ARGV[1] .. ':s') ~= 'answering' then return 0 end
local delta = #ARGV[2] - redis.call('HSTRLEN', KEYS[2], ARGV[1] .. ':r')
redis.call('HSET', KEYS[2], ARGV[1] .. ':r', ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 1 then account(KEYS[3], ARGV[3], delta) end
return 1
"""

# The final write of a message still answering (a second finish changes nothing).
# KEYS: conversation, messages, order, scope index, instance index, instance sizes.
# ARGV: cid, mid, status, state JSON, now, ttl ms, index prefix.
_FINISH = _LIB + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[2], ARGV[2] .. ':s') ~= 'answering' then return 0 end
for _, id in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do reach(ARGV[7] .. id) end
local delta = #ARGV[4] - redis.call('HSTRLEN', KEYS[2], ARGV[2] .. ':r')
redis.call('HSET', KEYS[2], ARGV[2] .. ':s', ARGV[3], ARGV[2] .. ':r', ARGV[4])
account(KEYS[6], ARGV[1], delta)
touch(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], ARGV[1], ARGV[5], tonumber(ARGV[6]), ARGV[7])
return 1
"""

# One page of messages, newest first, older than first_id when given.
# KEYS: conversation, messages, order.  ARGV: caller, user, first_id or "", count.
_MESSAGES = _LIB + """
if not owned(KEYS[1], ARGV[1], ARGV[2]) then return {'missing'} end
local count = tonumber(ARGV[4])
local ids
if ARGV[3] ~= '' then
  local seq = redis.call('ZSCORE', KEYS[3], ARGV[3])
  if not seq then return {'no_first'} end
  ids = redis.call('ZREVRANGEBYSCORE', KEYS[3], '(' .. seq, '-inf', 'LIMIT', 0, count)
else
  ids = redis.call('ZREVRANGE', KEYS[3], 0, count - 1)
end
local fields = {}
for _, mid in ipairs(ids) do
  for _, suffix in ipairs({'', ':s', ':r', ':f'}) do fields[#fields + 1] = mid .. suffix end
end
local values = {}
if #fields > 0 then values = redis.call('HMGET', KEYS[2], unpack(fields)) end
return {'ok', redis.call('HGET', KEYS[1], 'inputs'), ids, values}
"""

# One page of a scope's conversations, most recently active first, after
# last_id when given; drops the entries of expired conversations it meets.
# Ranks rather than scores make the cursor: ties of activity time stay in one
# order (Redis orders equal scores by member).
# KEYS: scope index, instance index, instance sizes.  ARGV: caller, user,
# last_id or "", count, conversation prefix.
_CONVERSATIONS = _LIB + """
local pos = 0
if ARGV[3] ~= '' then
  local rank = redis.call('ZREVRANK', KEYS[1], ARGV[3])
  if not rank then return {'no_last'} end
  if redis.call('EXISTS', ARGV[5] .. ARGV[3]) == 0 then
    redis.call('ZREM', KEYS[1], ARGV[3])
    forget(KEYS[2], KEYS[3], ARGV[3])
    settle(KEYS[3])
    return {'no_last'}
  end
  pos = rank + 1
end
local count = tonumber(ARGV[4])
local out = {}
while #out < count do
  local batch = redis.call('ZREVRANGE', KEYS[1], pos, pos + count - 1)
  if #batch == 0 then break end
  for _, cid in ipairs(batch) do
    local f = redis.call('HMGET', ARGV[5] .. cid, 'caller', 'user', 'name', 'inputs', 'created_at', 'updated_at')
    if not f[1] then
      -- expired: the entries after it move up one rank, so pos stays
      redis.call('ZREM', KEYS[1], cid)
      forget(KEYS[2], KEYS[3], cid)
    else
      pos = pos + 1
      if f[1] == ARGV[1] and f[2] == ARGV[2] then
        out[#out + 1] = {cid, f[3], f[4], f[5], f[6]}
        if #out == count then break end
      end
    end
  end
end
settle(KEYS[3])
return {'ok', out}
"""

# KEYS: conversation, messages, order, scope index, instance index, instance sizes.
# ARGV: caller, user, cid, name, now, ttl ms, index prefix.
_RENAME = _LIB + """
if not owned(KEYS[1], ARGV[1], ARGV[2]) then return {'missing'} end
local delta = #ARGV[4] - redis.call('HSTRLEN', KEYS[1], 'name')
redis.call('HSET', KEYS[1], 'name', ARGV[4])
account(KEYS[6], ARGV[3], delta)
touch(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], ARGV[3], ARGV[5], tonumber(ARGV[6]), '')
return {'ok', redis.call('HMGET', KEYS[1], 'name', 'inputs', 'created_at', 'updated_at')}
"""

# KEYS: conversation, messages, order, scope index, instance index, instance sizes.
# ARGV: caller, user, cid, index prefix, address index prefix.
_DELETE = _LIB + """
if not owned(KEYS[1], ARGV[1], ARGV[2]) then return 0 end
local ids = redis.call('ZRANGE', KEYS[3], 0, -1)
for _, mid in ipairs(ids) do reach(ARGV[4] .. mid) end
local addr = redis.call('HGET', KEYS[1], 'addr')
if addr then reach(ARGV[5] .. addr) end
for _, mid in ipairs(ids) do redis.call('DEL', ARGV[4] .. mid) end
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[3])
if addr then redis.call('ZREM', ARGV[5] .. addr, ARGV[3]) end
forget(KEYS[5], KEYS[6], ARGV[3])
settle(KEYS[6])
return 1
"""

# Set (rating) or clear ("") a message's feedback, found by message id.
# KEYS: message index entry, scope index, instance index, instance sizes.
# ARGV: caller, user, mid, rating or "", now, ttl ms, index prefix,
#       conversation prefix, messages prefix, order prefix.
_FEEDBACK = _LIB + """
local cid = redis.call('GET', KEYS[1])
if not cid then return 0 end
local conv, msgs, order = ARGV[8] .. cid, ARGV[9] .. cid, ARGV[10] .. cid
reach(conv) reach(msgs) reach(order)
if not owned(conv, ARGV[1], ARGV[2]) or redis.call('HEXISTS', msgs, ARGV[3]) == 0 then return 0 end
if ARGV[4] == '' then
  redis.call('HDEL', msgs, ARGV[3] .. ':f')
else
  redis.call('HSET', msgs, ARGV[3] .. ':f', ARGV[4])
end
touch(conv, msgs, order, KEYS[2], KEYS[3], KEYS[4], cid, ARGV[5], tonumber(ARGV[6]), '')
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[6]))  -- the rated message's own index entry: O(1)
return 1
"""

# Delete up to `batch` conversations of an instance, least recently active
# first.  Entries of expired conversations just leave the index (their keys
# expire by themselves).  KEYS: instance index, instance sizes.
# ARGV: batch, conversation, messages, order, index, scope and address index prefixes.
# Returns {conversations deleted, entries left}.
_PURGE = _LIB + """
-- Counted first: the index may be empty at the end, and an emptied key is not
-- touched again (on a migrating slot that too would refuse the script midway).
local entries = redis.call('ZCARD', KEYS[1])
local found = {}
for _, cid in ipairs(redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)) do
  local who = redis.call('HMGET', ARGV[2] .. cid, 'scope', 'addr')
  local scope, addr = who[1], who[2]
  local ids = {}
  if scope then
    ids = redis.call('ZRANGE', ARGV[4] .. cid, 0, -1)
    for _, mid in ipairs(ids) do reach(ARGV[5] .. mid) end
    reach(ARGV[3] .. cid) reach(ARGV[6] .. scope)
    if addr then reach(ARGV[7] .. addr) end
  end
  found[#found + 1] = {cid, scope, ids, addr}
end
local deleted = 0
for _, f in ipairs(found) do
  local cid, scope, ids, addr = f[1], f[2], f[3], f[4]
  if scope then
    for _, mid in ipairs(ids) do redis.call('DEL', ARGV[5] .. mid) end
    redis.call('UNLINK', ARGV[2] .. cid, ARGV[3] .. cid, ARGV[4] .. cid)
    redis.call('ZREM', ARGV[6] .. scope, cid)
    if addr then redis.call('ZREM', ARGV[7] .. addr, cid) end
    deleted = deleted + 1
  end
  forget(KEYS[1], KEYS[2], cid)
end
settle(KEYS[2])
return {deleted, entries - #found}
"""


# -- data -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose conversations: an instance, a caller (``key:<key_id>`` or ``anon``), a Dify user."""

    instance_id: str
    caller: str
    user: str

    @property
    def digest(self) -> str:
        """The scope as a fixed-size key part (the user is arbitrary text)."""
        return hashlib.sha256(orjson.dumps([self.caller, self.user])).hexdigest()


@dataclass(frozen=True, slots=True)
class Turn:
    """A message reserved by :meth:`ConversationStore.start_turn`, to answer and then finish.

    ``history``: the earlier messages of the conversation as they were when this
    turn started, oldest first, in the shape of :meth:`ConversationStore.messages`
    records — finished ones (``normal``, ``stopped``, ``error``) and
    ``interrupted`` ones, never those of other turns still answering.
    """

    conversation_id: str
    message_id: str
    created_at: int
    inputs: dict[str, Any]
    history: list[dict[str, Any]]
    scope: Scope
    #: True when this turn created the conversation.
    created: bool = False
    #: The conversation's name (a new one's default name).
    name: str = ""
    #: The question (stored by :meth:`ConversationStore.reserve_turn`).
    query: str = ""


@dataclass(frozen=True, slots=True)
class Bounds:
    """What a new turn is checked against besides the store's own bounds (0: none).

    ``conversations`` and ``bytes``: what one instance may keep in all
    (``instance_conversations_full``); ``address``: the client address of an
    anonymous caller, whose conversations count per address as well as per
    ``user`` (the per-scope limit applies to both), so that naming a new
    ``user`` for each conversation does not sidestep it; ``caller_bytes``:
    the bytes of one caller's conversations (its :meth:`identity`), past
    which its turns are ``caller_conversations_full``.
    """

    conversations: int = 0
    bytes: int = 0
    address: str | None = None
    caller_bytes: int = 0

    @property
    def address_digest(self) -> str:
        return hashlib.sha256((self.address or "").encode()).hexdigest()

    def identity(self, scope: Scope) -> str:
        """Whose share of the instance's bytes a new conversation counts against: the caller
        key (``key:<id>``), else the client address (``addr:<hex SHA-256>``, the
        conversation's ``addr``); "" (none) for an anonymous caller without one."""
        if scope.caller.startswith("key:"):
            return scope.caller
        return f"addr:{self.address_digest}" if self.address is not None else ""


NO_BOUNDS = Bounds()


def is_uuid(value: str) -> bool:
    """Whether ``value`` is a canonical uuid string, the only form this store hands out."""
    try:
        return str(uuid.UUID(value)) == value
    except (ValueError, TypeError, AttributeError):
        return False


def clip_utf8(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut to at most ``limit`` UTF-8 bytes on a character boundary, and whether it was cut.

    Lone surrogates (possible in a Python str, never valid UTF-8) become ``?``:
    what is stored must encode.
    """
    data = text.encode("utf-8", "replace")
    if limit <= 0 or len(data) <= limit:
        return data.decode(), False
    # Only the tail of the cut can be a partial sequence: "ignore" drops just that.
    return data[:limit].decode("utf-8", "ignore"), True


def default_name(query: str) -> str:
    """What Dify shows for a new conversation: the start of its first query, on one line."""
    return " ".join(query.split())[:DEFAULT_NAME_CHARS] or "New conversation"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _not_found() -> NotFound:
    return NotFound("conversation not found", param="conversation_id", code="conversation_not_found")


def _message_not_found(param: str = "message_id") -> NotFound:
    return NotFound("message not found", param=param, code="message_not_found")


def _check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise ValidationFailed(f"limit must be an integer from 1 to {MAX_PAGE}", param="limit")


# -- the store ------------------------------------------------------------------------------


class ConversationStore:
    """Conversations of every instance, in Redis; the bounds are those of the module docstring.

    ``retention_seconds``: life of a conversation after its last activity;
    ``stale_after``: seconds without a write after which an ``answering``
    message reads as ``interrupted``; ``purge_batch``: conversations deleted
    per script call by :meth:`purge_instance`.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        retention_seconds: float,
        max_messages: int,
        max_conversations: int,
        max_message_bytes: int,
        stale_after: float,
        purge_batch: int = 100,
    ):
        if retention_seconds <= 0:
            raise ValueError("retention_seconds must be positive")
        self.redis = redis
        self.retention_seconds = retention_seconds
        self.ttl_ms = max(1, int(retention_seconds * 1000))
        self.max_messages = max_messages
        self.max_conversations = max_conversations
        self.max_message_bytes = max_message_bytes
        self.stale_after = stale_after
        #: Conversations one purge script deletes: it does at most
        #: purge_batch * (max_messages + 3) key deletions.
        self.purge_batch = max(1, purge_batch)
        # Every script reaches its undeclared keys before it writes (see _LIB):
        # on a cluster, sent again while their slot migrates.
        self._start = ReachingScript(redis, _START)
        self._checkpoint = ReachingScript(redis, _CHECKPOINT)
        self._finish = ReachingScript(redis, _FINISH)
        self._messages = ReachingScript(redis, _MESSAGES)
        self._conversations = ReachingScript(redis, _CONVERSATIONS)
        self._rename = ReachingScript(redis, _RENAME)
        self._delete = ReachingScript(redis, _DELETE)
        self._feedback = ReachingScript(redis, _FEEDBACK)
        self._purge = ReachingScript(redis, _PURGE)

    # -- keys ------------------------------------------------------------------

    @staticmethod
    def _keys(scope: Scope, conversation_id: str) -> list[str]:
        iid = scope.instance_id
        return [
            keys.conversation(iid, conversation_id),
            keys.conversation_messages(iid, conversation_id),
            keys.conversation_order(iid, conversation_id),
            keys.scope_conversations(iid, scope.digest),
            keys.instance_conversations(iid),
            keys.conversation_sizes(iid),
        ]

    # -- turns -----------------------------------------------------------------

    async def start_turn(
        self, scope: Scope, conversation_id: str | None, query: str, inputs: dict[str, Any], now: float,
        bounds: Bounds = NO_BOUNDS, *, recent: tuple[int, int] = (0, 0),
    ) -> Turn:
        """Check and reserve a new message (status ``answering``): :meth:`prepare_turn`, then
        :meth:`reserve_turn` (which checks again).  Raises as either."""
        turn = await self.prepare_turn(scope, conversation_id, query, inputs, now, bounds, recent=recent)
        await self.reserve_turn(turn, now, bounds)
        return turn

    async def prepare_turn(
        self, scope: Scope, conversation_id: str | None, query: str, inputs: dict[str, Any], now: float,
        bounds: Bounds = NO_BOUNDS, *, recent: tuple[int, int] = (0, 0),
    ) -> Turn:
        """Check a new turn and read the history it answers from, storing nothing.

        ``conversation_id`` None is a new conversation named after the query,
        holding ``inputs``; otherwise the conversation's stored inputs are kept
        and ``inputs`` is ignored.  ``recent`` = (bytes, answered messages)
        bounds the history read, newest first: reading stops once that many
        bytes of stored JSON, or that many messages with an answer, are read
        (0: no bound), so what a turn holds does not grow with its
        conversation.  :meth:`reserve_turn` stores the turn (the
        Dify door calls it once an agent took the request: a turn refused before
        leaves no trace).  Raises NotFound ``conversation_not_found``,
        ValidationFailed ``message_too_large`` / ``inputs_too_large`` /
        ``conversation_full`` / ``too_many_conversations`` /
        ``caller_conversations_full`` / ``instance_conversations_full``.
        """
        return await self._start_script(self._prepared(scope, conversation_id, query, inputs, now), now, bounds,
                                        "check", recent)

    async def reserve_turn(self, turn: Turn, now: float, bounds: Bounds = NO_BOUNDS) -> None:
        """Store a prepared turn's message (status ``answering``), creating its conversation if new.

        Checks again, atomically (what :meth:`prepare_turn` found may have
        changed since); raises as it does.
        """
        await self._start_script(turn, now, bounds, "reserve")

    def _prepared(self, scope: Scope, conversation_id: str | None, query: str, inputs: dict[str, Any],
                  now: float) -> Turn:
        """The turn's ids and what it will store, checked for size; nothing read yet."""
        query, _ = clip_utf8(query, 0)  # only made encodable; its size is checked below
        size = len(query.encode())
        if self.max_message_bytes and size > self.max_message_bytes:
            raise ValidationFailed(
                f"query is {size} bytes; the limit is {self.max_message_bytes}",
                param="query", code="message_too_large",
            )
        create = conversation_id is None
        if conversation_id is None:
            conversation_id = str(uuid.uuid4())
        elif not is_uuid(conversation_id):
            raise _not_found()
        if create and self.max_message_bytes:
            inputs_json = orjson.dumps(inputs)
            if len(inputs_json) > self.max_message_bytes:
                raise ValidationFailed(
                    f"inputs are {len(inputs_json)} bytes of JSON; the limit is {self.max_message_bytes}",
                    param="inputs", code="inputs_too_large",
                )
        return Turn(conversation_id, str(uuid.uuid4()), int(now), dict(inputs) if create else {}, [], scope,
                    create, default_name(query) if create else "", query)

    async def _start_script(self, turn: Turn, now: float, bounds: Bounds, mode: str,
                            recent: tuple[int, int] = (0, 0)) -> Turn:
        scope, conversation_id, create = turn.scope, turn.conversation_id, turn.created
        iid = scope.instance_id
        by_address = create and bounds.address is not None
        names = self._keys(scope, conversation_id)
        # Declared only when used: on a migrating slot, a declared key not there
        # (an address index never made) refuses the script up front (TRYAGAIN).
        names.append(keys.address_conversations(iid, bounds.address_digest) if by_address else names[0])
        reply = await self._start(
            keys=names,
            args=[
                conversation_id, turn.message_id, scope.caller, scope.user, repr(float(now)), self.ttl_ms,
                keys.message_conversation(iid, ""), keys.conversation(iid, ""),
                self.max_messages, self.max_conversations,
                orjson.dumps({"query": turn.query, "created_at": now}),
                orjson.dumps({"answer": "", "updated_at": now}),
                "1" if create else "0", turn.name, orjson.dumps(turn.inputs) if create else b"{}", scope.digest,
                mode, bounds.conversations, bounds.bytes, "1" if by_address else "0", *recent,
                bounds.address_digest, bounds.identity(scope), bounds.caller_bytes,
            ],
        )
        verdict = _text(reply[0])
        if verdict == "missing":
            raise _not_found()
        if verdict == "full":
            raise ValidationFailed(
                f"this conversation already holds {self.max_messages} messages; start a new one",
                param="conversation_id", code="conversation_full",
            )
        if verdict == "too_many":
            raise ValidationFailed(
                f"at most {self.max_conversations} conversations per user; delete one first",
                code="too_many_conversations",
            )
        if verdict == "too_many_here":
            raise ValidationFailed(
                f"at most {self.max_conversations} conversations per client address without a caller key; "
                "delete one first", code="too_many_conversations",
            )
        if verdict == "instance_full":
            raise ValidationFailed(
                f"this instance keeps {bounds.conversations} conversations, its limit: continue one of yours, "
                "or ask its owner to delete old ones", code="instance_conversations_full",
            )
        if verdict == "caller_bytes_full":
            raise ValidationFailed(
                f"your conversations on this instance hold {bounds.caller_bytes} bytes, the most one caller "
                "(a caller key, or without one a client address) may keep: delete some of them "
                "(DELETE /conversations/{conversation_id}) to store new turns",
                code="caller_conversations_full",
            )
        if verdict == "instance_bytes_full":
            raise ValidationFailed(
                f"this instance's conversations hold {bounds.bytes} bytes, its limit: "
                "delete conversations, or ask its owner to", code="instance_conversations_full",
            )
        if verdict != "ok":  # "taken": a uuid4 collision, never expected
            raise RuntimeError(f"could not reserve conversation {conversation_id}: {verdict}")
        if mode == "reserve":
            return turn
        stored_inputs = orjson.loads(reply[1])
        records = dict(zip(reply[3][::2], reply[3][1::2], strict=True))
        history = []
        for raw_id in reply[2]:
            record = self._record(conversation_id, stored_inputs, raw_id, records, now)
            if record is not None and record["status"] != ANSWERING:
                history.append(record)
        return Turn(conversation_id, turn.message_id, turn.created_at, stored_inputs, history, scope, create,
                    turn.name, turn.query)

    def _final_state(self, answer: str, now: float, usage: dict[str, Any] | None = None,
                     truncated: bool = False) -> bytes:
        answer, clipped = clip_utf8(answer, self.max_message_bytes)
        state: dict[str, Any] = {"answer": answer, "updated_at": now}
        if truncated or clipped:
            state["truncated"] = True
        if usage is not None and len(orjson.dumps(usage)) <= MAX_USAGE_BYTES:  # the agent's to fill: kept if small
            state["usage"] = usage
        return orjson.dumps(state)

    async def checkpoint(self, turn: Turn, answer_so_far: str, now: float, *, truncated: bool = False) -> bool:
        """Save the partial answer of a turn still answering (cut like a final answer).

        ``truncated``: the answer given was already cut (the door keeps at most
        ``max_message_bytes`` of it), mark it so.  False, storing nothing, when
        the turn is finished or its conversation is gone (deleted, purged,
        expired): the caller's stream need not care.
        """
        names = self._keys(turn.scope, turn.conversation_id)
        reply = await self._checkpoint(
            keys=[names[0], names[1], names[5]],
            args=[turn.message_id, self._final_state(answer_so_far, now, truncated=truncated), turn.conversation_id],
        )
        return bool(reply)

    async def finish(
        self,
        turn: Turn,
        answer: str,
        status: Literal["normal", "stopped", "error"],
        now: float,
        usage: dict[str, Any] | None = None,
        *,
        truncated: bool = False,
    ) -> bool:
        """The final write of a turn: ``normal``, ``stopped`` (the caller left), ``error`` (the model failed).

        ``truncated`` as for :meth:`checkpoint`.  False, storing nothing, when
        the turn was already finished or its conversation is gone.
        """
        if status not in FINAL_STATUSES:
            raise ValueError(f"a turn finishes as one of {sorted(FINAL_STATUSES)}, not {status!r}")
        reply = await self._finish(
            keys=self._keys(turn.scope, turn.conversation_id),
            args=[turn.conversation_id, turn.message_id, status, self._final_state(answer, now, usage, truncated),
                  repr(float(now)), self.ttl_ms, keys.message_conversation(turn.scope.instance_id, "")],
        )
        return bool(reply)

    # -- reading ---------------------------------------------------------------

    def _record(
        self, conversation_id: str, inputs: dict[str, Any], raw_id: bytes, fields: dict[bytes, bytes], now: float
    ) -> dict[str, Any] | None:
        head = fields.get(raw_id)
        if head is None:
            return None
        return self._build(conversation_id, inputs, raw_id, head, fields.get(raw_id + b":s"),
                           fields.get(raw_id + b":r"), fields.get(raw_id + b":f"), now)

    def _build(
        self, conversation_id: str, inputs: dict[str, Any], raw_id: bytes, head: bytes,
        status_raw: bytes | None, state_raw: bytes | None, rating: bytes | None, now: float,
    ) -> dict[str, Any]:
        first = orjson.loads(head)
        state = orjson.loads(state_raw) if state_raw else {"answer": "", "updated_at": first["created_at"]}
        status = _text(status_raw) if status_raw else ANSWERING
        if status == ANSWERING and now - state["updated_at"] > self.stale_after:
            status = INTERRUPTED
        record: dict[str, Any] = {
            "id": _text(raw_id),
            "conversation_id": conversation_id,
            "inputs": dict(inputs),
            "query": first["query"],
            "answer": state["answer"],
            "feedback": {"rating": _text(rating)} if rating else None,
            "created_at": int(first["created_at"]),
            "status": status,
        }
        if state.get("truncated"):
            record["truncated"] = True
        if state.get("usage") is not None:
            record["usage"] = state["usage"]
        return record

    async def messages(
        self, scope: Scope, conversation_id: str, first_id: str | None, limit: int, *, now: float | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """One page of a conversation's messages, newest first, and whether older ones remain.

        ``first_id``: the oldest message of the previous page; this page holds
        the messages started before it.  ``now`` (default: the clock) decides
        which ``answering`` messages read as ``interrupted``.  Raises NotFound
        ``conversation_not_found``, or ``message_not_found`` for a ``first_id``
        not in the conversation.
        """
        _check_limit(limit)
        if not is_uuid(conversation_id):
            raise _not_found()
        if first_id is not None and not is_uuid(first_id):
            raise _message_not_found("first_id")
        reply = await self._messages(
            keys=self._keys(scope, conversation_id)[:3],
            args=[scope.caller, scope.user, first_id or "", limit + 1],
        )
        verdict = _text(reply[0])
        if verdict == "missing":
            raise _not_found()
        if verdict == "no_first":
            raise _message_not_found("first_id")
        now = time.time() if now is None else now
        inputs = orjson.loads(reply[1])
        ids, values = reply[2], reply[3]
        out = []
        for i, raw_id in enumerate(ids[:limit]):
            head, status, state, rating = values[4 * i: 4 * i + 4]
            if head is not None:
                out.append(self._build(conversation_id, inputs, raw_id, head, status, state, rating, now))
        return out, len(ids) > limit

    @staticmethod
    def _conversation(conversation_id: str, name: bytes, inputs: bytes, created_at: bytes,
                      updated_at: bytes) -> dict[str, Any]:
        return {
            "id": conversation_id,
            "name": _text(name),
            "inputs": orjson.loads(inputs),
            "status": "normal",
            "created_at": int(float(created_at)),
            "updated_at": int(float(updated_at)),
        }

    async def conversations(
        self, scope: Scope, last_id: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """One page of the scope's conversations, most recently active first, and whether more remain.

        ``last_id``: the last conversation of the previous page.  Raises NotFound
        ``conversation_not_found`` (param ``last_id``) when it is not one of this
        scope's live conversations.
        """
        _check_limit(limit)
        if last_id is not None and not is_uuid(last_id):
            raise NotFound("conversation not found", param="last_id", code="conversation_not_found")
        iid = scope.instance_id
        reply = await self._conversations(
            keys=[keys.scope_conversations(iid, scope.digest), keys.instance_conversations(iid),
                  keys.conversation_sizes(iid)],
            args=[scope.caller, scope.user, last_id or "", limit + 1, keys.conversation(iid, "")],
        )
        if _text(reply[0]) == "no_last":
            raise NotFound("conversation not found", param="last_id", code="conversation_not_found")
        rows = reply[1]
        page = [self._conversation(_text(cid), *rest) for cid, *rest in rows[:limit]]
        return page, len(rows) > limit

    # -- changes ---------------------------------------------------------------

    async def rename(
        self, scope: Scope, conversation_id: str, name: str, *, now: float | None = None
    ) -> dict[str, Any]:
        """Rename a conversation; returns it as :meth:`conversations` lists it.

        Runs of whitespace become one space (names show on one line in a list).
        Raises ValidationFailed (param ``name``) for an empty name, or
        ``name_too_long`` past ``MAX_NAME_CHARS``; NotFound ``conversation_not_found``.
        """
        name, _ = clip_utf8(" ".join(name.split()), 0)
        if not name:
            raise ValidationFailed("a conversation name cannot be empty", param="name")
        if len(name) > MAX_NAME_CHARS:
            raise ValidationFailed(f"a conversation name has at most {MAX_NAME_CHARS} characters",
                                   param="name", code="name_too_long")
        if not is_uuid(conversation_id):
            raise _not_found()
        now = time.time() if now is None else now
        reply = await self._rename(
            keys=self._keys(scope, conversation_id),
            args=[scope.caller, scope.user, conversation_id, name, repr(float(now)), self.ttl_ms,
                  keys.message_conversation(scope.instance_id, "")],
        )
        if _text(reply[0]) != "ok":
            raise _not_found()
        return self._conversation(conversation_id, *reply[1])

    async def delete(self, scope: Scope, conversation_id: str) -> None:
        """Delete a conversation and all its messages.  Raises NotFound ``conversation_not_found``."""
        if not is_uuid(conversation_id):
            raise _not_found()
        done = await self._delete(
            keys=self._keys(scope, conversation_id),
            args=[scope.caller, scope.user, conversation_id, keys.message_conversation(scope.instance_id, ""),
                  keys.address_conversations(scope.instance_id, "")],
        )
        if not done:
            raise _not_found()

    async def feedback(
        self, scope: Scope, message_id: str, rating: Literal["like", "dislike"] | None, *, now: float | None = None
    ) -> None:
        """Rate a message (``like``/``dislike``) or take the rating back (None).

        Raises ValidationFailed (param ``rating``), NotFound ``message_not_found``.
        """
        if rating is not None and rating not in RATINGS:
            raise ValidationFailed("rating must be 'like', 'dislike' or null", param="rating")
        if not is_uuid(message_id):
            raise _message_not_found()
        iid = scope.instance_id
        now = time.time() if now is None else now
        done = await self._feedback(
            keys=[keys.message_conversation(iid, message_id), keys.scope_conversations(iid, scope.digest),
                  keys.instance_conversations(iid), keys.conversation_sizes(iid)],
            args=[scope.caller, scope.user, message_id, rating or "", repr(float(now)), self.ttl_ms,
                  keys.message_conversation(iid, ""), keys.conversation(iid, ""),
                  keys.conversation_messages(iid, ""), keys.conversation_order(iid, "")],
        )
        if not done:
            raise _message_not_found()

    async def purge_instance(self, instance_id: str) -> int:
        """Delete every conversation of an instance, ``purge_batch`` per script call; returns how many."""
        total = 0
        while True:
            deleted, left = await self._purge(
                keys=[keys.instance_conversations(instance_id), keys.conversation_sizes(instance_id)],
                args=[self.purge_batch, keys.conversation(instance_id, ""),
                      keys.conversation_messages(instance_id, ""), keys.conversation_order(instance_id, ""),
                      keys.message_conversation(instance_id, ""), keys.scope_conversations(instance_id, ""),
                      keys.address_conversations(instance_id, "")],
            )
            total += int(deleted)
            if not int(left):
                return total

