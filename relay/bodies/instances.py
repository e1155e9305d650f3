"""The relay's own API: registration, owner updates, caller keys, views, the relay's info, health and readiness.

The answers' models (views, ``RelayInfo``, ``InstanceSettings``, the live
status stream's ``InstanceDeleted``, health) describe bodies the handlers
build as dicts, for the OpenAPI document.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from relay.bodies.dify import DifyVariable


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


class Health(BaseModel):
    status: Literal["ok"]
    node_id: str


class Ready(BaseModel):
    status: Literal["ready"]
    node_id: str
    agents: int
