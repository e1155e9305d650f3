"""Where answers come from: a local OpenAI-compatible server, or the demo model.

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

The OpenAI backend talks to its model server with two HTTP clients, on
purpose: chat completions, the path every token takes, go through aiohttp,
whose C parser (llhttp) costs a quarter of httpx's CPU per request and
about half per streamed event (measured in bench/README.md, "Speed");
everything else (models, images, transcription, image downloads) stays on
httpx, where the cost does not matter and redirects, multipart and the
tests' mock transports are simplest.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import re
import struct
import time
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
import httpx
import orjson

import wire


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
#: Fields of a ``transcribe`` body passed on to the model server as form fields.
TRANSCRIBE_FIELDS = ("model", "language", "prompt", "response_format", "temperature")


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


# -- OpenAI-compatible upstream -------------------------------------------------


#: The largest image the agent downloads when a model server answers with a
#: URL: the agent holds it in memory, and the caller gets it base64-encoded.
MAX_IMAGE_DOWNLOAD = 20 * 1024 * 1024


def _upstream_error(status: int, payload: bytes) -> BackendError:
    message = (wire.error_message(payload) or payload.decode(errors="replace")[:500]
               or f"upstream answered HTTP {status}")
    if status == 404:
        # A model the server does not have (Ollama says 404) or an
        # --upstream-url with the wrong path.  Callers read a 404 from the
        # relay as "no such instance", so it must not travel as one.
        return BackendError(502, f"model server: {message}", "upstream_not_found")
    # The caller's mistakes (4xx) keep their status; the model server's own
    # failures become 502, since for the caller the gateway's upstream failed.
    # So do the agent's credentials being refused (401/403/407): the caller
    # cannot fix those, the owner can.
    mapped = status if 400 <= status < 500 and status not in (401, 403, 407) else 502
    return BackendError(mapped, f"model server: {message}", "upstream_error")


def _unreachable(exc: Exception) -> BackendError:
    return BackendError(502, f"model server unreachable: {type(exc).__name__}: {exc}")


def _env_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTP_PROXY``/``HTTPS_PROXY``, ``NO_PROXY``), if any."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.hostname and urllib.request.proxy_bypass(parsed.hostname):
        return None
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parsed.scheme) or proxies.get("all") or None
    if proxy is not None and urllib.parse.urlsplit(proxy).scheme not in ("http", "https"):
        # httpx would need its socks extra too; aiohttp speaks HTTP proxies only.
        kind = urllib.parse.urlsplit(proxy).scheme
        raise BackendError(502, f"the proxy for {url} ({kind}://) is not an HTTP proxy; the agent reaches "
                                "its model server through HTTP(S) proxies only", "proxy_unsupported")
    return proxy


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


class OpenAIBackend:
    """Any server that speaks OpenAI's ``/chat/completions`` and ``/models``.

    Given ``image_models``, also its ``/images/generations``: only then does
    the agent declare ``images``, since ``/models`` does not say which of a
    server's models draw.  Given ``transcribe_models``, likewise its
    ``/audio/transcriptions`` (``transcribe``).
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, models: list[str] | None = None,
                 image_models: list[str] | None = None, transcribe_models: list[str] | None = None,
                 timeout: float = 600.0, transport: httpx.AsyncBaseTransport | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._configured_models = models or []
        self.image_models: tuple[str, ...] = tuple(image_models or ())
        self.transcribe_models: tuple[str, ...] = tuple(transcribe_models or ())
        self.capabilities: tuple[str, ...] = (
            wire.OP_CHAT,
            *((wire.OP_IMAGES,) if self.image_models else ()),
            *((wire.OP_TRANSCRIBE,) if self.transcribe_models else ()),
        )
        self._timeout = timeout
        self._headers = {"Content-Type": "application/json", **headers}
        self._proxy = _env_proxy(self.base_url)  # a proxy it cannot use is refused now, not per request
        # Created on first use: an aiohttp session belongs to the running loop.
        self._chat: aiohttp.ClientSession | None = None
        self._api_headers = headers
        self._transport = transport
        # Both clients are made on first use, and again after aclose(): a backend
        # outlives an agent's connection (tests run several agents on one).
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None or self._client.is_closed:
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                headers=self._api_headers,
                # No read timeout on a stream: a model may think for a long time;
                # the relay enforces the first-chunk and idle timeouts.
                timeout=httpx.Timeout(self._timeout, connect=10.0, read=None),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
                transport=self._transport,
            )
        return self._client

    async def models(self) -> list[str]:
        if self._configured_models:
            return list(self._configured_models)
        try:
            response = await self.client.get("/models")
            response.raise_for_status()
            data = response.json().get("data", [])
            names = [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            raise BackendError(502, f"cannot list models at {self.base_url}/models: {exc}") from exc
        if not names:
            raise BackendError(502, f"{self.base_url}/models lists no models; pass --model")
        return names

    def _chat_session(self) -> aiohttp.ClientSession:
        if self._chat is None or self._chat.closed:
            self._chat = aiohttp.ClientSession(
                # No limit on connections: the relay bounds the agent's
                # concurrent requests; idle ones are kept for the next request.
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                headers=self._headers,
                # No read timeout on a stream: a model may think for a long
                # time; the relay enforces the first-chunk and idle timeouts.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0),
                # As httpx does: HTTP(S)_PROXY / NO_PROXY from the environment,
                # read once here (aiohttp's trust_env reads them, and ~/.netrc
                # in a thread, on every request).
                proxy=self._proxy,
                # Our own JSON (orjson) and no cookie jar: each request stands alone.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._chat

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        payload = orjson.dumps({**body, "stream": True})
        try:
            async with self._chat_session().post(f"{self.base_url}/chat/completions", data=payload) as response:
                if response.status >= 400:
                    raise _upstream_error(response.status, await response.read())
                finished = False
                try:
                    buffer = bytearray()
                    done = False
                    async for data in response.content.iter_any():
                        if done:
                            continue  # read the body to its end so the connection is reused
                        events = wire.iter_sse_data(buffer, data)
                        if b"[DONE]" in events:
                            events = events[: events.index(b"[DONE]")]
                            done = True
                        if events:
                            yield events
                    finished = True
                finally:
                    if not finished:
                        # Cancelled, or the consumer stopped reading: close the
                        # connection, which is what tells the model server to stop.
                        response.close()
        except aiohttp.ClientError as exc:
            raise _unreachable(exc) from exc

    async def _post(self, path: str, **content: Any) -> httpx.Response:
        """One upstream call that answers one body; its failures as BackendErrors."""
        try:
            response = await self.client.post(path, **content)
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from exc
        if response.status_code >= 400:
            raise _upstream_error(response.status_code, response.content)
        return response

    async def complete(self, body: dict[str, Any]) -> bytes:
        payload = orjson.dumps({**body, "stream": False})
        try:
            async with self._chat_session().post(f"{self.base_url}/chat/completions", data=payload,
                                                 timeout=aiohttp.ClientTimeout(total=self._timeout,
                                                                               sock_connect=10.0)) as response:
                answer = await response.read()
        except aiohttp.ClientError as exc:  # its connect timeout too: unreachable, as on the stream path
            raise _unreachable(exc) from exc
        except TimeoutError:
            raise BackendError(504, f"model server: no answer within {self._timeout:g} s",
                               "upstream_timeout") from None
        if response.status >= 400:
            raise _upstream_error(response.status, answer)
        return answer

    async def images(self, body: dict[str, Any]) -> bytes:
        # The answer travels as one JSON body: never ask for partial images.
        response = await self._post("/images/generations", json={k: v for k, v in body.items() if k != "stream"})
        try:
            answer = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            answer = None
        items = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise BackendError(502, "model server: /images/generations answered no ImagesResponse "
                                    "(a JSON object with a data list)", "upstream_error")
        if all(isinstance(item.get("b64_json"), str) for item in items):
            return response.content  # already what the relay wants: pass it on untouched
        converted = []
        for item in items:
            if isinstance(item.get("b64_json"), str):
                converted.append(item)
                continue
            url = item.get("url")
            if not isinstance(url, str) or not url:
                raise BackendError(502, "model server: an image came with neither b64_json nor url",
                                   "upstream_error")
            rest = {k: v for k, v in item.items() if k != "url"}
            converted.append({**rest, "b64_json": await self._fetch_b64(url)})
        return orjson.dumps({**answer, "data": converted})

    def check_transcribe(self, body: dict[str, Any]) -> None:
        check_transcribe_body(body, self.transcribe_models)

    async def transcribe(self, body: dict[str, Any], audio: bytes) -> bytes:
        """POST the audio to ``/audio/transcriptions`` as multipart; one ``{"text": ...}`` JSON body.

        ``json`` and ``verbose_json`` answers pass through as they are (after
        a check that they hold a ``text``); ``text``, ``srt`` and ``vtt``
        ones are the document itself, which goes back as its ``text``: the
        relay's answer is always one JSON body, and it unwraps these for the
        caller.
        """
        self.check_transcribe(body)
        fields = {name: str(body[name]) for name in TRANSCRIBE_FIELDS if body.get(name) is not None}
        filename = body.get("filename") or "audio"
        content_type = body.get("content_type") or "application/octet-stream"
        response = await self._post("/audio/transcriptions", data=fields,
                                    files={"file": (filename, audio, content_type)})
        if body.get("response_format", "json") in ("text", "srt", "vtt"):
            return orjson.dumps({"text": response.text})
        try:
            answer = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict) or not isinstance(answer.get("text"), str):
            raise BackendError(502, "model server: /audio/transcriptions answered no JSON object with a text",
                               "upstream_error")
        return response.content

    async def _fetch_b64(self, url: str) -> str:
        """The image at ``url`` (on the model server's machine, typically), base64-encoded.

        The URL means nothing to the caller: it names the owner's machine, or
        a store the model server signed for the agent alone.
        """
        if url.startswith("data:"):
            # Inline already: no download, but checked, since the caller gets it as it is.
            header, _, payload = url.partition(",")
            try:
                if header.endswith(";base64") and payload:
                    return base64.b64encode(base64.b64decode(payload, validate=True)).decode()
            except ValueError:
                pass
            raise BackendError(502, "model server: an image data URL that is not base64", "upstream_error")
        try:
            request = self.client.build_request("GET", url, timeout=httpx.Timeout(self._timeout, connect=10.0))
            if _origin(request.url) != _origin(self.client.base_url):
                # The upstream's key is for the upstream, not for wherever it stores images.
                request.headers.pop("Authorization", None)
            response = await self.client.send(request, stream=True, follow_redirects=True)
            try:
                if response.status_code >= 400:
                    raise BackendError(502, f"model server: downloading an image from {_where(request.url)} "
                                            f"answered HTTP {response.status_code}", "upstream_error")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > MAX_IMAGE_DOWNLOAD:
                    raise _too_large(request.url)
                data = bytearray()
                async for piece in response.aiter_bytes():
                    data += piece
                    if len(data) > MAX_IMAGE_DOWNLOAD:
                        raise _too_large(request.url)
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            # Not the URL, nor httpx's message (which quotes it): a signed URL's query is a credential.
            raise BackendError(502, f"model server: cannot download an image from {_where(url)}: "
                                    f"{type(exc).__name__}", "upstream_error") from exc
        return base64.b64encode(data).decode()

    async def aclose(self) -> None:
        """Close both clients' connections (the backend stays usable: they are made again when needed)."""
        chat, self._chat = self._chat, None
        if chat is not None:
            await chat.close()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def _where(url: httpx.URL | str) -> str:
    """Where an image URL points, fit for a caller's error message: scheme and host, no path or query
    (the model server may have signed it for the agent alone)."""
    try:
        parsed = httpx.URL(str(url))
    except (httpx.InvalidURL, ValueError):
        return "an invalid URL"
    return f"{parsed.scheme}://{parsed.host}" if parsed.host else "an invalid URL"


def _too_large(url: httpx.URL | str) -> BackendError:
    return BackendError(502, f"model server: an image from {_where(url)} is larger than "
                             f"{MAX_IMAGE_DOWNLOAD // (1024 * 1024)} MiB", "upstream_error")


# -- demo model ----------------------------------------------------------------

DEMO_MODEL = "demo"
DEMO_IMAGE_MODEL = "demo-image"
DEMO_TRANSCRIBE_MODEL = "demo-transcribe"
DEMO_IMAGE_SIZE = (256, 256)
MAX_DEMO_IMAGE_SIDE = 1024
#: As many as the relay lets a caller ask for (``ImageRequest.n``, OpenAI's own
#: limit): the demo must answer every request the relay's document calls valid.
MAX_DEMO_IMAGES = 10


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))


