"""A low-overhead load generator: raw asyncio streams, HTTP/1.1, minimal SSE parsing.

A generic client (httpx, aiohttp, the ``openai`` SDK) spends tens of
microseconds per chunk on line splitting, decoding and object creation; at
tens of thousands of chunks per second that is more than the relay we want to
measure.  This client does only what the figures need:

* writes the request bytes itself (keep-alive, one request at a time per
  connection, no pipelining);
* decodes ``Transfer-Encoding: chunked`` (or a ``Content-Length`` body) with
  ``bytearray.find`` and slicing;
* counts complete SSE events (``\\n\\n`` separators, counted with
  ``bytes.count`` over each socket read, never one Python step per event),
  notes ``data: [DONE]`` and ``data: {"error"...}`` events, and timestamps
  each read (all events of one read share its timestamp).

Its own cost is measured by the runner (CPU seconds of this process per 100k
chunks on the direct path, and a comparison with httpx on the same path);
see ``bench/README.md``.

Only loopback addresses are accepted as targets.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import dataclass, field

import orjson

_CLOCK = time.perf_counter
_DONE = b"data: [DONE]\n\n"


class LoadgenError(Exception):
    """The server did something this client does not understand (or hung up)."""


def check_loopback(host: str) -> None:
    """The load generator must never be aimed at anything but this machine."""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"the load generator only talks to loopback addresses, not {host!r}")


@dataclass(slots=True)
class StreamResult:
    """What one request saw.  Times are seconds, relative to the request's start."""

    status: int = 0
    ttfc: float | None = None  # time to the first SSE event (= first content chunk)
    total: float = 0.0  # time to the end of the response
    events: int = 0  # SSE events before [DONE] (content chunks + the finish chunk)
    done: bool = False  # saw data: [DONE]
    error: str | None = None  # HTTP error body, error event, or exception text
    reads: list[tuple[float, int]] | None = None  # (time, events completed in this read)
    body: bytes = b""  # non-SSE bodies (errors, JSON)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and self.error is None


def chat_body(n: int, rate: float = 0.0, size: int = 16, *, model: str = "bench", stream: bool = True,
              batch: int = 1) -> bytes:
    """A chat request asking the bench upstream for ``n`` chunks at ``rate``/s of ``size`` chars."""
    return orjson.dumps({
        "model": model,
        "messages": [{"role": "user", "content": "bench"}],
        "stream": stream,
        # The stream's length comes from metadata (the fake upstream ignores
        # max_tokens); leaving max_tokens to the relay's default keeps long
        # streams under any max_tokens cap the relay enforces.
        "metadata": {"bench_n": n, "bench_rate": rate, "bench_size": size, "bench_batch": batch},
    })


