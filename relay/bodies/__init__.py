"""Request and response bodies of the HTTP API (pydantic).

Validation errors become 422 with the offending field named (see api.py);
unknown OpenAI fields (``stop``, ``seed``, ``tools``, ``response_format`` ...)
are kept and forwarded to the model untouched.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from relay.store.conversations import MAX_NAME_CHARS

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


def _chat_request_schema(schema: dict[str, Any]) -> None:
    # ``max_completion_tokens`` stays an extra field (forwarded as sent), but the
    # relay checks it like ``max_tokens`` (relay.serving.limits): say so in the document.
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
                if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_COUNT:
                    data = {**data, name: int(value)}
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
        if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_COUNT:
            return int(value)
        return value

    def upstream_body(self, model: str) -> dict[str, Any]:
        body = self.model_dump(mode="json", exclude_unset=True)
        body["model"] = model
        return body


#: Largest side SwiftChat may ask for (its menu offers 512, 1024, 2048).
MAX_SIDE = 4096
#: A side written as a string, as the app sends it: ASCII digits for 1 to
#: ``MAX_SIDE`` (leading zeros allowed).  The validator and the document use
#: this one pattern, so they cannot disagree about ``" 512"`` or ``"٣"``.
SIDE_DIGITS = r"0*(?:[1-9][0-9]{0,2}|[1-3][0-9]{3}|40[0-8][0-9]|409[0-6])"
_SIDE_DIGITS = re.compile(SIDE_DIGITS)
Side = Annotated[
    int,
    Field(ge=1, le=MAX_SIDE, strict=True),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_SIDE},
                              {"type": "string", "pattern": f"^{SIDE_DIGITS}$"}],
                    "description": f"Pixels, 1 to {MAX_SIDE}: a number or a string of digits"}),
]


class SwiftChatImage(BaseModel):
    """``POST /api/image``; the app sends ``width`` and ``height`` as strings."""

    model_config = ConfigDict(extra="allow")
    prompt: str = Field(min_length=1, max_length=32_000)
    modelId: str = ""
    region: str | None = None
    width: Side = 1024
    height: Side = 1024
    #: Editing an image: the handler refuses a non-empty list (422 unsupported_content).
    refImages: list[Any] | None = Field(
        default=None, json_schema_extra={"maxItems": 0, "description": "Image editing is not supported: "
                                         "a non-empty list is refused (422 unsupported_content)"})

    @field_validator("width", "height", mode="before")
    @classmethod
    def _digits(cls, value: Any) -> Any:
        if isinstance(value, str) and _SIDE_DIGITS.fullmatch(value):
            return int(value)
        if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_COUNT:
            return int(value)
        return value  # strict from here on: a bool or any other string is refused


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    description: str = Field(default="", max_length=1000)


Status = Literal["online", "offline"]
#: ``public``: anyone may chat; ``private``: callers need an API key the owner created.
Visibility = Literal["public", "private"]


#: ``UpdateInstanceRequest``'s validator, in its JSON schema too: at least one
#: of the fields is present and not null.
_CHANGEABLE = ("name", "description", "visibility", "introduction", "variables", "conversations")
_SOMETHING_TO_CHANGE: dict[str, Any] = {
    "anyOf": [{"required": [name], "properties": {name: {"not": {"type": "null"}}}} for name in _CHANGEABLE],
}


#: ``DifyVariable``'s validator, in its JSON schema too: a ``select`` variable
#: lists at least one option.
_SELECT_HAS_OPTIONS: dict[str, Any] = {
    "if": {"properties": {"type": {"const": "select"}}, "required": ["type"]},
    "then": {"properties": {"options": {"type": "array", "minItems": 1}}, "required": ["options"]},
}


class DifyVariable(BaseModel):
    """One input variable of an instance (Dify's app parameters), filled by callers' ``inputs``.

    Strict where JSON has the type itself (``"required": "yes"`` or ``"default":
    true`` are refused, not read as ``True`` and ``1``), so that what validates
    is what the schema says.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra=_SELECT_HAS_OPTIONS)
    key: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    name: str = Field(default="", max_length=100)
    description: str | None = Field(default=None, max_length=1000)
    type: Literal["string", "paragraph", "select", "number"] = "string"
    default: StrictStr | StrictInt | StrictFloat | None = None
    options: list[str] | None = Field(default=None, max_length=100)
    required: bool = Field(default=False, strict=True)
    #: JSON Schema counts ``5.0`` as an integer, so the relay does too (and keeps ``5``).
    max_length: int | None = Field(default=None, ge=1, le=100_000, strict=True)

    @field_validator("max_length", mode="before")
    @classmethod
    def _integral_max_length(cls, value: Any) -> Any:
        if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_COUNT:
            return int(value)
        return value

    @model_validator(mode="after")
    def _select_has_options(self) -> DifyVariable:
        if self.type == "select" and not self.options:
            raise ValueError("a select variable needs options")
        return self


