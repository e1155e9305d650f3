"""The Dify chat-app API on every instance: conversations the relay remembers.

A Dify client sends only the new ``query`` and a ``conversation_id``; the relay
keeps the history (``relay.store.conversations``), builds the model's messages from it,
runs the turn on the instance's agents over the normal stream path, and
answers in Dify's shapes.  Two bases serve it:

* ``{relay}/api/chat/{instance_id}`` — the instance's chat URL is the Dify API base;
* ``{relay}/v1`` — the instance is the one of the caller key (``Authorization:
  Bearer irk_...``), as a Dify client expects from a base URL and a secret key.

Who may read what.  A conversation belongs to (instance, caller, ``user``):
the caller is the key presented, or "anonymous" on a public instance.  For an
anonymous caller the conversation id (a uuid4) is the credential: whoever holds
it and the ``user`` may continue, read, rename or delete that conversation, but
listing conversations needs a key.  Anything outside the caller's scope is the
same 404 as an id that never existed.  SECURITY.md has the whole threat model.

Turns.  A turn is checked and its history read first (nothing stored); the
question is stored once an agent has taken the request (the pick: a turn
refused before it, offline, at capacity, ``429``, ``404``, ``501``, Redis
trouble, leaves no trace), before the model's answer is read; while the answer
streams it is saved every ``conversation_checkpoint_interval`` seconds; when
the stream ends the answer is stored (``normal``), or what the caller saw
(``stopped`` when the caller left, ``error`` when the model failed).  Stopped
and errored answers are kept in the history the model sees next (a partial
answer is context the user saw); empty ones are not.  What is kept of an
answer for storage is bounded as it streams (``conversation_message_bytes``,
then marked ``truncated``): the caller still reads all of it, and the node
holds at most that much of it whatever the model sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Literal, cast

import orjson
from starlette.requests import Request
from starlette.responses import Response

import wire
from relay.bodies.dify import DifyChatRequest, DifyFeedback, DifyRename, DifyUser, DifyVariable
from relay.bodies.openai import ChatRequest
from relay.doors.transcription import audio_file, read_audio, transcribe
from relay.errors import ORJSONResponse, RelayError, Unauthorized, UpstreamError, ValidationFailed
from relay.inputs import SMALL_BODY_BYTES, bearer_token, client_ip, int_param, read_json, validate
from relay.services import Services
from relay.serving.admission import Admitted, ThenResponse
from relay.serving.claims import Claim
from relay.serving.inflight import Stream, cleanup_scope
from relay.serving.operations import answer_json, run_op
from relay.serving.request_limits import check_chat_request
from relay.serving.router import StreamRouter
from relay.serving.sessions import resolve_model
from relay.store.access import Caller
from relay.store.conversations import Bounds, ConversationStore, Turn
from relay.store.conversations import Scope as Owner

log = logging.getLogger("relay.dify")

#: Dify lists 20 items by default; the store takes at most 100 a page.
PAGE_DEFAULT, PAGE_MAX = 20, 100
ANONYMOUS = "anon"
Ending = Literal["normal", "stopped", "error"]
#: Largest unfinished event of the model's stream held while waiting for its end
#: (one chunk's JSON: far larger than any real one); past it the stream fails.
MAX_EVENT_BYTES = 4 * 1024 * 1024


# -- who is asking --------------------------------------------------------------


async def _instance_of(request: Request, services: Services) -> str:
    """The instance: from the path, or (``/v1``) from the caller key."""
    instance_id = request.path_params.get("instance_id")
    if instance_id is not None:
        return str(instance_id)
    keyed = await services.access.key_instance(bearer_token(request))
    if keyed is None:
        raise Unauthorized("the Dify API at /v1 needs a caller key of the instance (Authorization: Bearer irk_...): "
                           "the key says which instance; or use the instance's chat URL as the API base",
                           code="api_key_required")
    return keyed


async def _caller(request: Request, services: Services, *,
                  limited: bool = False) -> tuple[str, Caller, Admitted | None]:
    """(instance id, caller, admission): writes (turns, renames, deletions, feedback) count
    against the caller's rate limits like chat requests; reads (lists, parameters) do not."""
    instance_id = await _instance_of(request, services)
    if limited:
        admitted = await services.admission.admit(request, instance_id)
        return instance_id, admitted.caller, admitted
    caller = await services.access.authorize_caller(instance_id, bearer_token(request), client_ip(request))
    return instance_id, caller, None


