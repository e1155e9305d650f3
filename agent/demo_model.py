"""The built-in demo model: deterministic chat, pictures and transcripts, no model server needed."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson

import wire

from .backends import BackendError, check_transcribe_body
from .media import encode_png, wav_summary

DEMO_MODEL = "demo"
DEMO_IMAGE_MODEL = "demo-image"
DEMO_TRANSCRIBE_MODEL = "demo-transcribe"
DEMO_IMAGE_SIZE = (256, 256)
MAX_DEMO_IMAGE_SIDE = 1024
#: As many as the relay lets a caller ask for (``ImageRequest.n``, OpenAI's own
#: limit): the demo must answer every request the relay's document calls valid.
MAX_DEMO_IMAGES = 10


def demo_image(prompt: str, width: int, height: int, index: int = 0) -> bytes:
    """The demo model's picture of ``prompt``: a PNG the same prompt always gives.

    A vertical blend of two colours taken from a hash of the prompt (and of
    ``index``, so ``n`` images differ), with a band of a third across the
    middle.  Each row is one colour repeated, so building even 1024x1024 is
    a thousand byte multiplications, not a million Python steps.
    """
    digest = hashlib.sha256(f"{index}:{prompt}".encode()).digest()
    top, bottom, band = digest[0:3], digest[3:6], bytes(digest[6:9])
    band_rows = range(height * 2 // 5, max(height * 3 // 5, height * 2 // 5 + 1))
    edge = max(width // 8, 1)  # the band stops short of the sides
    rows = []
    for y in range(height):
        t = y / (height - 1) if height > 1 else 0.0
        colour = bytes(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        if y in band_rows and width > 2 * edge:
            rows.append(colour * edge + band * (width - 2 * edge) + colour * edge)
        else:
            rows.append(colour * width)
    return encode_png(width, height, rows)


_SIZE = re.compile(r"\s*(\d{1,9})\s*[xX]\s*(\d{1,9})\s*")


def demo_image_size(size: Any) -> tuple[int, int]:
    """``"WxH"`` (each side clamped to 1..1024); absent or ``"auto"`` is 256x256."""
    if size is None or size == "auto":
        return DEMO_IMAGE_SIZE
    match = _SIZE.fullmatch(size) if isinstance(size, str) else None
    if match is None:
        raise BackendError(422, f"size must be WIDTHxHEIGHT in pixels, e.g. \"512x512\" (got {size!r})",
                           "invalid_size")
    width, height = (min(max(int(side), 1), MAX_DEMO_IMAGE_SIDE) for side in match.groups())
    return width, height


def text_of(content: Any) -> str:
    """The text of a message's ``content``, whatever the caller put there.

    The relay's schema allows a string, null, or a list of parts of any type,
    where only ``text`` parts must carry a string ``text``: an image part has
    none, and another part may say ``"text": null``.  Anything that is not a
    string contributes nothing.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def demo_reply(messages: Any) -> list[str]:
    """The demo model's deterministic answer, as the words it streams."""
    last = ""
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            last = text_of(message.get("content"))
            break
    said = " ".join(last.split()[:24]) or "nothing"
    text = (
        "Hello! I am the instance-relay demo model, answering from the agent's machine "
        f"through the relay. You said: {said}. Point the agent at a real model with "
        "--backend openai --upstream-url to get real answers."
    )
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _count_tokens(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(len(text_of(m.get("content")).split()) + 3 for m in messages if isinstance(m, dict))


def demo_transcript(audio: bytes, content_type: str) -> tuple[str, float]:
    """What the demo model "hears": the WAV's length and format, or the file's size and hash."""
    summary = wav_summary(audio)
    if summary is not None:
        seconds, rate, channels = summary
        return (f"demo transcript: {seconds:g} s of audio, {rate} Hz, {channels} "
                f"channel{'s' if channels != 1 else ''}"), seconds
    digest = hashlib.sha256(audio).hexdigest()[:12]
    return f"demo transcript: {len(audio)} bytes of {content_type or 'audio'}, sha256 {digest}", 0.0


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}{separator}{rest % 1000:03d}"


