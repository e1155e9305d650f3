"""What one chat request may contain, once validated: :func:`check_chat_request`.

The number of messages, the total content size and ``max_tokens``
(``RELAY_MAX_MESSAGES``, ``RELAY_MAX_CONTENT_CHARS``, ``RELAY_MAX_TOKENS_CAP``):
422 naming the limit, no Redis.  A limit set to 0 is off.  What one agent may
send is in ``agent_limits``; rates (``relay.store.rates``) and stream leases
(``relay.store.leases``) are kept in Redis.
"""

from __future__ import annotations

from relay.bodies.openai import ChatRequest
from relay.errors import ValidationFailed
from relay.settings import RelaySettings

# -- shape of one request --------------------------------------------------------------


def content_chars(chat: ChatRequest) -> int:
    """Characters of text the caller sent: string contents and every string inside parts."""
    total = 0
    for message in chat.messages:
        content = message.content
        if isinstance(content, str):
            total += len(content)
        elif content is not None:
            for part in content:
                total += len(part.text or "") + _strings_size(part.model_extra)
    return total


def _strings_size(value: object) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_strings_size(v) for v in value.values())
    if isinstance(value, list):
        return sum(_strings_size(v) for v in value)
    return 0


def check_chat_request(chat: ChatRequest, settings: RelaySettings) -> None:
    """Raise 422 when a valid request is larger than this relay accepts.

    A ``max_tokens`` the caller did not send (the relay's default of 2000) is
    lowered to the cap rather than refused: the caller made no choice to refuse.
    """
    if settings.max_messages and len(chat.messages) > settings.max_messages:
        raise ValidationFailed(
            f"too many messages: {len(chat.messages)} > {settings.max_messages}",
            param="messages", code="too_many_messages",
        )
    if settings.max_content_chars:
        size = content_chars(chat)
        if size > settings.max_content_chars:
            raise ValidationFailed(
                f"messages carry {size} characters of content; the limit is {settings.max_content_chars}",
                param="messages", code="content_too_large",
            )
    cap = settings.max_tokens_cap
    if cap and "max_tokens" not in chat.model_fields_set and chat.max_tokens > cap:
        chat.max_tokens = cap  # our default, not the caller's choice: lower it
    extra = chat.model_extra or {}
    # The schema promises both are positive integers, with or without a cap.
    asked = (("max_tokens", chat.max_tokens), ("max_completion_tokens", extra.get("max_completion_tokens")))
    for name, value in asked:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValidationFailed(f"{name} must be a positive integer", param=name)
        if cap and value > cap:
            raise ValidationFailed(f"{name} {value} exceeds this relay's cap of {cap}",
                                   param=name, code="max_tokens_too_large")