def _owner(instance_id: str, caller: Caller, user: str) -> Owner:
    return Owner(instance_id, f"key:{caller.key_id}" if caller.key_id else ANONYMOUS, user)


def _user_param(request: Request) -> str:
    user = request.query_params.get("user") or ""
    return str(validate(DifyUser, {"user": user}).user)


# -- the instance's parameters ------------------------------------------------------


def checked_inputs(inputs: dict[str, Any], variables: list[dict[str, Any]], *, new: bool = True) -> dict[str, Any]:
    """The inputs a conversation runs with: each declared variable's value (or default), checked.

    Keys no variable declares are dropped, as Dify does: a client built for a
    richer app still works.  A conversation keeps the inputs it started with
    (``new=False``: a later turn need not repeat the required ones).
    """
    out: dict[str, Any] = {}
    for raw in variables:
        variable = DifyVariable.model_validate(raw)
        value = inputs.get(variable.key, variable.default)
        where = f"inputs.{variable.key}"
        if value is None or value == "":
            if variable.required and new:
                raise ValidationFailed(f"{where}: this input is required", param=where, code="input_required")
            continue
        if variable.type == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValidationFailed(f"{where}: must be a number", param=where)
        elif not isinstance(value, str):
            raise ValidationFailed(f"{where}: must be a string", param=where)
        elif variable.type == "select" and value not in (variable.options or []):
            raise ValidationFailed(f"{where}: must be one of {variable.options}", param=where)
        elif variable.max_length and len(value) > variable.max_length:
            raise ValidationFailed(f"{where}: at most {variable.max_length} characters", param=where)
        out[variable.key] = value
    return out


def model_messages(turn: Turn, query: str, variables: list[dict[str, Any]], *, max_messages: int,
                   max_chars: int) -> list[dict[str, Any]]:
    """The messages the model gets: the inputs, the newest earlier turns that fit, the query.

    The instance's limits (``RELAY_MAX_MESSAGES``, ``RELAY_MAX_CONTENT_CHARS``;
    0 = none) bound the whole request, so old turns are left out first.
    """
    head: list[dict[str, Any]] = []
    if turn.inputs:
        names = {v.get("key"): v.get("name") or v.get("key") for v in variables}
        lines = "\n".join(f"- {names.get(k, k)}: {v}" for k, v in turn.inputs.items())
        head.append({"role": "system", "content": f"Inputs for this conversation:\n{lines}"})
    tail = [{"role": "user", "content": query}]
    used_messages = len(head) + len(tail)
    used_chars = sum(len(m["content"]) for m in head + tail)
    earlier: list[dict[str, Any]] = []
    for past in reversed(turn.history):
        if not past.get("answer"):
            continue  # a question the model never answered (it failed, or the caller left at once)
        pair = [{"role": "user", "content": past.get("query") or ""}, {"role": "assistant", "content": past["answer"]}]
        size = sum(len(m["content"]) for m in pair)
        if (max_messages and used_messages + len(pair) > max_messages) or (max_chars and used_chars + size > max_chars):
            break
        earlier[:0] = pair
        used_messages += len(pair)
        used_chars += size
    return head + earlier + tail


