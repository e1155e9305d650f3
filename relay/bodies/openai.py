"""OpenAI's bodies: chat completions, images, transcriptions, model lists, and its error body.

Validation errors become 422 with the offending field named (``relay.inputs.validate``);
unknown OpenAI fields (``stop``, ``seed``, ``tools``, ``response_format`` ...)
are kept and forwarded to the model untouched.  The answers' models exist for
the OpenAPI document (the model's own bodies are forwarded as they come).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

Role = Literal["system", "user", "assistant", "tool", "developer", "function"]


#: What ``ContentPart``'s validator checks, said in its JSON schema too: a part of
#: type ``text`` carries a ``text`` string; a part of any other type may have
#: none, or ``null`` (an ``image_url`` part has no text).
_TEXT_PART_RULE: dict[str, Any] = {
    "if": {"properties": {"type": {"const": "text"}}, "required": ["type"]},
    "then": {"properties": {"text": {"type": "string"}}, "required": ["text"]},
}


class ContentPart(BaseModel):
    """One part of a multi-part message (``text``, ``image_url``, ``input_audio`` ...)."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_TEXT_PART_RULE)
    type: str = Field(min_length=1)
    text: str | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs a 'text' string")
        return self

    @model_validator(mode="before")
    @classmethod
    def _image_url_as_object(cls, data: Any) -> Any:
        # Some clients (the Swarm Cloud examples among them) send the URL as a
        # bare string; OpenAI servers want {"url": ...}: the model gets that.
        if isinstance(data, dict) and data.get("type") == "image_url" and isinstance(data.get("image_url"), str):
            return {**data, "image_url": {"url": data["image_url"]}}
        return data


def _content_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "parts"
    return "null" if value is None else None


#: A message's content: a string, a list of parts, or null (an assistant turn
#: with tool_calls).  Tagged by its JSON type, so that a bad part is reported
#: as itself (``messages.0.content.parts.1``) rather than as "not a string".
Content = Annotated[
    Annotated[str, Tag("string")] | Annotated[list[ContentPart], Tag("parts")] | Annotated[None, Tag("null")],
    Discriminator(_content_kind, custom_error_type="content_type",
                  custom_error_message="content must be a string, a list of parts, or null"),
]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, tool_call_id ...
    role: Role
    content: Content = None


class StreamOptions(BaseModel):
    """``stream_options`` (OpenAI): ``include_usage`` adds a last chunk with ``usage`` and no choices."""

    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = Field(default=None, strict=True)


#: Token counts: JSON Schema counts ``2.0`` as an integer, and so does the relay
#: (it passes on ``2``).  At most a signed 64-bit integer: the relay's JSON
#: parser reads larger numbers as floats, and the agent's encoder has no bigger ints.
_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
MAX_COUNT = 2**63 - 1