class UpdateInstanceRequest(BaseModel):
    """``PATCH /api/instances/{id}``: the fields to change (at least one)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_SOMETHING_TO_CHANGE)
    name: str | None = Field(default=None, min_length=1, max_length=100)
    description: str | None = Field(default=None, max_length=1000)
    visibility: Visibility | None = None
    #: The Dify API's parameters: the opening statement clients show, and the inputs callers fill.
    introduction: str | None = Field(default=None, max_length=4000)
    variables: list[DifyVariable] | None = Field(default=None, max_length=50)
    #: Whether the instance keeps conversations (the Dify API) at all.
    conversations: bool | None = Field(default=None, strict=True)

    @model_validator(mode="after")
    def _something_to_change(self) -> UpdateInstanceRequest:
        if all(getattr(self, name) is None for name in _CHANGEABLE):
            raise ValueError(f"give at least one of {', '.join(_CHANGEABLE)}")
        if self.variables is not None and len({v.key for v in self.variables}) != len(self.variables):
            raise ValueError("variables: each key may appear once")
        return self

    def stored(self) -> dict[str, str]:
        """The changes as the instance's Redis hash keeps them (strings)."""
        out: dict[str, str] = {}
        for name in _CHANGEABLE:
            value = getattr(self, name)
            if value is None:
                continue
            if name == "variables":
                out[name] = orjson.dumps([v.model_dump(exclude_none=True) for v in value]).decode()
            elif name == "conversations":
                out[name] = "on" if value else "off"
            else:
                out[name] = value
        return out


class CreateKeyRequest(BaseModel):
    """``POST /api/instances/{id}/keys``: a label for the new caller key."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)


class CallerKey(BaseModel):
    """A caller API key as listed to its owner: never the secret itself."""

    key_id: str
    name: str
    created_at: float


class CallerKeyCreated(CallerKey):
    """The one response that shows the key; only its hash is stored."""

    key: str


class CallerKeyList(BaseModel):
    data: list[CallerKey]


class TokenRotated(BaseModel):
    """``POST /api/instances/{id}/token``: the new agent token, shown once."""

    instance_id: str
    agent_token: str


class RelayInfo(BaseModel):
    """``GET /api/relay``: what a client (the dashboard) needs to know before it asks anything."""

    model_config = ConfigDict(extra="forbid")
    #: The relay's public URL (RELAY_PUBLIC_URL, else where it listens).
    base_url: str
    version: str
    #: ``key_required``: registering takes RELAY_REGISTRATION_KEY as the bearer credential.
    registration: Literal["open", "key_required"]


class InstanceSettings(BaseModel):
    """``GET /api/instances/{id}/settings``: what the owner may change (``PATCH``), as it stands."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str
    visibility: Visibility
    #: The Dify API's parameters: the owner's, else what the instance's agent suggested.
    introduction: str
    variables: list[DifyVariable]
    #: Whether the instance keeps conversations (the Dify API's chat-messages).
    conversations: bool


class InstanceDeleted(BaseModel):
    """The ``data`` of a live status stream's ``deleted`` event."""

    model_config = ConfigDict(extra="forbid")
    instance_id: str


class InstanceView(BaseModel):
    instance_id: str
    name: str
    description: str
    status: Status
    visibility: Visibility
    models: list[str]
    #: Image generation models of the connected agents (the ``images`` operation).
    image_models: list[str]
    #: Transcription models of the connected agents (the ``transcribe`` operation).
    transcribe_models: list[str]
    agents: int
    last_seen: float | None
    created_at: float
    chat_url: str


class Registered(BaseModel):
    instance_id: str
    agent_token: str
    name: str
    status: Status
    chat_url: str


class InstancePage(BaseModel):
    data: list[InstanceView]
    next_cursor: str | None


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


class Health(BaseModel):
    status: Literal["ok"]
    node_id: str


