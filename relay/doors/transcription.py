"""Audio transcription: OpenAI's ``/audio/transcriptions``, per instance and global.

=====================  ===================================  ==========================
                       ``/api/chat/{id}/audio/...``         ``/v1/audio/...``
=====================  ===================================  ==========================
instance               the path                             ``model`` or the caller key
unknown ``model``      the agent's default model            404 ``model_not_found``
=====================  ===================================  ==========================

The body is ``multipart/form-data``: ``file`` and ``model``, and OpenAI's
optional ``language``, ``prompt``, ``response_format`` and ``temperature``.
It is bounded before the parser sees a byte: a declared ``Content-Length``
past the limit is refused at once, and the bytes are counted as they arrive
(``RELAY_MAX_UPLOAD_BYTES`` for the file, plus a little room for the
fields and the multipart framing; 413 past either).  The file then goes to
an agent that declared ``transcribe`` (501 otherwise) as the operation's
upload: frames of one window, each waiting for the agent's credit
(``operations.run_op``), so a 15 MB file shares the agent's websocket with
everything else frame by frame.

The node holds at most ``RELAY_UPLOAD_MEMORY_BYTES`` of uploads at once, all
callers together (``uploads.UploadBudget``), and one client address a quarter of
that (at least one upload of the largest size): a form is reserved against
both before its first byte is read (its declared length, or, sent chunked,
as its bytes arrive) and given back when the request ends, however it ends;
past the address's share ``429 too_many_uploads``, past the node's ``503
uploads_busy``, both with ``Retry-After``.  A form that pauses midway gets
``408`` after ``RELAY_BODY_TIMEOUT``, and one that trickles slower than
``RELAY_BODY_MIN_RATE`` too (``telemetry.requests.body_deadline``).

Formats are OpenAI's: mp3, mp4, mpeg, mpga, m4a, wav, webm.  The name's
extension decides, as it does at OpenAI; a name without one of those
extensions is accepted when its content type names one of the formats, and
gets that extension (upstreams decide by the name).  Anything else is
``415 unsupported_file_format``: the request is well formed, its media type
is not one this operation takes.  No file at all is ``422``.

Answers: ``json`` and ``verbose_json`` are the agent's JSON; ``text``,
``srt`` and ``vtt`` are the document itself as text, as OpenAI sends them
(its SDKs return the string).  The agent always answers one JSON body
(``{"text": ...}``): the relay unwraps it for the text formats.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Message

import wire
from relay.errors import (
    InvalidRequest,
    PayloadTooLarge,
    RelayError,
    UpstreamError,
    ValidationFailed,
)
from relay.inputs import client_ip, declared_length
from relay.services import Services
from relay.serving.admission import Admitted
from relay.serving.claims import Claim
from relay.serving.inflight import cleanup_scope
from relay.serving.operations import run_op
from relay.serving.uploads import Reservation
from relay.store import keys
from relay.store.leases import Slot
from wire.frames import MAX_MODEL_NAME_LENGTH

log = logging.getLogger("relay.audio")

#: Room next to the file for the multipart framing and the text fields.
FORM_ROOM = 64 * 1024
#: Text fields in one form, and the size of each (a ``prompt`` is short: OpenAI takes ~224 tokens).
MAX_FIELDS = 16
MAX_FIELD_BYTES = 16 * 1024

#: OpenAI's formats, by extension, and the content types that name them.
AUDIO_EXTENSIONS = ("mp3", "mp4", "mpeg", "mpga", "m4a", "wav", "webm")
AUDIO_TYPES = {
    "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/mpga": "mpga", "audio/mp4": "m4a", "audio/m4a": "m4a",
    "audio/x-m4a": "m4a", "video/mp4": "mp4", "video/mpeg": "mpeg", "audio/wav": "wav", "audio/x-wav": "wav",
    "audio/wave": "wav", "audio/vnd.wave": "wav", "audio/webm": "webm", "video/webm": "webm",
}
RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
#: Formats answered as text: the agent's ``text`` is the whole document.
TEXT_FORMATS = {"text": "text/plain; charset=utf-8", "srt": "text/plain; charset=utf-8",
                "vtt": "text/vtt; charset=utf-8"}
MAX_FILENAME = 255
MAX_LANGUAGE = 32


class UnsupportedMediaType(RelayError):
    status, type, code = 415, "invalid_request_error", "unsupported_file_format"


@dataclass(frozen=True, slots=True)
class AudioForm:
    file: bytes
    filename: str
    content_type: str
    #: The text fields, as sent (``model`` among them).
    fields: dict[str, str]


#: A number as JSON writes one (RFC 8259, section 6).
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


# -- reading the form ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def read_audio(request: Request, services: Services) -> AsyncIterator[AudioForm | None]:
    """The form (None if the caller left), held against the node's upload budget until the block ends.

    Read while holding one of the caller's address's upload slots.  Up to 15
    MiB per request sit in memory while a form is read, before any stream
    lease (on ``/v1`` even before the instance is known): the slots
    (``RELAY_MAX_STREAMS_PER_CALLER`` per client address, across nodes) bound
    how many one address can make the relay hold at once, and the node's
    ``UploadBudget`` (``RELAY_UPLOAD_MEMORY_BYTES``) how many all addresses
    together can, from the form's first byte to the end of the request.
    """
    reservation = Reservation(services.upload_budget, client_ip(request))
    try:
        lease = await services.stream_leases.acquire(
            [Slot(keys.streams("upload", f"ip:{client_ip(request)}"), services.settings.max_streams_per_caller,
                  "uploads from this address")])
        try:
            form: AudioForm | None = await read_form(request, services.settings.max_upload_bytes, reservation)
        except ClientDisconnect:
            form = None
        finally:
            with cleanup_scope():
                await services.stream_leases.release(lease)
        yield form
    finally:
        reservation.release()


async def read_form(request: Request, limit: int, reservation: Reservation | None = None) -> AudioForm:
    """The multipart body, bounded before parsing: 413 past ``limit`` bytes of file.

    415 when the body is not a form, 400 when it does not parse, 422 when
    it holds no ``file``.  ``ClientDisconnect`` when the caller leaves midway.

    Starlette's multipart parser (python-multipart underneath) with the
    limits ``Request.form`` takes, built here for one more: it keeps the
    file in memory up to the upload limit, where ``Request.form`` would
    spool anything past 1 MiB to a temporary file on disk.  What callers
    send passes through memory only, never the relay's disk (SECURITY.md).
    """
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/x-www-form-urlencoded":
        # A form that cannot carry a file: nothing in it is worth reading.
        raise ValidationFailed("file: required: send multipart/form-data with the audio in a part named 'file'",
                               param="file")
    if kind != "multipart/form-data":
        raise UnsupportedMediaType("send the audio as multipart/form-data, with the file in a part named 'file'",
                                   code="multipart_required")
    body_limit = limit + FORM_ROOM
    declared = declared_length(request)
    if declared is not None and declared > body_limit:
        raise PayloadTooLarge(f"the file exceeds {limit} bytes")
    if reservation is not None and declared is not None:
        reservation.grow_to(declared)  # before a byte is read
    counted = 0

    async def bounded() -> Message:
        # Counted before the parser gets the bytes: a body without (or lying
        # about) its length is cut off at the same limit.
        nonlocal counted
        message = await request.receive()
        if message["type"] == "http.request":
            counted += len(message.get("body", b""))
            if counted > body_limit:
                raise PayloadTooLarge(f"the file exceeds {limit} bytes")
            if reservation is not None:
                reservation.grow_to(counted)  # chunked, or more than declared: as it arrives
        return message

    parser = MultiPartParser(request.headers, Request(request.scope, bounded).stream(), max_files=1,
                             max_fields=MAX_FIELDS, max_part_size=MAX_FIELD_BYTES)
    parser.spool_max_size = body_limit
    try:
        form = await parser.parse()
    except MultiPartException as exc:  # python-multipart's refusals: framing, too many parts, a field too long
        raise InvalidRequest(f"malformed multipart body: {exc.message}") from None
    try:
        upload: UploadFile | None = None
        fields: dict[str, str] = {}
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields.setdefault(name, value)
            elif name == "file":
                upload = value
        if upload is None:
            raise ValidationFailed("file: required: the audio file, in a multipart part named 'file'", param="file")
        data = await upload.read()
        if len(data) > limit:
            raise PayloadTooLarge(f"the file exceeds {limit} bytes")
        return AudioForm(data, upload.filename or "", upload.content_type or "", fields)
    finally:
        await form.close()


def audio_file(filename: str, content_type: str) -> tuple[str, str]:
    """The name and content type the agent gets; 415 unless they name one of OpenAI's formats."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    # The name goes into the agent's own multipart request: printable, bounded.
    base = "".join(ch if ch.isprintable() and ch not in '"' else "_" for ch in base)[-MAX_FILENAME:]
    stem, dot, extension = base.rpartition(".")
    kind = content_type.split(";")[0].strip().lower()
    if dot and extension.lower() in AUDIO_EXTENSIONS:
        return base, kind or "application/octet-stream"
    named = AUDIO_TYPES.get(kind)
    if named is not None:
        return f"{(stem if dot else base) or 'audio'}.{named}", kind
    raise UnsupportedMediaType(f"unsupported audio format ({filename or 'no file name'!r}, "
                               f"{content_type or 'no content type'}): send one of "
                               f"{', '.join(AUDIO_EXTENSIONS)}", param="file")


