"""Which instance a request on a global door is for.

The per-instance doors have the instance in their path.  The global ones
(``/v1/...`` and SwiftChat's ``/api/...``) take it from the ``model`` the
caller names, or from the caller key presented as the API key:

* ``"<instance_id>"``          that instance, its agent's default model;
* ``"<instance_id>/<model>"``  that instance, that model (the first ``/``
  splits: model names such as ``meta-llama/Llama-3-8B`` keep theirs);
* ``"<model>"`` with a caller key (``irk_...``): a model of the key's instance;
* nothing, with a caller key: the key's instance, its default model.

Anything else is 404 ``model_not_found``, as OpenAI answers for a model that
does not exist; an instance id that parses but is not registered becomes the
same error once access control looks it up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from relay.errors import ModelNotFound, ValidationFailed
from relay.store.access import AccessControl

#: ``tokens.new_instance_id`` (relay/store/tokens.py): 16 lowercase hex digits.
INSTANCE_ID = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True, slots=True)
class Target:
    instance_id: str
    #: The model asked for; "" means the chosen agent's default.
    model: str = ""

    def name(self) -> str:
        """How the caller can name this target on a global door."""
        return f"{self.instance_id}/{self.model}" if self.model else self.instance_id


def unknown_model(model: str) -> ModelNotFound:
    return ModelNotFound(
        f"the model {model!r} does not exist or you do not have access to it; on this URL a model is "
        "'<instance_id>' or '<instance_id>/<model>' (GET /v1/models lists them), or a model of the "
        "instance whose caller key is the API key", param="model")


async def resolve(access: AccessControl, model: Any, presented: str | None, *, field: str = "model") -> Target:
    """The target a global door's ``model`` (and the caller's key) name."""
    if model is not None and not isinstance(model, str):
        raise ValidationFailed(f"{field}: must be a string", param=field)
    keyed = await access.key_instance(presented)
    if not model:
        if keyed is None:
            raise ValidationFailed(f"{field}: name the instance: '<instance_id>' or '<instance_id>/<model>' "
                                   "(or send a caller key of the instance as the API key)", param=field)
        return Target(keyed)
    head, _, rest = model.partition("/")
    if keyed is not None and head == keyed:
        return Target(keyed, rest)
    if INSTANCE_ID.fullmatch(head):
        return Target(head, rest)
    if keyed is not None:
        return Target(keyed, model)
    raise unknown_model(model)