class HTTPConnection:
    """One keep-alive HTTP/1.1 connection to a loopback server."""

    def __init__(self, host: str, port: int):
        check_loopback(host)
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._host_header = f"{host}:{port}".encode()

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    async def close(self) -> None:
        writer, self.writer, self.reader = self.writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ConnectionError):
                pass

    async def __aenter__(self) -> HTTPConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _request_bytes(self, method: str, path: str, body: bytes | None) -> bytes:
        head = [f"{method} {path} HTTP/1.1".encode(), b"Host: " + self._host_header]
        if body is not None:
            head += [b"Content-Type: application/json", b"Content-Length: " + str(len(body)).encode()]
        head.append(b"Accept: text/event-stream, application/json")
        return b"\r\n".join(head) + b"\r\n\r\n" + (body or b"")

    async def request(self, method: str, path: str, body: bytes | None = None, *, record_reads: bool = False,
                      result: StreamResult | None = None) -> StreamResult:
        """Send one request and read its whole response (SSE or not).

        Pass ``result`` to watch a response in progress (e.g. one that never ends).
        """
        if self.writer is None:
            await self.connect()
        reader, writer = self.reader, self.writer
        assert reader is not None and writer is not None
        if result is None:
            result = StreamResult()
        if record_reads and result.reads is None:
            result.reads = []
        t0 = _CLOCK()
        writer.write(self._request_bytes(method, path, body))
        try:
            await self._read_response(reader, result, t0)
        except BaseException:
            await self.close()  # the connection is in an unknown state
            raise
        result.total = _CLOCK() - t0
        return result

    async def _read_response(self, reader: asyncio.StreamReader, result: StreamResult, t0: float) -> None:
        buf = bytearray()
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            data = await reader.read(65536)
            if not data:
                raise LoadgenError("connection closed before the response headers")
            buf += data
        head = bytes(buf[:end]).split(b"\r\n")
        del buf[: end + 4]
        try:
            result.status = int(head[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise LoadgenError(f"bad status line {head[0][:80]!r}") from None
        chunked, length, close, sse = False, -1, False, False
        for line in head[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"content-length":
                length = int(value)
            elif name == b"connection":
                close = value == b"close"
            elif name == b"content-type":
                sse = value.startswith(b"text/event-stream")
        sink = _SSESink(result, t0) if sse else None
        body = bytearray()

        def feed(data: bytes | bytearray) -> None:
            if sink is not None:
                sink.feed(data)
            else:
                body.extend(data)

        if chunked:
            await _read_chunked(reader, buf, feed)
        elif length >= 0:
            while len(buf) < length:
                data = await reader.read(65536)
                if not data:
                    raise LoadgenError("connection closed inside the body")
                buf += data
            feed(buf[:length])
        else:
            feed(buf)
            while data := await reader.read(65536):
                feed(data)
            close = True
        if sink is None:
            result.body = bytes(body)
            if result.status >= 400:
                result.error = result.body[:300].decode(errors="replace")
        if close:
            await self.close()


async def _read_chunked(reader: asyncio.StreamReader, raw: bytearray, feed) -> None:
    """Decode a chunked body (RFC 9112 s7.1), feeding each data piece as it arrives."""
    data_left = 0  # bytes of the current chunk's data still to come
    crlf_left = 0  # bytes of the CRLF after the chunk data still to skip
    while True:
        while raw:
            if data_left:
                take = min(len(raw), data_left)
                feed(raw[:take])
                del raw[:take]
                data_left -= take
                if data_left:
                    break
                crlf_left = 2
            if crlf_left:
                skip = min(crlf_left, len(raw))
                del raw[:skip]
                crlf_left -= skip
                if crlf_left:
                    break
            if not raw:
                break
            i = raw.find(b"\r\n")
            if i < 0:
                break
            size = int(bytes(raw[:i]).split(b";", 1)[0], 16)
            del raw[: i + 2]
            if size == 0:
                # last chunk: skip (empty) trailers up to the final CRLF
                while raw.find(b"\r\n") < 0:
                    more = await reader.read(65536)
                    if not more:
                        return
                    raw += more
                return
            data_left = size
        more = await reader.read(65536)
        if not more:
            raise LoadgenError("connection closed inside a chunked body")
        raw += more


class _SSESink:
    """Counts complete events; all events completed by one read share its timestamp."""

    __slots__ = ("result", "t0", "pending")

    def __init__(self, result: StreamResult, t0: float):
        self.result = result
        self.t0 = t0
        self.pending = bytearray()

    def feed(self, data: bytes | bytearray) -> None:
        pending = self.pending
        pending += data
        end = pending.rfind(b"\n\n")
        if end < 0:
            return
        now = _CLOCK() - self.t0
        block = bytes(pending[: end + 2])
        del pending[: end + 2]
        n = block.count(b"\n\n")
        result = self.result
        if block.endswith(_DONE):
            result.done = True
            n -= 1
        if b'data: {"error"' in block:
            i = block.find(b'data: {"error"')
            result.error = block[i + 6 : block.find(b"\n\n", i)].decode(errors="replace")[:300]
        if n <= 0:
            return
        if result.ttfc is None:
            result.ttfc = now
        result.events += n
        if result.reads is not None:
            result.reads.append((now, n))


async def get_json(host: str, port: int, path: str) -> tuple[int, object]:
    """One GET on a fresh connection; returns (status, parsed JSON or None)."""
    async with HTTPConnection(host, port) as conn:
        result = await conn.request("GET", path)
    try:
        return result.status, orjson.loads(result.body) if result.body else None
    except orjson.JSONDecodeError:
        return result.status, None


async def post_json(host: str, port: int, path: str, obj: object) -> tuple[int, object]:
    async with HTTPConnection(host, port) as conn:
        result = await conn.request("POST", path, orjson.dumps(obj))
    try:
        return result.status, orjson.loads(result.body) if result.body else None
    except orjson.JSONDecodeError:
        return result.status, None


# -- derived figures -------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an unsorted list; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def gap_excess(reads: list[tuple[float, int]], interval: float) -> list[float]:
    """Per chunk after the first: arrival gap minus the nominal interval (seconds).

    A read that completes k events gives one real gap and k - 1 zero gaps
    (chunks that arrived together), so coalescing shows up as -interval, and a
    stall as a large positive excess on the chunk that waited.
    """
    out: list[float] = []
    prev = None
    for t, n in reads:
        if prev is not None:
            out.append(t - prev - interval)
            n -= 1
        out.extend([-interval] * (n - 1 if prev is None else n))
        prev = t
    return out


@dataclass
class ConcurrentResult:
    streams: int
    chunks: int
    rate: float
    completed: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    excess: list[float] = field(default_factory=list)  # seconds, see gap_excess
    ttfc: list[float] = field(default_factory=list)
    wall: float = 0.0
    unfinished: int = 0  # streams still running at the timeout (counted in errors too)
    # How the errors split (issue 21): refused up front (503, nothing streamed), cut mid-way
    # (200 and then an error event or an early end), anything else; each counted by its error.
    refused: int = 0
    cut: int = 0
    cut_reasons: dict[str, int] = field(default_factory=dict)
    cut_after_events: list[int] = field(default_factory=list)
    other_statuses: dict[str, int] = field(default_factory=dict)
    refused_ttfb: list[float] = field(default_factory=list)  # seconds to a 503's end


def _error_code(error: str | None) -> str:
    """The ``code`` of an OpenAI error body or SSE error event, else the text's start."""
    if not error:
        return "(ended without an error)"
    try:
        body = orjson.loads(error)
        inner = body.get("error", body) if isinstance(body, dict) else {}
        if isinstance(inner, dict) and inner.get("code"):
            return str(inner["code"])
    except orjson.JSONDecodeError:
        pass
    return error[:60]


def _classify(out: ConcurrentResult, result: StreamResult) -> None:
    if result.status == 503 and not result.events:
        out.refused += 1
        out.refused_ttfb.append(result.total)
    elif result.status == 200:
        out.cut += 1
        code = _error_code(result.error)
        out.cut_reasons[code] = out.cut_reasons.get(code, 0) + 1
        out.cut_after_events.append(result.events)
    else:
        status = str(result.status)
        out.other_statuses[status] = out.other_statuses.get(status, 0) + 1


async def run_concurrent(host: str, port: int, path: str, streams: int, chunks: int, rate: float, *,
                         size: int = 16, ramp: float = 1.0, timeout: float = 120.0) -> ConcurrentResult:
    """``streams`` simultaneous requests, each ``chunks`` chunks at ``rate``/s.

    Starts are spread evenly over ``ramp`` seconds (callers do not arrive in
    the same microsecond); every stream has its own connection.
    """
    out = ConcurrentResult(streams, chunks, rate)
    body = chat_body(chunks, rate, size)
    interval = 1.0 / rate if rate > 0 else 0.0
    expected = chunks + 1  # content chunks + the finish chunk

    partial: dict[int, StreamResult] = {}

    async def one(i: int) -> None:
        await asyncio.sleep(ramp * i / max(streams, 1))
        conn = HTTPConnection(host, port)
        partial[i] = result = StreamResult(reads=[])
        try:
            await conn.request("POST", path, body, result=result)
        except (OSError, LoadgenError, asyncio.IncompleteReadError) as exc:
            out.errors += 1
            if len(out.error_samples) < 5:
                out.error_samples.append(f"{type(exc).__name__}: {exc}")
            return
        finally:
            await conn.close()
        if result.ok and result.events == expected:
            out.completed += 1
            out.excess.extend(gap_excess(result.reads or [], interval))
            if result.ttfc is not None:
                out.ttfc.append(result.ttfc)
        else:
            out.errors += 1
            _classify(out, result)
            if len(out.error_samples) < 5:
                out.error_samples.append(
                    f"status {result.status}, {result.events}/{expected} events, done={result.done}: {result.error}"
                )

    t0 = _CLOCK()
    tasks = {i: asyncio.ensure_future(one(i)) for i in range(streams)}
    try:
        _, pending = await asyncio.wait(tasks.values(), timeout=timeout)
        if pending:
            stuck = [partial[i] for i, t in tasks.items() if not t.done() and i in partial]
            out.errors += len(pending)
            out.unfinished = len(pending)
            headers = sum(1 for r in stuck if r.status)
            progress = sorted(r.events for r in stuck)
            out.error_samples.insert(0, (
                f"{len(pending)} streams unfinished after {timeout:.0f}s: {headers} had response headers; "
                f"events received min/median/max {progress[0]}/{progress[len(progress) // 2]}/{progress[-1]}"
                if progress else f"{len(pending)} streams unfinished after {timeout:.0f}s"))
    finally:
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    out.wall = _CLOCK() - t0
    return out
