"""The conversations of every instance in Redis (:class:`ConversationStore`), one script call an operation.

Each method checks what it is given, calls one script of
``relay/store/scripts/conversation_*.lua`` (checks and writes atomic, one
round trip, every key in the instance's slot) and turns the script's verdict
into the result or the error: what is stored and read back is in
``records.py``, the bounds and their errors in ``bounds.py``, the pages of
the two lists in ``paging.py``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from redis.asyncio import Redis

from relay.bodies.dify import MAX_NAME_CHARS
from relay.errors import ValidationFailed
from relay.store import keys
from relay.store.cluster import ReachingScript
from relay.store.conversations import paging, records
from relay.store.conversations.bounds import NO_BOUNDS, Bounds, check_sizes, refusal
from relay.store.conversations.records import ANSWERING, FINAL_STATUSES, RATINGS, clip_utf8, is_uuid
from relay.store.conversations.scope import Scope, message_not_found, not_found
from relay.store.scripts import script


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


class ConversationStore:
    """Conversations of every instance, in Redis; the bounds are those of ``bounds.py``.

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
        # Every script reaches its undeclared keys before it writes (see conversation_reach.lua):
        # on a cluster, sent again while their slot migrates.
        self._start = ReachingScript(redis, script("conversation_turn"))
        self._checkpoint = ReachingScript(redis, script("conversation_checkpoint"))
        self._finish = ReachingScript(redis, script("conversation_finish"))
        self._messages = ReachingScript(redis, script("conversation_messages"))
        self._conversations = ReachingScript(redis, script("conversation_list"))
        self._rename = ReachingScript(redis, script("conversation_rename"))
        self._delete = ReachingScript(redis, script("conversation_delete"))
        self._feedback = ReachingScript(redis, script("conversation_feedback"))
        self._purge = ReachingScript(redis, script("conversation_purge"))

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
        query, _ = clip_utf8(query, 0)  # only made encodable; its size is checked next
        create = conversation_id is None
        check_sizes(query, inputs if create else None, self.max_message_bytes)
        if conversation_id is None:
            conversation_id = str(uuid.uuid4())
        elif not is_uuid(conversation_id):
            raise not_found()
        return Turn(conversation_id, str(uuid.uuid4()), int(now), dict(inputs) if create else {}, [], scope,
                    create, records.default_name(query) if create else "", query)

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
                records.message_head(turn.query, now), records.unanswered_state(now),
                "1" if create else "0", turn.name, orjson.dumps(turn.inputs) if create else b"{}", scope.digest,
                mode, bounds.conversations, bounds.bytes, "1" if by_address else "0", *recent,
                bounds.address_digest, bounds.identity(scope), bounds.caller_bytes,
            ],
        )
        verdict = records.text(reply[0])
        if verdict == "missing":
            raise not_found()
        refused = refusal(verdict, bounds, max_messages=self.max_messages, max_conversations=self.max_conversations)
        if refused is not None:
            raise refused
        if verdict != "ok":  # "taken": a uuid4 collision, never expected
            raise RuntimeError(f"could not reserve conversation {conversation_id}: {verdict}")
        if mode == "reserve":
            return turn
        stored_inputs = orjson.loads(reply[1])
        fields = dict(zip(reply[3][::2], reply[3][1::2], strict=True))
        history = []
        for raw_id in reply[2]:
            record = records.message_from_fields(conversation_id, stored_inputs, raw_id, fields, now,
                                                 self.stale_after)
            if record is not None and record["status"] != ANSWERING:
                history.append(record)
        return Turn(conversation_id, turn.message_id, turn.created_at, stored_inputs, history, scope, create,
                    turn.name, turn.query)

    def _answer(self, answer: str, now: float, usage: dict[str, Any] | None = None,
                truncated: bool = False) -> bytes:
        """An answer as stored, cut to ``max_message_bytes``."""
        return records.answer_state(answer, now, self.max_message_bytes, usage, truncated)

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
            args=[turn.message_id, self._answer(answer_so_far, now, truncated=truncated), turn.conversation_id],
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
            args=[turn.conversation_id, turn.message_id, status, self._answer(answer, now, usage, truncated),
                  repr(float(now)), self.ttl_ms, keys.message_conversation(turn.scope.instance_id, "")],
        )
        return bool(reply)

    # -- reading ---------------------------------------------------------------

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
        paging.check_limit(limit)
        if not is_uuid(conversation_id):
            raise not_found()
        if first_id is not None and not is_uuid(first_id):
            raise message_not_found("first_id")
        reply = await self._messages(
            keys=self._keys(scope, conversation_id)[:3],
            args=[scope.caller, scope.user, first_id or "", limit + 1],
        )
        verdict = records.text(reply[0])
        if verdict == "missing":
            raise not_found()
        if verdict == "no_first":
            raise message_not_found("first_id")
        now = time.time() if now is None else now
        return paging.message_page(conversation_id, reply[1], reply[2], reply[3], limit, now, self.stale_after)

    async def conversations(
        self, scope: Scope, last_id: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """One page of the scope's conversations, most recently active first, and whether more remain.

        ``last_id``: the last conversation of the previous page.  Raises NotFound
        ``conversation_not_found`` (param ``last_id``) when it is not one of this
        scope's live conversations.
        """
        paging.check_limit(limit)
        if last_id is not None and not is_uuid(last_id):
            raise not_found("last_id")
        iid = scope.instance_id
        reply = await self._conversations(
            keys=[keys.scope_conversations(iid, scope.digest), keys.instance_conversations(iid),
                  keys.conversation_sizes(iid)],
            args=[scope.caller, scope.user, last_id or "", limit + 1, keys.conversation(iid, "")],
        )
        if records.text(reply[0]) == "no_last":
            raise not_found("last_id")
        return paging.conversation_page(reply[1], limit)

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
            raise not_found()
        now = time.time() if now is None else now
        reply = await self._rename(
            keys=self._keys(scope, conversation_id),
            args=[scope.caller, scope.user, conversation_id, name, repr(float(now)), self.ttl_ms,
                  keys.message_conversation(scope.instance_id, "")],
        )
        if records.text(reply[0]) != "ok":
            raise not_found()
        return records.conversation(conversation_id, *reply[1])

    async def delete(self, scope: Scope, conversation_id: str) -> None:
        """Delete a conversation and all its messages.  Raises NotFound ``conversation_not_found``."""
        if not is_uuid(conversation_id):
            raise not_found()
        done = await self._delete(
            keys=self._keys(scope, conversation_id),
            args=[scope.caller, scope.user, conversation_id, keys.message_conversation(scope.instance_id, ""),
                  keys.address_conversations(scope.instance_id, "")],
        )
        if not done:
            raise not_found()

    async def feedback(
        self, scope: Scope, message_id: str, rating: Literal["like", "dislike"] | None, *, now: float | None = None
    ) -> None:
        """Rate a message (``like``/``dislike``) or take the rating back (None).

        Raises ValidationFailed (param ``rating``), NotFound ``message_not_found``.
        """
        if rating is not None and rating not in RATINGS:
            raise ValidationFailed("rating must be 'like', 'dislike' or null", param="rating")
        if not is_uuid(message_id):
            raise message_not_found()
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
            raise message_not_found()

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