def recent_history(settings: Any) -> tuple[int, int]:
    """How much history a turn reads, newest first: enough for :func:`model_messages`, no more.

    (bytes, answered messages), 0 = no bound.  A stored character takes at most
    6 bytes of JSON (``\\u0001``), and a record's fields around its text far less
    than 1 KiB: past ``6 * max_content_chars`` plus that per message, the
    turns read hold more characters than the model may be sent.
    """
    chars, count = settings.max_content_chars, settings.max_messages
    return (6 * chars + 1024 * count if chars else 0), (count // 2 + 1 if count else 0)


# -- chat-messages ------------------------------------------------------------------


def _event(payload: dict[str, Any]) -> bytes:
    return wire.sse_event(orjson.dumps(payload))


class DifyEvents:
    """The agent's OpenAI stream as Dify's events (an ``operations.BodyEncoder``), keeping the answer to store.

    At most ``keep_bytes`` (UTF-8) of the answer are kept, cut on a character
    boundary, and ``truncated`` says the rest was not (0: all of it): what
    this holds, and what each checkpoint costs, does not grow with the answer.
    """

    def __init__(self, turn: Turn, keep_bytes: int = 0):
        self.turn = turn
        self.base = {"task_id": turn.message_id, "id": turn.message_id, "message_id": turn.message_id,
                     "conversation_id": turn.conversation_id, "created_at": turn.created_at}
        self._buffer = bytearray()
        self._kept: list[str] = []
        self._limit = keep_bytes
        self._room = keep_bytes
        self.truncated = False
        self.usage: dict[str, Any] | None = None
        self.outcome: Ending | None = None  # "normal" | "error", once the stream ended; None: the caller left

    @property
    def answer(self) -> str:
        """What is kept of the answer (all of it unless ``truncated``)."""
        return "".join(self._kept)

    def kept(self) -> tuple[str, bool]:
        return self.answer, self.truncated

    def _keep(self, piece: str) -> None:
        if self.truncated:
            return
        if self._limit <= 0:
            self._kept.append(piece)
            return
        data = piece.encode("utf-8", "replace")
        if len(data) <= self._room:
            self._kept.append(piece)
            self._room -= len(data)
            return
        # Only the tail of the cut can be a partial sequence: "ignore" drops just that.
        self._kept.append(data[:self._room].decode("utf-8", "ignore"))
        self._room = 0
        self.truncated = True

    def data(self, payload: bytes) -> bytes:
        text: list[str] = []
        events = wire.iter_sse_data(self._buffer, payload)
        if len(self._buffer) > MAX_EVENT_BYTES:  # an event that never ends would be held whole
            raise UpstreamError(f"the model's stream carried an event over {MAX_EVENT_BYTES} bytes")
        for data in events:
            if data == b"[DONE]":
                continue
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                chunk = None
            if not isinstance(chunk, dict):
                raise UpstreamError("the model's stream carried a chunk that is not an object")
            if "error" in chunk:
                raise UpstreamError(f"model server: {wire.error_message(data) or 'error'}", code="upstream_error")
            if isinstance(chunk.get("usage"), dict):
                self.usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") if isinstance(choice, dict) and choice.get("index", 0) == 0 else None
                content = delta.get("content") if isinstance(delta, dict) else None
                if isinstance(content, str) and content:
                    text.append(content)
        if not text:
            return b""
        piece = "".join(text)
        self._keep(piece)
        return _event({"event": "message", **self.base, "answer": piece})

    def done(self) -> bytes:
        self.outcome = "normal"
        return _event({"event": "message_end", **self.base, "metadata": {"usage": self.usage or {}}})

    def error(self, error: RelayError) -> bytes:
        self.outcome = "error"
        return _event({"event": "error", **self.base, "status": error.status, "code": error.code,
                       "message": error.message, "error": error.body()["error"]})


class TurnSaver:
    """Keeps a turn alive in the store from the moment it is reserved: saves the answer so far
    every ``interval`` seconds (which also says its node is alive), and stores it once, at the end.

    Started right after ``reserve_turn``, before the model's first token: a model
    that thinks for a while must not make a live turn read as interrupted.
    ``answer()``: what is kept of the answer so far, and whether it was cut.
    """

    def __init__(self, store: ConversationStore, turn: Turn, interval: float,
                 answer: Callable[[], tuple[str, bool]] = lambda: ("", False)):
        self.store, self.turn, self.interval = store, turn, interval
        self.answer = answer
        self._task = asyncio.create_task(self._save())
        self._finished = False

    async def _save(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                text, truncated = self.answer()
                await self.store.checkpoint(self.turn, text, time.time(), truncated=truncated)
            except Exception as exc:  # Redis trouble: the final write will try again
                log.warning("turn %s: checkpoint failed (%s)", self.turn.message_id, exc)

    async def finish(self, answer: str, status: Ending, usage: Any = None, *, truncated: bool = False) -> None:
        """Store the answer (once: later calls do nothing) and stop saving."""
        if self._finished:
            return
        self._finished = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        try:
            await self.store.finish(self.turn, answer, status, time.time(), usage if isinstance(usage, dict) else None,
                                    truncated=truncated)
        except Exception as exc:  # the caller has its answer; the turn reads as interrupted later
            log.warning("turn %s: could not store the answer (%s)", self.turn.message_id, exc)


class ReservingRouter:
    """The router, storing the turn once an agent has taken the request.

    ``StreamRouter.open`` picks the agent (and takes the stream lease) and
    sends the request; only then is the prepared turn reserved and its saver
    started.  Everything the pick refuses (offline, at capacity, ``429``,
    ``404``, ``501``, Redis trouble) is refused before anything is stored.  A
    reservation refused now (the conversation filled, was deleted, the
    instance filled since the turn was prepared) closes the stream: the agent
    is told to stop, nothing is stored.
    """

    def __init__(self, router: StreamRouter, store: ConversationStore, turn: Turn, bounds: Bounds,
                 interval: float, answer: Callable[[], tuple[str, bool]] = lambda: ("", False)):
        self.router, self.store, self.turn, self.bounds = router, store, turn, bounds
        self.interval, self.answer = interval, answer
        #: Set once the turn is stored: from then on it is finished, whatever happens.
        self.saver: TurnSaver | None = None

    async def open(self, *args: Any, **kwargs: Any) -> Stream:
        stream = await self.router.open(*args, **kwargs)
        try:
            await self.store.reserve_turn(self.turn, time.time(), self.bounds)
        except BaseException:
            with cleanup_scope():
                await stream.close("the turn could not be stored")
            raise
        self.saver = TurnSaver(self.store, self.turn, self.interval, self.answer)
        return stream


async def chat_messages(request: Request, services: Services) -> Response:
    """``POST …/chat-messages``: one turn, ``blocking`` (one JSON body) or ``streaming`` (events).

    Every refusal comes before the turn is stored (a ``429`` the caller is told
    to retry must not leave a failed turn behind): access, rates, the body,
    the instance's parameters, the query against the request limits, the
    conversation's and the instance's bounds, the pick of an agent with its
    stream lease.  Only then is the question stored and the answer read.
    """
    settings = services.settings
    instance_id, caller, admitted = await _caller(request, services, limited=True)
    assert admitted is not None
    body = validate(DifyChatRequest, await read_json(request, settings.max_body_bytes, settings.max_json_depth))
    parameters = await services.registry.parameters(instance_id)
    if not parameters["conversations"]:
        raise ValidationFailed("this instance keeps no conversations (its owner turned them off): "
                               "use its OpenAI chat URL instead", code="conversations_disabled")
    inputs = checked_inputs(body.inputs, parameters["variables"], new=not body.conversation_id)
    streaming = body.response_mode == "streaming"

    def chat_for(messages: list[dict[str, Any]]) -> ChatRequest:
        chat = validate(ChatRequest, {"messages": messages, "stream": streaming,
                                      **({"stream_options": {"include_usage": True}} if streaming else {})})
        check_chat_request(chat, settings)
        return chat

    chat_for([{"role": "user", "content": body.query}])  # the query alone must fit the limits
    store: ConversationStore = services.conversations
    bounds = Bounds(settings.conversations_per_instance, settings.conversation_bytes_per_instance,
                    None if caller.key_id else client_ip(request), settings.conversation_bytes_per_caller)

    async def run(claim: Claim) -> Response:
        turn = await store.prepare_turn(_owner(instance_id, caller, body.user), body.conversation_id or None,
                                        body.query, inputs, time.time(), bounds, recent=recent_history(settings))
        reserving = ReservingRouter(services.router, store, turn, bounds, settings.conversation_checkpoint_interval)
        try:
            chat = chat_for(model_messages(turn, body.query, parameters["variables"],
                                           max_messages=settings.max_messages, max_chars=settings.max_content_chars))

            def body_for(models: tuple[str, ...]) -> dict[str, Any]:
                return chat.upstream_body(resolve_model(models, None))

            if not streaming:
                return await _blocking(request, services, reserving, body_for, claim)
            events = DifyEvents(turn, store.max_message_bytes)
            reserving.answer = events.kept
            answer = await run_op(cast(StreamRouter, reserving), instance_id, wire.OP_CHAT, body_for, settings,
                                  request.receive, stream=True, claim=claim, encoder=events)
            saver = reserving.saver
            assert saver is not None  # run_op returned: the stream was opened, the turn stored
            # Stored when the response ends, whatever ended it ("stopped": the caller left).
            return ThenResponse(answer, lambda: saver.finish(events.answer, events.outcome or "stopped", events.usage,
                                                             truncated=events.truncated))
        except BaseException as exc:
            if reserving.saver is not None:  # stored: the question stays, marked (the model never answered it)
                with cleanup_scope():
                    await reserving.saver.finish("", "stopped" if isinstance(exc, asyncio.CancelledError) else "error")
            raise

    # The stream lease is taken by the pick, with the agent: a refusal stores nothing.
    return await services.admission.leased(admitted, run)


async def _blocking(request: Request, services: Services, reserving: ReservingRouter, body_for: Any,
                    claim: Claim) -> Response:
    turn = reserving.turn
    answer = await run_op(cast(StreamRouter, reserving), turn.scope.instance_id, wire.OP_CHAT, body_for,
                          services.settings, request.receive, stream=False, claim=claim)
    saver = reserving.saver
    assert saver is not None  # run_op returned: the stream was opened, the turn stored
    if answer.status_code != 200:  # the caller left while the model worked
        await saver.finish("", "stopped")
        return answer
    completion = answer_json(answer)
    try:
        text = completion["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise UpstreamError("the model's answer has no message") from None
    usage = completion.get("usage") if isinstance(completion.get("usage"), dict) else None
    await saver.finish(str(text), "normal", usage)
    return ORJSONResponse({
        "event": "message", "task_id": turn.message_id, "id": turn.message_id, "message_id": turn.message_id,
        "conversation_id": turn.conversation_id, "mode": "chat", "answer": text,
        "metadata": {"usage": usage or {}}, "created_at": turn.created_at,
    })


# -- history, names, feedback, parameters -------------------------------------------------


async def list_messages(request: Request, services: Services) -> Response:
    """``GET …/messages?conversation_id=&first_id=&limit=&user=``: newest first."""
    instance_id, caller, _ = await _caller(request, services)
    params = request.query_params
    conversation_id = params.get("conversation_id") or ""
    if not conversation_id:
        raise ValidationFailed("conversation_id is required", param="conversation_id")
    limit = int_param(params, "limit", PAGE_DEFAULT, 1, PAGE_MAX)
    data, has_more = await services.conversations.messages(
        _owner(instance_id, caller, _user_param(request)), conversation_id, params.get("first_id") or None, limit)
    return ORJSONResponse({"limit": limit, "has_more": has_more, "data": data})


async def list_conversations(request: Request, services: Services) -> Response:
    """``GET …/conversations?last_id=&limit=&user=``: most recently active first; needs a key."""
    instance_id, caller, _ = await _caller(request, services)
    if caller.key_id is None:
        raise Unauthorized("listing conversations needs a caller key (Authorization: Bearer irk_...): without one, "
                           "a conversation id is the only way to a conversation", code="api_key_required")
    params = request.query_params
    limit = int_param(params, "limit", PAGE_DEFAULT, 1, PAGE_MAX)
    data, has_more = await services.conversations.conversations(
        _owner(instance_id, caller, _user_param(request)), params.get("last_id") or None, limit)
    return ORJSONResponse({"limit": limit, "has_more": has_more, "data": data})


async def rename_conversation(request: Request, services: Services) -> Response:
    """``POST …/conversations/{conversation_id}/name``: ``{name, user}``."""
    instance_id, caller, _ = await _caller(request, services, limited=True)
    body = validate(DifyRename, await read_json(request, SMALL_BODY_BYTES, services.settings.max_json_depth))
    renamed = await services.conversations.rename(
        _owner(instance_id, caller, body.user), request.path_params["conversation_id"], body.name)
    return ORJSONResponse({"result": "success", **renamed})


async def delete_conversation(request: Request, services: Services) -> Response:
    """``DELETE …/conversations/{conversation_id}``: ``user`` in the body (as the seed sends it) or the query."""
    instance_id, caller, _ = await _caller(request, services, limited=True)
    body = await read_json(request, SMALL_BODY_BYTES, services.settings.max_json_depth, empty={})
    user = body.get("user") if isinstance(body, dict) and body.get("user") else request.query_params.get("user")
    who = validate(DifyUser, {"user": user or ""})
    await services.conversations.delete(_owner(instance_id, caller, who.user),
                                                 request.path_params["conversation_id"])
    return ORJSONResponse({"result": "success"})


async def message_feedback(request: Request, services: Services) -> Response:
    """``POST …/messages/{message_id}/feedbacks``: ``{rating: like|dislike|null, user}``."""
    instance_id, caller, _ = await _caller(request, services, limited=True)
    body = validate(DifyFeedback, await read_json(request, SMALL_BODY_BYTES, services.settings.max_json_depth))
    await services.conversations.feedback(_owner(instance_id, caller, body.user),
                                                   request.path_params["message_id"], body.rating)
    return ORJSONResponse({"result": "success"})


async def parameters(request: Request, services: Services) -> Response:
    """``GET …/parameters``: the instance's ``introduction`` and ``variables``."""
    instance_id, _, _ = await _caller(request, services)
    found = await services.registry.parameters(instance_id)
    return ORJSONResponse({"introduction": found["introduction"], "variables": found["variables"]})


async def audio_to_text(request: Request, services: Services) -> Response:
    """``POST …/audio-to-text``: multipart ``file`` -> ``{"text"}``, by an agent that can ``transcribe``.

    The same operation as OpenAI's ``…/audio/transcriptions`` (``transcription.py``),
    which reads and checks the file: 15 MiB, mp3, mp4, mpeg, mpga, m4a, wav, webm.
    """
    _, _, admitted = await _caller(request, services, limited=True)
    assert admitted is not None
    async with read_audio(request, services) as form:
        if form is None:
            return Response(status_code=499)
        audio_file(form.filename, form.content_type)  # refused before a lease is taken
        return await services.admission.leased(admitted,
                            lambda claim: transcribe(request, services, admitted, claim, form.file, form.filename,
                                               form.content_type, {}, ""))


async def purge(request: Request, services: Services) -> Response:
    """``DELETE /api/instances/{id}/conversations`` (owner): forget every stored conversation."""
    instance_id = request.path_params["instance_id"]
    await services.registry.check_owner(instance_id, bearer_token(request))
    deleted = await services.conversations.purge_instance(instance_id)
    return ORJSONResponse({"deleted": deleted})

