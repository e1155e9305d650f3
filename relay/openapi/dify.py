"""The Dify chat-app API's operations, per instance and at /v1, and the owner's purge of its conversations."""

from __future__ import annotations

from typing import Any, NamedTuple

from pydantic import BaseModel

from relay.bodies.dify import (
    ConversationsPurged,
    DifyAnswer,
    DifyChatRequest,
    DifyConversationPage,
    DifyErrorEvent,
    DifyFeedback,
    DifyMessageEndEvent,
    DifyMessageEvent,
    DifyMessagePage,
    DifyParameters,
    DifyRename,
    DifyRenamed,
    DifyResult,
    DifyUser,
)
from relay.bodies.openai import Transcription
from relay.doors.dify import PAGE_DEFAULT, PAGE_MAX
from relay.openapi.common import (
    AGENT_ERRORS,
    CALLER,
    INSTANCE_ID,
    OWNER,
    Operation,
    error_responses,
    json_content,
    ref,
    request_body,
)
from relay.openapi.transcription import (
    TRANSCRIBE_ERRORS,
    TRANSCRIBE_MEANING,
    TRANSCRIBE_NOTE,
    audio_form,
    multipart_body,
)

USER_SCHEMA: dict[str, Any] = DifyUser.model_json_schema()["properties"]["user"]
#: Ids the conversation store hands out: canonical uuids; any other string is simply not found.
UUID: dict[str, Any] = {"type": "string", "format": "uuid"}
DIFY_USER = {"name": "user", "in": "query", "required": True, "schema": USER_SCHEMA,
             "description": "The caller's own name for its end user: conversations are kept per user"}
DIFY_LIMIT = {"name": "limit", "in": "query", "allowEmptyValue": True,
              "schema": {"type": "integer", "minimum": 1, "maximum": PAGE_MAX, "default": PAGE_DEFAULT}}
CONVERSATION_ID = {"name": "conversation_id", "in": "path", "required": True, "schema": UUID,
                   "description": "A conversation id, as chat-messages answered it"}
MESSAGE_ID = {"name": "message_id", "in": "path", "required": True, "schema": UUID,
              "description": "A message id (``message_id`` of a chat-messages answer)"}

#: One Dify event: ``data`` is one JSON object, its ``event`` saying which.
DIFY_SSE_EVENT = {
    "type": "object",
    "properties": {
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"oneOf": [ref(DifyMessageEvent), ref(DifyMessageEndEvent),
                                             ref(DifyErrorEvent)]},
                 "description": "A DifyMessageEvent, DifyMessageEndEvent or DifyErrorEvent object"},
    },
    "required": ["data"],
}

#: ``DELETE …/conversations/{id}`` reads ``user`` from a JSON object body when it is
#: truthy (as Python reads JSON), else from the query; any other body is ignored.
_FALSY: list[Any] = [None, False, 0, "", [], {}]
DIFY_DELETE_BODY: dict[str, Any] = {
    "description": "Optional. A JSON object whose `user` names the end user (Dify's own form); anything else, "
                   "a `user` that is null, false, 0, empty or absent included, leaves `user` to the query.",
    "anyOf": [
        {"not": {"type": "object"}},
        {"type": "object", "properties": {"user": {"anyOf": [{"enum": _FALSY}, USER_SCHEMA]}}},
    ],
}

DIFY_SCOPE = (
    "A conversation belongs to the instance, the caller (the caller key presented, or anonymous on a public "
    "instance) and `user`; anything outside that scope is the same 404 as an id that never existed."
)
DIFY_404 = ("Instance not found; or conversation_not_found / message_not_found: the id is not one of this "
            "caller's and user's (or it expired)")
