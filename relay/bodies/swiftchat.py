"""SwiftChat's bodies: Converse, image generation, model lists, its errors, and the upgrade check."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from relay.bodies.openai import integral

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
        return integral(value)  # strict from here on: a bool or any other string is refused


# The document's body of ``POST /api/image`` (see the global doors' bodies in relay.bodies.openai).


class SwiftChatImageRequest(SwiftChatImage):
    """``POST /api/image``: a SwiftChatImage whose ``modelId`` names the instance."""

    modelId: str = Field(
        min_length=1,
        description="'<instance_id>' or '<instance_id>/<image model>' (an image model the instance does not "
                    "serve means its default); with a caller key as the API key, any name, or left out")


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
