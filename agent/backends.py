"""What a backend is: the contract the agent's client serves requests through.

A backend turns one OpenAI chat request into either a stream of chunk JSON
documents (``stream``, yielding them in batches: all the chunks that arrived
together, so the agent can send them in one frame without waiting for more)
or one ``chat.completion`` JSON body (``complete``), as raw bytes.  A backend
that declares ``images`` also turns an ``/images/generations`` request into
one ``ImagesResponse`` JSON body (``images``), every image inline as
``b64_json``.  One that declares ``transcribe`` turns an audio file (the
request's upload, received in full first) into one ``{"text": ...}`` JSON
body (``transcribe``); ``check_transcribe`` refuses a request before its
upload arrives, so a request that cannot succeed stops the upload at once.
Failures are :class:`BackendError` with an HTTP status hint.
Cancelling the consuming task aborts the upstream HTTP request at once
(the connection is closed when its stream context is left unfinished).

The backends themselves: :mod:`agent.upstream` (a local OpenAI-compatible
server) and :mod:`agent.demo_model` (the built-in demo model).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol


class BackendError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class Backend(Protocol):
    #: Operations it can run (``wire.OP_CHAT`` ...), declared to the relay in ``hello``.
    capabilities: tuple[str, ...]
    #: Image generation models it serves, declared in ``hello.image_models``.
    image_models: tuple[str, ...]
    #: Transcription models it serves, declared in ``hello.transcribe_models``.
    transcribe_models: tuple[str, ...]

    async def models(self) -> list[str]: ...

    def stream(self, body: dict[str, Any]) -> AsyncIterator[list[bytes]]: ...

    async def complete(self, body: dict[str, Any]) -> bytes: ...

    async def images(self, body: dict[str, Any]) -> bytes: ...

    def check_transcribe(self, body: dict[str, Any]) -> None: ...

    async def transcribe(self, body: dict[str, Any], audio: bytes) -> bytes: ...

    async def aclose(self) -> None: ...


#: OpenAI's transcription answer formats; the agent answers every one as JSON
#: (``text``, ``srt`` and ``vtt`` as ``{"text": <the document>}``).
RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")


def check_transcribe_body(body: dict[str, Any], models: tuple[str, ...]) -> None:
    """What every backend refuses before the audio arrives (422, or 404 for a model it does not serve)."""
    model = body.get("model")
    if not isinstance(model, str) or model not in models:
        raise BackendError(404, f"no transcription model {model!r} here (this agent serves {', '.join(models)})",
                           "model_not_found")
    response_format = body.get("response_format", "json")
    if response_format not in RESPONSE_FORMATS:
        raise BackendError(422, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}",
                           "invalid_response_format")
    for name in ("filename", "content_type"):
        if not isinstance(body.get(name, ""), str):
            raise BackendError(422, f"{name} must be a string", "invalid_request")