def encode_png(width: int, height: int, rows: list[bytes]) -> bytes:
    """An 8-bit RGB PNG of ``rows`` (each ``3 * width`` bytes of pixels), by hand: no imaging library."""
    if len(rows) != height or any(len(row) != 3 * width for row in rows):
        raise ValueError("rows do not match the image size")
    # Filter type 0 (none) on every scanline: the pattern compresses well as it is.
    raw = b"".join(b"\x00" + row for row in rows)
    header = struct.pack("!IIBBBBB", width, height, 8, 2, 0, 0, 0)  # depth 8, RGB, deflate, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(raw, 6)) + _png_chunk(b"IEND", b""))


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


def wav_summary(audio: bytes) -> tuple[float, int, int] | None:
    """(seconds, sample rate, channels) of a PCM WAV file, read from its header; None if it is not one.

    Walks the RIFF chunks by hand (the ``wave`` module would do, but only
    for PCM and only on a file it can fully open): ``fmt `` gives the rate,
    the channels and the bytes per second, ``data`` the length.
    """
    if len(audio) < 12 or audio[:4] != b"RIFF" or audio[8:12] != b"WAVE":
        return None
    stream = io.BytesIO(audio)
    stream.seek(12)
    rate = channels = byte_rate = 0
    while True:
        header = stream.read(8)
        if len(header) < 8:
            return None
        kind, size = header[:4], struct.unpack("<I", header[4:])[0]
        if kind == b"fmt ":
            fmt = stream.read(size)
            if len(fmt) < 16:
                return None
            _, channels, rate, byte_rate = struct.unpack("<HHII", fmt[:12])
        elif kind == b"data":
            if not rate or not channels or not byte_rate:
                return None  # data before its format: not a file we can read
            # A streamed WAV may say 0 or 0xFFFFFFFF: count what is there.
            length = min(size, len(audio) - stream.tell())
            return length / byte_rate, rate, channels
        else:
            stream.seek(size + (size & 1), io.SEEK_CUR)  # chunks are padded to even sizes


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
