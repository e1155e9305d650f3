"""The Dify chat-app API's bodies: turns, conversations, messages, feedback, an instance's parameters."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, field_validator, model_validator

from relay.bodies.openai import ErrorDetail, integral

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
        return integral(value)

    @model_validator(mode="after")
    def _select_has_options(self) -> DifyVariable:
        if self.type == "select" and not self.options:
            raise ValueError("a select variable needs options")
        return self


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


#: Longest conversation name kept, in characters (a default name is shorter; the store keeps to it too).
MAX_NAME_CHARS = 256
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


class AgentParameters(BaseModel):
    """``hello.parameters``: what an agent suggests for its instance's conversation API."""

    model_config = ConfigDict(extra="ignore")
    introduction: str = Field(default="", max_length=4000)
    variables: list[DifyVariable] = Field(default_factory=list, max_length=50)
