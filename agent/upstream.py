"""The OpenAI-compatible backend: a model server on the agent's side that speaks OpenAI's API.

The backend talks to its model server with two HTTP clients, on
purpose: chat completions, the path every token takes, go through aiohttp,
whose C parser (llhttp) costs a quarter of httpx's CPU per request and
about half per streamed event (measured in bench/README.md, "Speed");
everything else (models, images, transcription, image downloads) stays on
httpx, where the cost does not matter and redirects, multipart and the
tests' mock transports are simplest.
"""

from __future__ import annotations

import base64
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import orjson

import wire

from .backends import BackendError, check_transcribe_body

#: The largest image the agent downloads when a model server answers with a
#: URL: the agent holds it in memory, and the caller gets it base64-encoded.
MAX_IMAGE_DOWNLOAD = 20 * 1024 * 1024
#: Fields of a ``transcribe`` body passed on to the model server as form fields.
TRANSCRIBE_FIELDS = ("model", "language", "prompt", "response_format", "temperature")


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
