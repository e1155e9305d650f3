"""A fixed fake OpenAI-compatible model server, lean enough not to be the bottleneck.

Raw asyncio (an :class:`asyncio.Protocol`, no framework, no h11): it parses
just enough HTTP/1.1 to serve

* ``GET  /v1/models``            -> one model, ``bench``;
* ``POST /v1/chat/completions``  -> ``stream: true``: N ``chat.completion.chunk``
  events then ``data: [DONE]``, chunked transfer encoding, keep-alive;
  ``stream: false``: one ``chat.completion`` body.

What to stream is read from the request's ``metadata`` (the relay forwards it
to the agent untouched, and the agent to its upstream), so one server process
serves every scenario of the benchmark::

    {"metadata": {"bench_n": 100, "bench_rate": 20, "bench_size": 16}}

``bench_n`` content chunks (default 10), at ``bench_rate`` chunks per second
(0 = as fast as the socket takes them), each carrying ``bench_size``
characters of content (default 16).  Paced chunks are scheduled on absolute
deadlines (``t0 + k / rate``) with ``loop.call_at``, so timer drift does not
accumulate and no task is created per stream.  Unpaced chunks are written one
event per ``transport.write`` (as a model server flushes every token; set
``bench_batch`` to write that many events per write instead) in a tight loop
that pauses when the transport's buffer is full (``pause_writing``).

The first event already carries content (``delta.role`` and ``delta.content``),
so "time to first content chunk" is the time to the first event.

Run it alone with ``python -m bench.upstream --port 9000``; it prints
``ready <port>`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import orjson

MODEL = "bench"
_MAX_HEADER = 64 * 1024

_HEAD_SSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_DONE = b"data: [DONE]\n\n"


def chunk_event(content: str, *, first: bool = False, finish: str | None = None) -> bytes:
    """One SSE event carrying a chat.completion.chunk, as OpenAI formats it."""
    delta: dict = {"role": "assistant", "content": content} if first else ({"content": content} if content else {})
    obj = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _chunked(payload: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(payload), payload)


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + content_type
        + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def _int(meta: dict, name: str, default: int, lo: int = 0) -> int:
    value = meta.get(name, default)
    return max(lo, int(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


class UpstreamProtocol(asyncio.Protocol):
    """One client connection; requests are served one after another (keep-alive)."""

    def __init__(self, server: UpstreamServer):
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.body_needed = -1  # > -1 while reading a body of that length
        self.head = b""
        self.streaming = False  # a response is being written; later requests wait in buf
        self.paused = False
        self.timer: asyncio.TimerHandle | None = None
        # current stream
        self.event = b""
        self.remaining = 0
        self.sent = 0
        self.rate = 0.0
        self.batch = 1
        self.t0 = 0.0

    # -- connection ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections -= 1
        if self.streaming:
            self.server.aborted += 1
        self.streaming = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.streaming and self.rate <= 0:
            self._write_burst()

    # -- request parsing -------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.streaming:
            self._parse()

    def _parse(self) -> None:
        while not self.streaming:
            if self.body_needed < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > _MAX_HEADER:
                        self._fail(b"431 Request Header Fields Too Large")
                    return
                self.head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                self.body_needed = 0
                for line in self.head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        self.body_needed = int(value.strip() or b"0")
            if len(self.buf) < self.body_needed:
                return
            body = bytes(self.buf[: self.body_needed])
            del self.buf[: self.body_needed]
            self.body_needed = -1
            self._handle(self.head, body)

    def _fail(self, status: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        self.transport.close()
        self.streaming = True  # stop parsing

    def _handle(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        request_line = head.split(b"\r\n", 1)[0].split(b" ")
        method, target = [*request_line, b"", b""][:2]
        path = target.split(b"?", 1)[0].rstrip(b"/")
        if method == b"GET" and path.endswith(b"/models"):
            models = {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "bench"}]}
            self.transport.write(_response("200 OK", orjson.dumps(models)))
            return
        if method != b"POST" or not path.endswith(b"/chat/completions"):
            self.transport.write(_response("404 Not Found", b'{"error":{"message":"not found","type":"not_found"}}'))
            return
        try:
            request = orjson.loads(body)
            meta = request.get("metadata") or {}
        except (orjson.JSONDecodeError, AttributeError):
            error = b'{"error":{"message":"bad json","type":"invalid_request_error"}}'
            self.transport.write(_response("400 Bad Request", error))
            return
        self.server.requests += 1
        n = _int(meta, "bench_n", 10, 1)
        size = _int(meta, "bench_size", 16, 0)
        rate = float(meta.get("bench_rate", 0) or 0)
        self.batch = _int(meta, "bench_batch", 1, 1)
        content = "x" * size
        if request.get("stream") is False:
            completion = {
                "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": MODEL,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content * n},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
            }
            self.transport.write(_response("200 OK", orjson.dumps(completion)))
            return
        self.streaming = True
        self.event = chunk_event(content)
        self.remaining = n
        self.sent = 0
        self.rate = rate
        self.transport.write(_HEAD_SSE + _chunked(chunk_event(content, first=True)))
        self.remaining -= 1
        self.sent = 1
        if self.remaining == 0:
            self._finish()
        elif rate > 0:
            self.t0 = self.loop.time()
            self.timer = self.loop.call_at(self.t0 + 1 / rate, self._tick)
        else:
            self._write_burst()

    # -- streaming ---------------------------------------------------------------

    def _tick(self) -> None:
        self.timer = None
        if not self.streaming or self.transport is None or self.transport.is_closing():
            return
        self.transport.write(_chunked(self.event))
        self.sent += 1
        self.remaining -= 1
        if self.remaining == 0:
            self._finish()
        else:
            self.timer = self.loop.call_at(self.t0 + self.sent / self.rate, self._tick)

    def _write_burst(self) -> None:
        """Unpaced: write batches of events until done or the transport pushes back."""
        transport = self.transport
        assert transport is not None
        batch = self.batch
        block = _chunked(self.event * batch)
        while self.remaining and not self.paused and not transport.is_closing():
            if self.remaining >= batch:
                transport.write(block)
                self.remaining -= batch
            else:
                transport.write(_chunked(self.event * self.remaining))
                self.remaining = 0
        if self.remaining == 0 and self.streaming and not transport.is_closing():
            self._finish()

    def _finish(self) -> None:
        assert self.transport is not None
        self.transport.write(_chunked(chunk_event("", finish="stop") + _DONE) + b"0\r\n\r\n")
        self.streaming = False
        self.server.completed += 1
        if self.buf:  # a pipelined request already waiting
            self.loop.call_soon(self._parse)


class UpstreamServer:
    """Start/stop the fake upstream inside the current event loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port
        self.requests = self.completed = self.aborted = self.connections = 0
        self._server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> UpstreamServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: UpstreamProtocol(self), self.host, self.port, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def __aenter__(self) -> UpstreamServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _serve(host: str, port: int) -> None:
    server = await UpstreamServer(host, port).start()
    print(f"ready {server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    from bench._loop import run  # the fake must not be the bottleneck: uvloop when present

    run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