def transcription_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's optional fields, checked (422 naming the field); unknown ones are dropped."""
    out: dict[str, Any] = {}
    model = fields.get("model")
    if model is not None:
        if not isinstance(model, str) or len(model) > MAX_MODEL_NAME_LENGTH:
            raise ValidationFailed("model: must be a model name", param="model")
        if model:
            out["model"] = model
    language = fields.get("language")
    if language:
        if not isinstance(language, str) or len(language) > MAX_LANGUAGE:
            raise ValidationFailed("language: must be a language code such as 'en'", param="language")
        out["language"] = language
    prompt = fields.get("prompt")
    if prompt:
        if not isinstance(prompt, str):
            raise ValidationFailed("prompt: must be text", param="prompt")
        out["prompt"] = prompt
    response_format = fields.get("response_format")
    if response_format:
        if response_format not in RESPONSE_FORMATS:
            raise ValidationFailed(f"response_format: must be one of {', '.join(RESPONSE_FORMATS)}",
                                   param="response_format")
        out["response_format"] = response_format
    temperature = fields.get("temperature")
    if temperature not in (None, ""):
        # A JSON number, as the document says: Python's float() would also take
        # "+0.5", "0_5" and other scripts' digits.
        text = str(temperature).strip()
        value = float(text) if _JSON_NUMBER.fullmatch(text) else math.nan
        if not 0.0 <= value <= 1.0:
            raise ValidationFailed("temperature: must be a number from 0 to 1", param="temperature")
        out["temperature"] = value
    return out


