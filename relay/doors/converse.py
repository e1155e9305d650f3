"""SwiftChat's ``POST /api/converse`` <-> OpenAI chat, sans-I/O.

SwiftChat (github.com/aws-samples/swift-chat) talks to its own backend in
Amazon Bedrock's Converse shapes.  The relay serves that route on the
owner's model, so two translations live here:

* the request: :func:`converse_request` checks the body and
  :func:`openai_messages` turns Converse messages (text, image and document
  blocks, a list of system blocks) into OpenAI chat messages.  What the model
  cannot take (PDFs, Office files, video, tool blocks) is refused with
  :class:`UnsupportedContent`, anything that is not a Converse request at all
  with :class:`InvalidConverse`; both name the JSON path of the culprit.
* the answer: :class:`ConverseStream` reads the agent's OpenAI event stream
  and yields SwiftChat's body, which is *not* SSE: the bare answer text as it
  is generated, then ``"\\n" + json.dumps(usage)`` as the last write, or
  ``Error: <message>`` when the stream breaks.

Sizes are not bounded here: the relay bounds the request body before any of
this runs.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import orjson

from wire.error_body import error_message
from wire.sse import iter_sse_data

#: Image formats Converse allows, and the MIME subtype each one is sent as
#: (the app sends the file's extension, so "jpg" arrives too).
IMAGE_FORMATS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "gif": "gif", "webp": "webp"}
#: Document formats whose bytes are text: sent to the model as a text part.
TEXT_DOCUMENT_FORMATS = frozenset({"txt", "md", "csv", "html"})
#: Document formats Converse allows that the model cannot read from bytes.
BINARY_DOCUMENT_FORMATS = frozenset({"pdf", "doc", "docx", "xls", "xlsx"})

ROLES = frozenset({"user", "assistant"})

_TEXT_AND_IMAGES = "the model behind this relay takes text and images"

# Standard base64 with padding, which is what the app sends (react-native-fs
# readFile(..., "base64")).  Checking the alphabet with a regex instead of
# decoding means an image, by far the largest thing in a request, is never
# copied into a decoded buffer only to be thrown away: it goes into the data
# URI as the text it already is.  The possessive quantifier keeps a failed
# match linear.
_BASE64 = re.compile(r"[A-Za-z0-9+/]*+={0,2}")


class InvalidConverse(ValueError):
    """The body is not a Converse request: a wrong type, a missing field.

    ``message`` says what is wrong and ``path`` where, as dotted JSON keys and
    list indexes (``messages.0.content.1.image.source.bytes``; empty for the
    body itself).  The relay answers 422.
    """

    def __init__(self, message: str, path: str):
        super().__init__(f"{path}: {message}" if path else message)
        self.message = message
        self.path = path


class UnsupportedContent(InvalidConverse):
    """A well-formed Converse block this relay cannot pass on to the model.

    ``path`` names the block (``messages.2.content.1``).  A subclass of
    :class:`InvalidConverse`, so the relay can catch both at once and still
    tell a client's bug from a limit of the model.
    """


class StreamFailed(Exception):
    """The model's stream broke: an error object, or a chunk that is not JSON.

    ``text`` is the answer text decoded from the same payload before the
    failure, which the relay still owes the app; it ends the body with
    ``text + ConverseStream.error(message)``.
    """

    def __init__(self, message: str, text: bytes = b""):
        super().__init__(message)
        self.message = message
        self.text = text


def converse_request(body: Any) -> tuple[str, list[dict[str, Any]]]:
    """Check a parsed ``/api/converse`` body; return its ``modelId`` and the OpenAI messages.

    ``region`` and ``enableThinking`` mean nothing to the owner's model, so
    they are only type-checked (SwiftChat's own server refuses a body whose
    fields have the wrong type, and so does this).
    """
    if not isinstance(body, dict):
        raise InvalidConverse("the body must be a JSON object", "")
    model_id = body.get("modelId")
    if not isinstance(model_id, str) or not model_id:
        raise InvalidConverse("must be a non-empty string", "modelId")
    region = body.get("region")
    if region is not None and not isinstance(region, str):
        raise InvalidConverse("must be a string", "region")
    thinking = body.get("enableThinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise InvalidConverse("must be true, false or null", "enableThinking")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidConverse("must be a non-empty list of messages", "messages")
    return model_id, openai_messages(messages, body.get("system"))


def openai_messages(messages: Any, system: Any = None) -> list[dict[str, Any]]:
    """Converse ``messages`` (and ``system`` blocks) as OpenAI chat messages.

    The system blocks become one leading system message, their texts joined
    by blank lines.  A message whose blocks all end up as text gets a string
    ``content`` (the parts joined by blank lines), since every
    OpenAI-compatible server takes that, while list content is not universal
    among local model servers; a message with an image gets a list of parts.

    Raises :class:`InvalidConverse` for a malformed shape and
    :class:`UnsupportedContent` for content the model cannot take.
    """
    if not isinstance(messages, list):
        raise InvalidConverse("must be a list of messages", "messages")
    out: list[dict[str, Any]] = []
    system_text = _system_text(system)
    if system_text is not None:
        out.append({"role": "system", "content": system_text})
    for index, message in enumerate(messages):
        out.append(_message(message, f"messages.{index}"))
    return out


def _system_text(system: Any) -> str | None:
    if system is None:
        return None
    if not isinstance(system, list):
        raise InvalidConverse("must be a list of text blocks or null", "system")
    texts: list[str] = []
    for index, block in enumerate(system):
        path = f"system.{index}"
        kind = _block_kind(block, path)
        if kind != "text":
            raise UnsupportedContent(f"a {kind!r} system block cannot be sent: only text blocks can", path)
        texts.append(_text(block, path))
    return "\n\n".join(texts) if texts else None


def _message(message: Any, path: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise InvalidConverse("a message must be an object with role and content", path)
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:  # a list or object role is not hashable
        raise InvalidConverse("role must be 'user' or 'assistant'", f"{path}.role")
    content = message.get("content")
    if not isinstance(content, list) or not content:
        raise InvalidConverse("content must be a non-empty list of content blocks", f"{path}.content")
    parts = [_part(block, role, f"{path}.content.{index}") for index, block in enumerate(content)]
    if all(part["type"] == "text" for part in parts):
        return {"role": role, "content": "\n\n".join(part["text"] for part in parts)}
    return {"role": role, "content": parts}


def _block_kind(block: Any, path: str) -> str:
    # A Converse content block is a union: exactly one member is set.
    if not isinstance(block, dict) or len(block) != 1:
        raise InvalidConverse("a content block must be an object with exactly one key (text, image, ...)", path)
    kind: str = next(iter(block))
    return kind


def _part(block: Any, role: str, path: str) -> dict[str, Any]:
    kind = _block_kind(block, path)
    if kind == "text":
        return {"type": "text", "text": _text(block, path)}
    if kind == "image":
        return _image(block["image"], role, path)
    if kind == "document":
        return _document(block["document"], path)
    if kind == "video":
        raise UnsupportedContent(f"video cannot be sent: {_TEXT_AND_IMAGES}", path)
    # toolUse, toolResult, reasoningContent, guardContent, cachePoint, ...:
    # Converse knows them, OpenAI chat has nothing to carry them as here.
    raise UnsupportedContent(
        f"a {kind!r} content block cannot be sent: this relay translates text, image and document blocks", path
    )


def _text(block: dict[str, Any], path: str) -> str:
    text = block["text"]
    if not isinstance(text, str):
        raise InvalidConverse("must be a string", f"{path}.text")
    return text


def _image(image: Any, role: str, path: str) -> dict[str, Any]:
    if not isinstance(image, dict):
        raise InvalidConverse("must be an object with format and source", f"{path}.image")
    fmt = _format(image, f"{path}.image")
    subtype = IMAGE_FORMATS.get(fmt)
    if subtype is None:
        raise InvalidConverse(f"image format {fmt!r} is not one of png, jpeg, gif, webp", f"{path}.image.format")
    data = _base64(image, f"{path}.image")
    if role != "user":
        # OpenAI chat takes image parts in user messages only.
        raise UnsupportedContent("an image can be sent in a user message only", path)
    return {"type": "image_url", "image_url": {"url": f"data:image/{subtype};base64,{data}"}}


def _document(document: Any, path: str) -> dict[str, Any]:
    if not isinstance(document, dict):
        raise InvalidConverse("must be an object with format, name and source", f"{path}.document")
    fmt = _format(document, f"{path}.document")
    if fmt in BINARY_DOCUMENT_FORMATS:
        raise UnsupportedContent(
            f"a {fmt} document cannot be sent: {_TEXT_AND_IMAGES}; send the document as text", path
        )
    if fmt not in TEXT_DOCUMENT_FORMATS:
        raise InvalidConverse(f"document format {fmt!r} is not one Converse knows", f"{path}.document.format")
    name = document.get("name")
    if not isinstance(name, str):
        raise InvalidConverse("must be a string", f"{path}.document.name")
    data = _base64(document, f"{path}.document")
    try:
        # utf-8-sig: a byte order mark (as Windows editors write) is not text
        # the model should see.
        text = base64.b64decode(data, validate=True).decode("utf-8-sig")
    except (binascii.Error, UnicodeDecodeError):
        raise UnsupportedContent(
            f"document {name!r} is not UTF-8 text: {_TEXT_AND_IMAGES}; send the document as UTF-8 text", path
        ) from None
    return {"type": "text", "text": f'Document "{name}" ({fmt}):\n{text}'}


def _format(obj: dict[str, Any], path: str) -> str:
    fmt = obj.get("format")
    if not isinstance(fmt, str):
        raise InvalidConverse("must be a string", f"{path}.format")
    # Converse spells formats in lower case; the app lower-cases file
    # extensions, other clients may not, and case carries no meaning here.
    return fmt.lower()


def _base64(obj: dict[str, Any], path: str) -> str:
    source = obj.get("source")
    if not isinstance(source, dict):
        raise InvalidConverse("must be an object with bytes", f"{path}.source")
    data = source.get("bytes")
    path = f"{path}.source.bytes"
    if not isinstance(data, str):
        raise InvalidConverse("must be a base64 string", path)
    if not data:
        raise InvalidConverse("is empty", path)
    if len(data) % 4 or _BASE64.fullmatch(data) is None:
        raise InvalidConverse("is not standard base64 (A-Z a-z 0-9 + /, padded with =, no line breaks)", path)
    return data


def _usage_json(input_tokens: int, output_tokens: int, total_tokens: int) -> bytes:
    """The usage object exactly as SwiftChat's server writes it.

    That server writes ``json.dumps(usage)``: these three keys in this order,
    with the standard library's ", " and ": " separators.  The app only looks
    for ``\\n{"inputTokens":`` and then parses JSON, so spacing would not
    break it, but matching the original byte for byte leaves nothing to
    wonder about.  Written by hand because the values are always ints.
    """
    return (
        f'{{"inputTokens": {input_tokens}, "outputTokens": {output_tokens}, "totalTokens": {total_tokens}}}'
    ).encode()


class ConverseStream:
    """The agent's OpenAI chat stream in, SwiftChat's response body out.

    Feed each payload the agent sends (SSE events ``data: <chunk>\\n\\n``, an
    event may be split across payloads); write what :meth:`feed` returns,
    then what :meth:`finish` returns.  When :meth:`feed` raises
    :class:`StreamFailed`, write ``exc.text + ConverseStream.error(exc.message)``
    and end the body instead.

    Only ``choices[0].delta.content`` reaches the app: role-only deltas,
    ``reasoning_content`` (the app's ``/api/converse`` has no place for it),
    other choices and finish chunks write nothing.
    """

    __slots__ = ("_buffer", "_completion_tokens", "_deltas", "_done", "_failed", "_prompt_tokens", "_total_tokens")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._deltas = 0
        self._prompt_tokens: int | None = None
        self._completion_tokens: int | None = None
        self._total_tokens: int | None = None
        self._done = False
        self._failed: str | None = None

    def feed(self, payload: bytes) -> bytes:
        """The answer text in ``payload`` (UTF-8), to write now; may be empty.

        Raises :class:`StreamFailed` on an error object or a chunk that is not
        a JSON object, and again on any feed after that.  Events after
        ``data: [DONE]`` are ignored.
        """
        if self._failed is not None:
            raise StreamFailed(self._failed)
        pieces: list[str] = []
        for data in iter_sse_data(self._buffer, payload):
            if self._done:
                continue
            if data == b"[DONE]":
                self._done = True
                continue
            try:
                self._chunk(data, pieces)
            except StreamFailed as exc:
                self._failed = exc.message
                raise StreamFailed(exc.message, "".join(pieces).encode()) from None
        return "".join(pieces).encode()

    def _chunk(self, data: bytes, pieces: list[str]) -> None:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise StreamFailed("the model's stream carried a chunk that is not JSON") from None
        if not isinstance(chunk, dict):
            raise StreamFailed("the model's stream carried a chunk that is not a JSON object")
        if "error" in chunk:
            raise StreamFailed(error_message(chunk) or "the model failed")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            # Servers that report usage on every chunk (vLLM's continuous
            # stats) send running totals, so the last one wins.
            self._prompt_tokens = _count(usage.get("prompt_tokens"), self._prompt_tokens)
            self._completion_tokens = _count(usage.get("completion_tokens"), self._completion_tokens)
            self._total_tokens = _count(usage.get("total_tokens"), self._total_tokens)
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            # With n > 1 each chunk carries one choice of any index; the app
            # shows one answer, the first.
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and content:
                pieces.append(content)
                self._deltas += 1

    @property
    def usage(self) -> dict[str, int]:
        """``inputTokens``, ``outputTokens``, ``totalTokens``, as :meth:`finish` reports them.

        The model's own counts when its stream carried ``usage`` (ask for it
        with ``stream_options.include_usage``).  Without them, outputTokens is
        the number of content deltas received: servers send about one token
        per delta, so it is an honest approximation, not a count; inputTokens
        is 0 because nothing here knows the prompt's tokens; totalTokens is
        their sum.
        """
        input_tokens = self._prompt_tokens if self._prompt_tokens is not None else 0
        output_tokens = self._completion_tokens if self._completion_tokens is not None else self._deltas
        total = self._total_tokens if self._total_tokens is not None else input_tokens + output_tokens
        return {"inputTokens": input_tokens, "outputTokens": output_tokens, "totalTokens": total}

    def finish(self) -> bytes:
        """The last write of a body that ended well: ``\\n`` and the usage JSON.

        Write it as one piece: the app recognises the usage only in a read
        that ends with ``}``.
        """
        usage = self.usage
        return b"\n" + _usage_json(usage["inputTokens"], usage["outputTokens"], usage["totalTokens"])

    @staticmethod
    def error(message: str) -> bytes:
        """The last write of a body that broke, as SwiftChat's server writes it.

        A static method, so the relay can also use it for a failure before
        any stream exists (``ConverseStream.error(...)``).
        """
        return b"Error: " + message.encode(errors="replace")


def _count(value: Any, previous: int | None) -> int | None:
    # bool is an int subclass, and never a token count.
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return previous
