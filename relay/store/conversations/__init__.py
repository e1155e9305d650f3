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

Every operation is one Lua script (one round trip, checks and writes atomic:
``relay/store/scripts/conversation_*.lua``), and every key an instance's
conversations use shares one Redis Cluster hash tag (see ``relay/store/keys.py``
for the layout), so each script touches one slot.

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

Bounds (per user, per address, per caller, per instance): see ``bounds.py``.

The modules: ``store.py`` (:class:`ConversationStore`, :class:`Turn`),
``scope.py`` (:class:`Scope`, the 404s), ``bounds.py`` (:class:`Bounds`, the
checks and errors of every bound), ``records.py`` (what is stored, and the
records read back), ``paging.py`` (the pages of the two lists).
"""

from __future__ import annotations

from relay.store.conversations.bounds import NO_BOUNDS, Bounds
from relay.store.conversations.records import clip_utf8, default_name
from relay.store.conversations.scope import Scope
from relay.store.conversations.store import ConversationStore, Turn

__all__ = [
    "NO_BOUNDS",
    "Bounds",
    "ConversationStore",
    "Scope",
    "Turn",
    "clip_utf8",
    "default_name",
]
