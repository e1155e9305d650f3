"""Speech to text: the audio doors' multipart forms (from ``relay.doors.transcription``'s own bounds) and operations."""

from __future__ import annotations

from typing import Any, Literal

from relay.bodies.openai import Transcription
from relay.doors.transcription import (
    AUDIO_EXTENSIONS,
    AUDIO_TYPES,
    MAX_FIELD_BYTES,
    MAX_FIELDS,
    MAX_LANGUAGE,
    RESPONSE_FORMATS,
)
from relay.openapi.common import AGENT_ERRORS, CALLER, GLOBAL_MODEL_RULE, INSTANCE_ID, Operation, error_responses, ref
from wire.frames import MAX_MODEL_NAME_LENGTH

#: The audio file part: what ``relay.doors.transcription.audio_file`` takes.
AUDIO_FILE: dict[str, Any] = {
    "type": "string", "format": "binary", "minLength": 1,
    "description": f"The audio, not empty, at most RELAY_MAX_UPLOAD_BYTES (15 MiB unless the relay says "
                   f"otherwise; 413 past it). The file name's extension decides the format: "
                   f"{', '.join(AUDIO_EXTENSIONS)}. A name without one of them is taken when the part's "
                   f"Content-Type is one of {', '.join(AUDIO_TYPES)}. Anything else is 415 "
                   f"unsupported_file_format.",
}
#: The file part's encoding: the content types that name a format, for a file whose name does not.
AUDIO_ENCODING: dict[str, Any] = {"file": {"contentType": ", ".join(AUDIO_TYPES)}}


def audio_form(*, model: Literal["optional", "required", "ignored"]) -> dict[str, Any]:
    """A transcription's multipart body.  Text fields are text on the wire: the types say how they read."""
    properties: dict[str, Any] = {"file": AUDIO_FILE}
    required = ["file"]
    if model != "ignored":
        name: dict[str, Any] = {"type": "string", "maxLength": MAX_MODEL_NAME_LENGTH}
        properties.update({
            "model": {**name, "minLength": 1} if model == "required" else name,
            "language": {"type": "string", "maxLength": MAX_LANGUAGE,
                         "description": "The audio's language, ISO-639-1 ('en'); empty: the model decides"},
            # A field is at most MAX_FIELD_BYTES of UTF-8, so never more characters than that.
            "prompt": {"type": "string", "maxLength": MAX_FIELD_BYTES,
                       "description": f"Text to guide the model; at most {MAX_FIELD_BYTES} bytes of UTF-8 "
                                      "(400 past it)"},
            "response_format": {"enum": [*RESPONSE_FORMATS, ""],
                                "description": "json (the default, also when empty) and verbose_json answer "
                                               "JSON; text and srt answer text/plain, vtt text/vtt"},
            # A number from 0 to 1, or the empty string (no anyOf: fuzzers negate its branches one by one).
            "temperature": {"type": ["number", "string"], "minimum": 0, "maximum": 1, "maxLength": 0,
                            "description": "From 0 to 1; empty: the model's default"},
        })
        if model == "required":
            required.append("model")
    return {
        "type": "object", "properties": properties, "required": required,
        # python-multipart's bounds (MAX_FIELDS parts besides the one file; 400 past them).  An array
        # is one part per item, which no schema can count across fields: other fields are single parts here.
        "maxProperties": MAX_FIELDS + 1, "additionalProperties": {"not": {"type": "array"}},
        "description": f"Other text fields are ignored. At most {MAX_FIELDS} text parts of at most "
                       f"{MAX_FIELD_BYTES} bytes each, and one file (400 past those); a field sent twice counts "
                       f"twice, and its first value is the one read.",
    }


def multipart_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True,
            "content": {"multipart/form-data": {"schema": schema, "encoding": AUDIO_ENCODING}}}


TRANSCRIBE_ERRORS = (*AGENT_ERRORS, 415)
TRANSCRIBE_MEANING = {
    400: "Malformed request: a credential in the URL, or a multipart body that does not parse (no boundary, "
         "a field past its size, too many fields or files)",
    413: "The file (or the whole body, the file plus 64 KiB) is past RELAY_MAX_UPLOAD_BYTES",
    422: "No `file` part (an application/x-www-form-urlencoded body has none), an empty file, or a field out of "
         "its range; or what the model server refused",
    501: "No connected agent of the instance can transcribe (capability_not_supported)",
    429: "Rate or concurrency limit reached, or too_many_uploads: uploads from this client address already hold "
         "a quarter of the node's RELAY_UPLOAD_MEMORY_BYTES; see Retry-After",
    503: "Instance offline or at capacity, relay storage unavailable, or this node already holds "
         "RELAY_UPLOAD_MEMORY_BYTES of uploads (uploads_busy); see Retry-After",
}

TRANSCRIPTION_ANSWER: dict[str, Any] = {
    "200": {
        "description": "json, verbose_json: the model's JSON (``text``, and for verbose_json the model's "
                       "details). text, srt: the text itself, text/plain. vtt: text/vtt.",
        "content": {
            "application/json": {"schema": ref(Transcription)},
            "text/plain": {"schema": {"type": "string"}},
            "text/vtt": {"schema": {"type": "string"}},
        },
    },
}
TRANSCRIBE_NOTE = (
    "Runs on an agent that declared the transcribe operation (501 capability_not_supported when none of the "
    "instance's agents did). The file goes to the agent in frames of one credit window each."
)


def _transcriptions(summary: str, operation_id: str, parameters: list[dict[str, Any]], description: str,
                    *, model: Literal["optional", "required"]) -> Operation:
    return {
        "summary": summary, "operationId": operation_id, "tags": ["audio"], "security": CALLER,
        "description": description, "parameters": parameters, "requestBody": multipart_body(audio_form(model=model)),
        "responses": {**TRANSCRIPTION_ANSWER, **error_responses(*TRANSCRIBE_ERRORS, meaning=TRANSCRIBE_MEANING)},
    }


INSTANCE_TRANSCRIPTIONS = _transcriptions(
    "Speech to text (OpenAI-compatible)", "transcriptions", [INSTANCE_ID],
    "`model`: run when the chosen agent serves it, else the agent's default transcription model. "
    + TRANSCRIBE_NOTE, model="optional")
GLOBAL_TRANSCRIPTIONS = _transcriptions(
    "Speech to text on any instance (OpenAI base URL)", "globalTranscriptions", [],
    GLOBAL_MODEL_RULE.replace("(its agent's default model)", "(its agent's default transcription model)")
    + " A model the instance's agents do not serve is 404 model_not_found. " + TRANSCRIBE_NOTE,
    model="required")