# -- the operation --------------------------------------------------------------------


async def transcribe(request: Request, services: Services, admitted: Admitted, claim: Claim, file: bytes, filename: str,
                     content_type: str, fields: dict[str, Any], model: str) -> Response:
    """Run ``transcribe`` on an agent of the admitted instance; the caller's response.

    ``fields`` are OpenAI's optional form fields (``language``, ``prompt``,
    ``response_format``, ``temperature``) and, optionally, ``model``: the
    caller's choice, run when the chosen agent serves it, else that agent's
    default.  ``model`` (the argument), when not empty, is stricter: only
    agents serving it are chosen (404 ``model_not_found`` otherwise), as on
    the global door.  Checks the file (415, 422, 413) and the fields (422)
    itself, so a door may call it with what it read.  The caller hanging up
    is a 499 nobody reads.
    """
    settings = services.settings
    if not file:
        raise ValidationFailed("file: is empty", param="file")
    if len(file) > settings.max_upload_bytes:
        raise PayloadTooLarge(f"the file exceeds {settings.max_upload_bytes} bytes")
    name, kind = audio_file(filename, content_type)
    options = transcription_fields(fields)
    preferred = options.pop("model", "")

    def body_for(models: tuple[str, ...]) -> dict[str, Any]:
        chosen = model or (preferred if preferred in models else (models[0] if models else preferred))
        return {"model": chosen, "filename": name, "content_type": kind, **options}

    answer = await run_op(services.router, admitted.instance_id, wire.OP_TRANSCRIBE, body_for, settings,
                          request.receive, stream=False, claim=claim, model=model, upload=file)
    if answer.status_code != 200:
        return answer  # the caller left
    try:
        document = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("text"), str):
        raise UpstreamError("the agent's transcription is not a JSON object with a text", code="upstream_error")
    media = TEXT_FORMATS.get(options.get("response_format", "json"))
    if media is not None:
        return Response(document["text"], media_type=media)
    return Response(answer.body, media_type="application/json")


# -- the doors --------------------------------------------------------------------------


async def instance_transcriptions(request: Request, services: Services) -> Response:
    """``POST /api/chat/{id}/audio/transcriptions``."""
    admitted = await services.admission.admit(request, request.path_params["instance_id"])
    async with read_audio(request, services) as form:
        if form is None:
            return Response(status_code=499)
        audio_file(form.filename, form.content_type)  # refused before a lease is taken
        transcription_fields(form.fields)
        return await services.admission.leased(admitted,
                            lambda claim: transcribe(request, services, admitted, claim, form.file, form.filename,
                                               form.content_type, form.fields, ""))


async def global_transcriptions(request: Request, services: Services) -> Response:
    """``POST /v1/audio/transcriptions``: the instance is named by ``model`` (or the caller key)."""
    async with read_audio(request, services) as form:
        if form is None:
            return Response(status_code=499)
        target, admitted = await services.admission.admit_model(request, form.fields.get("model") or None)
        audio_file(form.filename, form.content_type)
        fields = {k: v for k, v in form.fields.items() if k != "model"}  # it named the instance
        transcription_fields(fields)
        return await services.admission.leased(admitted,
                            lambda claim: transcribe(request, services, admitted, claim, form.file, form.filename,
                                               form.content_type, fields, target.model))