class Ready(BaseModel):
    status: Literal["ready"]
    node_id: str
    agents: int


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


class SwiftChatImageRequest(SwiftChatImage):
    """``POST /api/image``: a SwiftChatImage whose ``modelId`` names the instance."""

    modelId: str = Field(
        min_length=1,
        description="'<instance_id>' or '<instance_id>/<image model>' (an image model the instance does not "
                    "serve means its default); with a caller key as the API key, any name, or left out")


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


# -- SwiftChat ------------------------------------------------------------------------

#: Standard padded base64, non-empty: what ``relay.doors.converse`` accepts as image bytes.
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
#: The image formats ``relay.doors.converse`` takes, in any case (it lower-cases them).
IMAGE_FORMAT_PATTERN = r"^(?:[Pp][Nn][Gg]|[Jj][Pp][Ee]?[Gg]|[Gg][Ii][Ff]|[Ww][Ee][Bb][Pp])$"


class ConverseText(BaseModel):
    """A text block: ``{"text": "..."}`` and nothing else (a block has exactly one key)."""

    model_config = ConfigDict(extra="forbid")
    text: str


class ConverseImageSource(BaseModel):
    model_config = ConfigDict(extra="allow")
    data: str = Field(alias="bytes", min_length=1, pattern=BASE64_PATTERN,
                      description="The image file, standard base64 with padding, no line breaks")


class ConverseImage(BaseModel):
    model_config = ConfigDict(extra="allow")
    format: str = Field(pattern=IMAGE_FORMAT_PATTERN, description="png, jpeg, jpg, gif or webp, any case")
    source: ConverseImageSource


class ConverseImageBlock(BaseModel):
    """An image block: ``{"image": {...}}``; user messages only."""

    model_config = ConfigDict(extra="forbid")
    image: ConverseImage


class ConverseUserMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["user"]
    content: list[ConverseText | ConverseImageBlock] = Field(min_length=1)


class ConverseAssistantMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["assistant"]
    content: list[ConverseText] = Field(min_length=1)


class ConverseRequest(BaseModel):
    """``POST /api/converse``, as ``relay.doors.converse.converse_request`` checks it.

    Documents are left out on purpose: a text document (txt, md, csv, html)
    is accepted only when its bytes decode as UTF-8, which a schema cannot say.
    """

    model_config = ConfigDict(extra="allow")
    modelId: str = Field(
        min_length=1,
        description="'<instance_id>' or '<instance_id>/<model>' (a model the instance does not serve means its "
                    "default); with a caller key as the API key, any name (SwiftChat's Bedrock ids included)")
    messages: list[ConverseUserMessage | ConverseAssistantMessage] = Field(min_length=1)
    system: list[ConverseText] | None = Field(default=None, description="Joined into one system message")
    region: str | None = Field(default=None, description="Ignored")
    enableThinking: bool | None = Field(default=None, description="Ignored")


class SwiftChatModel(BaseModel):
    modelId: str
    modelName: str


class SwiftChatModels(BaseModel):
    """``/api/models``: chat models and image models."""

    textModel: list[SwiftChatModel]
    imageModel: list[SwiftChatModel]


class SwiftChatImageResponse(BaseModel):
    image: str = Field(description="The image file, base64")


class SwiftChatError(BaseModel):
    """An error on SwiftChat's JSON routes: the app shows ``error`` as it is."""

    error: str
    code: str | None


class AgentRelease(BaseModel):
    latest_version: str
    upgrade_command: str


class ProtocolVersions(BaseModel):
    latest: int
    oldest: int
    supported: list[int]


class UpgradeInfo(BaseModel):
    """``/api/upgrade``: the agent version and wire protocol versions this relay ships."""

    needUpgrade: bool
    version: str
    url: str
    agent: AgentRelease
    protocol: ProtocolVersions


# -- the Dify chat-app API (dify.py) ----------------------------------------------------


class DifyUser(BaseModel):
    """The Dify ``user``: the caller's own name for its end user (conversations are kept per user)."""

    model_config = ConfigDict(extra="allow")
    user: str = Field(min_length=1, max_length=256)


class DifyChatRequest(DifyUser):
    """``POST …/chat-messages``."""

    query: str = Field(min_length=1)
    inputs: dict[str, Any] = Field(default_factory=dict)
    #: Not given: ``blocking``, one JSON body, which any HTTP client can read.
    response_mode: Literal["blocking", "streaming"] = "blocking"
    conversation_id: str = ""