DIFY_CHAT_422 = (
    "Invalid parameters (the error names the field), or: conversations_disabled (the owner turned conversations "
    "off), input_required (a variable the instance declares is missing from `inputs`), message_too_large (the "
    "query past RELAY_CONVERSATION_MESSAGE_BYTES), inputs_too_large, conversation_full (the conversation holds "
    "RELAY_CONVERSATION_MAX_MESSAGES messages), too_many_conversations (this user, or without a caller key this "
    "client address, already keeps RELAY_CONVERSATIONS_PER_USER), caller_conversations_full (this caller's "
    "conversations hold RELAY_CONVERSATION_BYTES_PER_CALLER), instance_conversations_full (the instance keeps "
    "RELAY_CONVERSATIONS_PER_INSTANCE conversations or RELAY_CONVERSATION_BYTES_PER_INSTANCE bytes), "
    "json_too_deep, too_many_messages / content_too_large (the relay's request limits), or what "
    "the model server refused"
)
V1_401 = ("No caller key, or not a known one (api_key_required): on /v1 the caller key says which instance")


class DifyOperations(NamedTuple):
    """The operations of the Dify API at one base, one per route (``relay.routes.dify_endpoints`` gives their paths)."""

    chat: Operation
    messages: Operation
    feedback: Operation
    conversations: Operation
    rename: Operation
    delete: Operation
    parameters: Operation
    audio: Operation