def integral(value: Any) -> Any:
    """A number JSON Schema counts as an integer (``2.0``) as that int; anything else as it is."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_COUNT:
        return int(value)
    return value


def _chat_request_schema(schema: dict[str, Any]) -> None:
    # ``max_completion_tokens`` stays an extra field (forwarded as sent), but the
    # relay checks it like ``max_tokens`` (relay.serving.request_limits): say so in the document.
    schema["properties"]["max_completion_tokens"] = {
        "anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_COUNT}, {"type": "null"}],
        "title": "Max Completion Tokens",
        "description": "Like max_tokens (OpenAI's newer name); forwarded to the model as sent",
    }


class ChatRequest(BaseModel):
    """An OpenAI chat completion request, with the relay's defaults."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_chat_request_schema)

    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    temperature: float = Field(default=0.7, ge=0, le=2, strict=True)
    top_p: float | None = Field(default=None, ge=0, le=1, strict=True)
    max_tokens: int = Field(default=2000, ge=1, le=MAX_COUNT, strict=True)
    #: Absent: the door decides (``stream_default``), since Second Me's callers
    #: expect SSE and OpenAI's expect one JSON body for the same omission.
    stream: bool | None = Field(default=None, strict=True)
    metadata: dict[str, Any] | None = None
    stream_options: StreamOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _integral_token_counts(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in _TOKEN_FIELDS:
                value = data.get(name)
                whole = integral(value)
                if whole is not value:
                    data = {**data, name: whole}
        return data

    def stream_default(self, stream: bool) -> None:
        """Fill in ``stream`` when the caller left it out."""
        if self.stream is None:
            self.stream = stream

    def upstream_body(self, model: str) -> dict[str, Any]:
        """The body the agent receives: everything the caller sent, defaults filled."""
        # Only what the caller set (explicit nulls included: an assistant turn
        # with tool_calls carries "content": null), then the relay's defaults.
        body = self.model_dump(mode="json", exclude_unset=True)
        for name in ("temperature", "max_tokens"):
            body.setdefault(name, getattr(self, name))
        body["stream"] = bool(self.stream)  # decided by the door when left out (or sent as null)
        body["model"] = model
        if self.metadata is not None:
            body["metadata"] = self.metadata
        return body


class ImageRequest(BaseModel):
    """An OpenAI ``/images/generations`` request; fields the relay does not know pass through."""

    model_config = ConfigDict(extra="allow")
    prompt: str = Field(min_length=1, max_length=32_000)
    model: str | None = None
    #: JSON Schema counts ``2.0`` as an integer, so the relay does too (and passes on ``2``).
    n: int = Field(default=1, ge=1, le=10, strict=True)
    size: str | None = Field(default=None, pattern=r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$")
    response_format: Literal["url", "b64_json"] | None = None

    @field_validator("n", mode="before")
    @classmethod
    def _integral_n(cls, value: Any) -> Any:
        return integral(value)

    def upstream_body(self, model: str) -> dict[str, Any]:
        body = self.model_dump(mode="json", exclude_unset=True)
        body["model"] = model
        return body


# -- bodies the relay answers with, for the OpenAPI document -----------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ChatCompletionChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: int
    message: dict[str, Any]
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    """A ``stream: false`` answer (the model's own body, forwarded untouched)."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: dict[str, Any] | None = None


class ModelPage(ModelList):
    """``GET /v1/models``: a page of models (a caller key's instance: one page with all of them)."""

    has_more: bool
    #: Pass as ``after`` for the next page; null on the last one.
    next_cursor: str | None


# -- the global doors' bodies, as the document states them -------------------------
#
# The handlers validate with ChatRequest, ImageRequest and SwiftChatImage once
# ``targets.resolve`` has read the instance out of ``model``/``modelId``.  The
# document states both steps as one schema: the same model with that field
# required, since without a caller key a missing one is 422.  Subclasses, so
# every other field is the validating model's own.


class GlobalChatRequest(ChatRequest):
    """``POST /v1/chat/completions``: a ChatRequest whose ``model`` names the instance."""

    model: str = Field(
        min_length=1,
        description="'<instance_id>' or '<instance_id>/<model>'; with a caller key as the API key, also a "
                    "model of the key's instance, or left out for its default model")
    stream: bool | None = Field(default=False, strict=True,
                                description="Left out or null: one chat.completion (OpenAI's default)")


class GlobalImageRequest(ImageRequest):
    """``POST /v1/images/generations``: an ImageRequest whose ``model`` names the instance."""

    model: str = Field(
        min_length=1,
        description="'<instance_id>' or '<instance_id>/<image model>'; with a caller key as the API key, "
                    "also a model of the key's instance, or left out for its default image model")


class ImageData(BaseModel):
    """One generated image: inline, or (``response_format: url``) as a ``data:`` URL."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"anyOf": [
        {"properties": {name: {"type": "string"}}, "required": [name]} for name in ("b64_json", "url")]})
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    """OpenAI's ImagesResponse, as the agent's model server made it."""

    model_config = ConfigDict(extra="allow")
    created: int
    data: list[ImageData]


class Transcription(BaseModel):
    """A ``json`` transcription (``verbose_json`` adds the model's ``language``, ``duration``, ``segments`` ...)."""

    model_config = ConfigDict(extra="allow")
    text: str