#: The characters ``str.split()`` splits on (``str.isspace``), as a regex class:
#: a conversation name is stored with runs of them made one space.
PYTHON_WHITESPACE = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


class DifyRename(DifyUser):
    """``POST …/conversations/{id}/name``.

    ``name``: at most ``MAX_NAME_CHARS`` characters as sent, one of them not
    whitespace (the store makes runs of whitespace one space; a name of
    whitespace only would be empty).
    """

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS, pattern=f"[^{PYTHON_WHITESPACE}]",
                      description=f"At most {MAX_NAME_CHARS} characters, not all of them whitespace; stored "
                                  "with each run of whitespace made one space")


class DifyFeedback(DifyUser):
    """``POST …/messages/{id}/feedbacks``: null takes a rating back."""

    rating: Literal["like", "dislike"] | None


class DifyMetadata(BaseModel):
    #: The model's token counts, when it gave them (else empty).
    usage: dict[str, Any]


class DifyTurn(BaseModel):
    """What every answer to ``chat-messages`` carries: the turn's ids (``task_id`` is the message id)."""

    task_id: str
    id: str
    message_id: str
    conversation_id: str
    created_at: int


class DifyAnswer(DifyTurn):
    """A ``blocking`` answer: the whole of it."""

    event: Literal["message"]
    mode: Literal["chat"]
    answer: str
    metadata: DifyMetadata


class DifyMessageEvent(DifyTurn):
    """A ``streaming`` answer's piece: ``answer`` is the text since the previous event."""

    event: Literal["message"]
    answer: str


class DifyMessageEndEvent(DifyTurn):
    """The last event of a complete ``streaming`` answer."""

    event: Literal["message_end"]
    metadata: DifyMetadata


class DifyErrorEvent(DifyTurn):
    """The last event of a ``streaming`` answer cut short (the model failed or went silent)."""

    event: Literal["error"]
    status: int
    code: str | None
    message: str
    error: ErrorDetail


class DifyRating(BaseModel):
    rating: Literal["like", "dislike"]


class DifyMessage(BaseModel):
    """One turn of a conversation, as ``GET …/messages`` lists it."""

    id: str
    conversation_id: str
    inputs: dict[str, Any]
    query: str
    #: What was answered; while ``answering``, what was saved so far.
    answer: str
    feedback: DifyRating | None
    created_at: int
    #: ``normal`` answered; ``stopped`` the caller left; ``error`` the model failed; ``answering`` still
    #: being answered; ``interrupted`` the node answering it is gone.
    status: Literal["normal", "stopped", "error", "answering", "interrupted"]
    #: Present (true) when the answer was cut at the relay's size limit.
    truncated: bool = False
    #: The model's token counts, when it gave them.
    usage: dict[str, Any] | None = None


class DifyMessagePage(BaseModel):
    """Newest first; ``first_id`` = the last (oldest) ``id`` of a page gives the next one."""

    limit: int
    has_more: bool
    data: list[DifyMessage]


class DifyConversation(BaseModel):
    id: str
    name: str
    inputs: dict[str, Any]
    status: Literal["normal"]
    created_at: int
    updated_at: int


class DifyConversationPage(BaseModel):
    """Most recently active first; ``last_id`` = the last ``id`` of a page gives the next one."""

    limit: int
    has_more: bool
    data: list[DifyConversation]


class DifyResult(BaseModel):
    result: Literal["success"]


class DifyRenamed(DifyConversation):
    """The renamed conversation."""

    result: Literal["success"]


class DifyParameters(BaseModel):
    """``GET …/parameters``: the opening statement and the inputs a conversation takes."""

    introduction: str
    variables: list[DifyVariable]


class ConversationsPurged(BaseModel):
    """``DELETE /api/instances/{id}/conversations``: how many conversations were deleted."""

    deleted: int


class Transcription(BaseModel):
    """A ``json`` transcription (``verbose_json`` adds the model's ``language``, ``duration``, ``segments`` ...)."""

    model_config = ConfigDict(extra="allow")
    text: str


class AgentParameters(BaseModel):
    """``hello.parameters``: what an agent suggests for its instance's conversation API."""

    model_config = ConfigDict(extra="ignore")
    introduction: str = Field(default="", max_length=4000)
    variables: list[DifyVariable] = Field(default_factory=list, max_length=50)