def dify_operations(base: str) -> DifyOperations:
    """The Dify chat-app API at ``base``: per instance (its chat URL) or ``/v1`` (the caller key's instance)."""
    per_instance = base != "/v1"
    params: list[dict[str, Any]] = [INSTANCE_ID] if per_instance else []
    security = CALLER if per_instance else [{"callerKey": []}]
    prefix = "dify" if per_instance else "v1Dify"
    where = ("The instance is the one in the path." if per_instance else
             "The instance is the caller key's: send it as `Authorization: Bearer irk_...` (401 "
             "api_key_required without one).")
    meaning: dict[int, str] = {404: "Instance not found"}
    if not per_instance:
        meaning[401] = V1_401

    def op(summary: str, operation_id: str, answer: dict[str, Any], statuses: tuple[int, ...],
           extra: dict[str, Any] | None = None, more: str = "", tags: str = "dify",
           errors: dict[int, str] | None = None) -> dict[str, Any]:
        # On /v1 the key names its own instance, so it is never one "not for this instance" (403).
        statuses = statuses if per_instance else tuple(s for s in statuses if s != 403)
        return {"summary": summary, "operationId": prefix + operation_id, "tags": [tags], "security": security,
                "description": " ".join(filter(None, [where, more])), **(extra or {}),
                "responses": {**answer, **error_responses(*statuses, meaning={**meaning, **(errors or {})})}}

    def ok(description: str, model: type[BaseModel]) -> dict[str, Any]:
        return {"200": {"description": description, "content": json_content(model)}}

    # Writes (a small JSON body, at most 16 KiB) count against the caller's rate limits like turns; reads do not.
    small = (400, 401, 403, 404, 413, 422, 429, 503)
    reads = (400, 401, 403, 404, 422, 503)
    chat = op(
        "Dify: send a message (one turn of a conversation the relay keeps)", "ChatMessages",
        {"200": {
            "description": "``blocking`` (the default): one JSON answer. ``streaming``: Server-Sent Events, each "
                           "``data: {event}``: ``message`` events with the answer's pieces, then ``message_end``; "
                           "a failure after the first event ends the stream with an ``error`` event instead. "
                           "Never ``data: [DONE]``.",
            "content": {"application/json": {"schema": ref(DifyAnswer)},
                        "text/event-stream": {"schema": DIFY_SSE_EVENT}},
        }},
        AGENT_ERRORS, {"parameters": params, "requestBody": request_body(DifyChatRequest)},
        "Without `conversation_id` a new conversation starts (named after the query); with one, the turn continues "
        "it, the model seeing its earlier turns. `inputs`: the values of the variables the instance declares (GET "
        "parameters), checked; others are dropped, and a continued conversation keeps the inputs it started "
        "with. " + DIFY_SCOPE, errors={404: DIFY_404, 422: DIFY_CHAT_422})
    messages = op(
        "Dify: a conversation's messages, newest first", "Messages",
        ok("One page", DifyMessagePage), reads,
        {"parameters": [*params,
                        {"name": "conversation_id", "in": "query", "required": True, "schema": UUID},
                        {"name": "first_id", "in": "query", "allowEmptyValue": True, "schema": UUID,
                         "description": "The oldest message id of the previous page (message_not_found if it "
                                        "is not in the conversation)"},
                        DIFY_LIMIT, DIFY_USER]},
        DIFY_SCOPE, errors={404: DIFY_404})
    conversations = op(
        "Dify: the user's conversations, most recently active first (needs a caller key)", "Conversations",
        ok("One page", DifyConversationPage), reads,
        {"parameters": [*params,
                        {"name": "last_id", "in": "query", "allowEmptyValue": True, "schema": UUID,
                         "description": "The last conversation id of the previous page (conversation_not_found "
                                        "if it is not one of this user's)"},
                        DIFY_LIMIT, DIFY_USER]},
        "Without a caller key, 401 api_key_required: an anonymous caller reaches a conversation by its id only.",
        errors={404: DIFY_404, 401: "No caller key (api_key_required): listing needs one; or a private "
                                     "instance's key is missing or unknown"})
    rename = op(
        "Dify: rename a conversation", "RenameConversation", ok("The conversation, renamed", DifyRenamed), small,
        {"parameters": [*params, CONVERSATION_ID], "requestBody": request_body(DifyRename)}, DIFY_SCOPE,
        errors={404: DIFY_404})
    delete = op(
        "Dify: delete a conversation and its messages", "DeleteConversation", ok("Deleted", DifyResult), small,
        {"parameters": [*params, CONVERSATION_ID,
                        {**DIFY_USER, "required": False,
                         "description": "The end user, when the body does not name it"}],
         "requestBody": {"required": False, "content": {"application/json": {"schema": DIFY_DELETE_BODY}}}},
        "`user` in the body (as Dify sends it) or in the query: one of them is required (422 otherwise), the "
        "body's wins. " + DIFY_SCOPE, errors={404: DIFY_404})
    feedback = op(
        "Dify: rate an answer (like, dislike; null takes the rating back)", "MessageFeedback",
        ok("Rated", DifyResult), small,
        {"parameters": [*params, MESSAGE_ID], "requestBody": request_body(DifyFeedback)}, DIFY_SCOPE,
        errors={404: DIFY_404})
    parameters = op(
        "Dify: the opening statement and the inputs a conversation takes", "Parameters",
        ok("The instance's parameters (the owner's, else what its agent suggested)", DifyParameters),
        (400, 401, 403, 404, 503), {"parameters": params})
    audio = op(
        "Dify: speech to text", "AudioToText", ok("The transcript", Transcription), TRANSCRIBE_ERRORS,
        {"parameters": params, "requestBody": multipart_body(audio_form(model="ignored"))},
        "The operation of …/audio/transcriptions, with the agent's default model. " + TRANSCRIBE_NOTE,
        tags="audio", errors={k: v for k, v in TRANSCRIBE_MEANING.items() if k != 422} | {
            422: "No `file` part, or an empty file; or what the model server refused"})
    return DifyOperations(chat=chat, messages=messages, feedback=feedback, conversations=conversations,
                          rename=rename, delete=delete, parameters=parameters, audio=audio)


PURGE_CONVERSATIONS: Operation = {
    "summary": "Delete every stored conversation of the instance (owner)",
    "operationId": "purgeConversations", "tags": ["owner"], "security": OWNER,
    "parameters": [INSTANCE_ID],
    "responses": {"200": {"description": "How many were deleted", "content": json_content(ConversationsPurged)},
                  **error_responses(400, 401, 403, 404, 503)},
}