class DemoBackend:
    """A built-in model that streams a fixed reply word by word at ``rate`` words/s,
    draws a pattern of the prompt's colours for ``images``, and "transcribes"
    audio by reading its header for ``transcribe``."""

    capabilities: tuple[str, ...] = (wire.OP_CHAT, wire.OP_IMAGES, wire.OP_TRANSCRIBE)
    image_models: tuple[str, ...] = (DEMO_IMAGE_MODEL,)
    transcribe_models: tuple[str, ...] = (DEMO_TRANSCRIBE_MODEL,)

    def __init__(self, rate: float = 20.0, model: str = DEMO_MODEL):
        self.rate = rate
        self.model = model

    async def models(self) -> list[str]:
        return [self.model]

    def _words(self, body: dict[str, Any]) -> tuple[list[str], str]:
        words = demo_reply(body.get("messages"))
        # The tighter of max_tokens and max_completion_tokens (OpenAI's newer
        # name); a value that is not a positive count sets no limit.
        asked = (body.get("max_tokens"), body.get("max_completion_tokens"))
        limit = min((n for n in asked if isinstance(n, int) and not isinstance(n, bool) and n > 0),
                    default=len(words))
        return words[:limit], ("stop" if limit >= len(words) else "length")

    def _usage(self, body: dict[str, Any], completion: int) -> dict[str, int]:
        prompt = _count_tokens(body.get("messages"))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        words, finish = self._words(body)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": self.model, "system_fingerprint": None}

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            return orjson.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

        yield [chunk({"role": "assistant", "content": ""})]
        delay = 1.0 / self.rate if self.rate > 0 else 0.0
        for word in words:
            if delay:
                await asyncio.sleep(delay)
            yield [chunk({"content": word})]
        tail = [chunk({}, finish)]
        options = body.get("stream_options")  # an object or null; anything else is no options
        if isinstance(options, dict) and options.get("include_usage") is True:
            tail.append(orjson.dumps({**base, "choices": [], "usage": self._usage(body, len(words))}))
        yield tail

    async def complete(self, body: dict[str, Any]) -> bytes:
        words, finish = self._words(body)
        if self.rate > 0:
            await asyncio.sleep(len(words) / self.rate)
        return orjson.dumps({
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                         "finish_reason": finish}],
            "usage": self._usage(body, len(words)),
        })

    async def images(self, body: dict[str, Any]) -> bytes:
        width, height = demo_image_size(body.get("size"))
        n = body.get("n", 1)
        if n is None:
            n = 1
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_DEMO_IMAGES:
            raise BackendError(422, f"n must be a whole number from 1 to {MAX_DEMO_IMAGES} (got {n!r})", "invalid_n")
        prompt = body.get("prompt")
        prompt = prompt if isinstance(prompt, str) else ""

        def draw() -> list[str]:
            return [base64.b64encode(demo_image(prompt, width, height, i)).decode() for i in range(n)]

        # Compressing a large picture takes milliseconds: off the event loop,
        # so the agent's other streams and its heartbeat do not wait for it.
        pictures = await asyncio.to_thread(draw)
        return orjson.dumps({
            "created": int(time.time()),
            "data": [{"b64_json": picture, "revised_prompt": prompt} for picture in pictures],
        })

    def check_transcribe(self, body: dict[str, Any]) -> None:
        check_transcribe_body(body, self.transcribe_models)

    async def transcribe(self, body: dict[str, Any], audio: bytes) -> bytes:
        self.check_transcribe(body)
        text, seconds = demo_transcript(audio, str(body.get("content_type") or ""))
        response_format = body.get("response_format", "json")
        end = seconds or 1.0
        if response_format == "srt":
            text = f"1\n{_timestamp(0, ',')} --> {_timestamp(end, ',')}\n{text}\n"
        elif response_format == "vtt":
            text = f"WEBVTT\n\n{_timestamp(0, '.')} --> {_timestamp(end, '.')}\n{text}\n"
        if response_format != "verbose_json":
            return orjson.dumps({"text": text})
        language = body.get("language") if isinstance(body.get("language"), str) else "en"
        return orjson.dumps({"task": "transcribe", "language": language, "duration": seconds, "text": text,
                             "segments": [{"id": 0, "start": 0.0, "end": seconds, "text": text}]})

    async def aclose(self) -> None:
        pass
