"""The HTTP edge, bounded (issue 21, rows E, G, B, C): each bound pushed past on a real node, its RSS watched.

``relay serve`` runs as its own process (``tests/bounds.py``) and is spoken
to over raw sockets where a client library would not misbehave enough: a
header block that never ends, or that stops; a body that stops; uploads
that stop past the node's upload budget; JSON nested past the depth limit;
integers of thousands of digits in query parameters.  Each test states the
growth of the node's peak RSS it allows while it happens.

Timers are never raced: a test sets a short deadline and waits (with a
generous deadline of its own) for the node to act, never asserting how
fast it did.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import wave
from typing import Any

import httpx
import orjson
import pytest

from tests.bounds import DEADLINE, MiB, Node, relay_process
from tests.helpers import FakeUpstream, openai_backend, running_agent, running_upstream, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

NINES = "9" * 4301


# -- raw HTTP ---------------------------------------------------------------------------


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response: status, headers (lower-cased names), body (by Content-Length or chunks)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            body += await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        body = b""
    return status, headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the node closes the connection within the test's deadline: EOF or a reset."""
    try:
        async with asyncio.timeout(DEADLINE):
            while await reader.read(65536):
                pass
    except TimeoutError:  # (an OSError too, since Python 3.10: it must be told apart from a reset)
        return False
    except OSError:  # reset by the node
        pass
    return True


def error_code(body: bytes) -> str:
    return orjson.loads(body)["error"]["code"]


async def connect(node: Node, local: str | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", node.port, local_addr=(local, 0) if local else None)


def close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


async def send_header_without_end(node: Node, size: int, piece: int = MiB) -> tuple[int, dict[str, str], bytes]:
    """A request whose one header value is ``size`` bytes, sent a piece at a time while the answer is awaited.

    The client stops sending as soon as the node answers: what it holds is one piece.
    """
    reader, writer = await connect(node)
    answer = asyncio.create_task(read_answer(reader))
    try:
        writer.write(b"GET /api/relay HTTP/1.1\r\nHost: relay\r\nX-Big: ")
        chunk = b"a" * piece
        sent = 0
        with contextlib.suppress(ConnectionError, OSError):
            while sent < size and not answer.done():
                writer.write(chunk)
                await writer.drain()
                sent += piece
        async with asyncio.timeout(DEADLINE):
            result = await answer
        assert await closed(reader)
        return result
    finally:
        answer.cancel()
        close(writer)


# -- E: the header block, in bytes and in time ---------------------------------------------


async def test_a_128_mib_header_value_is_refused_with_431_and_the_node_stays_small(redis_url):
    async with relay_process(redis_url) as node:
        async with node.watch() as watch:
            status, headers, body = await send_header_without_end(node, 128 * MiB)
        assert status == 431, body
        assert headers["connection"] == "close"
        assert error_code(body) == "headers_too_large"
        watch.assert_within(16 * MiB, "one 128 MiB header value")
        async with node.client() as client:  # the node serves on
            assert (await client.get("/api/relay")).status_code == 200


async def test_100_connections_with_unfinished_2_mb_headers_are_refused_and_hold_nothing(redis_url):
    async with relay_process(redis_url) as node:
        async with node.watch() as watch:
            answers = await asyncio.gather(*(send_header_without_end(node, 2 * MiB, piece=128 * 1024)
                                             for _ in range(100)))
        assert [status for status, _, _ in answers] == [431] * 100
        watch.assert_within(40 * MiB, "100 connections sending 2 MB headers")


async def test_a_header_block_just_under_the_limit_is_served(redis_url):
    async with relay_process(redis_url, RELAY_MAX_HEADER_BYTES=str(16 * 1024)) as node, node.client() as client:
        ok = await client.get("/api/relay", headers={"X-Fill": "a" * (12 * 1024)})
        assert ok.status_code == 200
        refused = await client.get("/api/relay", headers={"X-Fill": "a" * (20 * 1024)})
        assert refused.status_code == 431
        assert refused.json()["error"]["code"] == "headers_too_large"


async def test_a_partial_header_then_silence_gets_408_and_the_close(redis_url):
    async with relay_process(redis_url, RELAY_HEADER_TIMEOUT="1") as node:
        async with node.watch() as watch:
            connections = [await connect(node) for _ in range(50)]
            for _, writer in connections:
                writer.write(b"GET /api/relay HTTP/1.1\r\nHost: relay\r\nX-Half: abc")
                await writer.drain()
            silent_reader, silent_writer = await connect(node)  # says nothing at all: closed without a word
            for reader, writer in connections:
                async with asyncio.timeout(DEADLINE):
                    status, headers, body = await read_answer(reader)
                assert status == 408, body
                assert error_code(body) == "request_timeout"
                assert headers["connection"] == "close"
                assert await closed(reader)
                close(writer)
            async with asyncio.timeout(DEADLINE):
                assert await silent_reader.read() == b""
            close(silent_writer)
        watch.assert_within(16 * MiB, "50 connections with partial headers, then silent")


async def test_connections_kept_alive_after_a_request_and_left_idle_are_closed(redis_url):
    """200 connections each make one request, then say nothing: the node closes every one (uvicorn's
    keep-alive limit, 5 s) and holds little for them meanwhile."""
    async with relay_process(redis_url) as node:
        async with node.watch() as watch:
            connections = [await connect(node) for _ in range(200)]
            for reader, writer in connections:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
                await writer.drain()
                async with asyncio.timeout(DEADLINE):
                    status, headers, _ = await read_answer(reader)
                assert status == 200 and headers.get("connection") != "close"
            for reader, writer in connections:
                assert await closed(reader)
                close(writer)
        watch.assert_within(16 * MiB, "200 idle kept-alive connections")


async def test_keep_alive_pipelining_and_the_agent_websocket_still_work_at_the_edge(redis_url):
    async with relay_process(redis_url, RELAY_HEADER_TIMEOUT="1") as node:
        reader, writer = await connect(node)
        try:
            request = b"GET /api/relay HTTP/1.1\r\nHost: relay\r\n\r\n"
            writer.write(request * 3)  # pipelined
            await writer.drain()
            for _ in range(3):
                status, _, _ = await read_answer(reader)
                assert status == 200
            for _ in range(3):  # keep-alive, one at a time
                writer.write(request)
                await writer.drain()
                assert (await read_answer(reader))[0] == 200
        finally:
            close(writer)
        instance_id, token = await node.register()
        async with running_agent(node.url, token):
            async def online() -> bool:
                async with node.client() as client:
                    return (await client.get(f"/api/instances/{instance_id}")).json()["status"] == "online"

            await wait_until(online, DEADLINE, what="the agent online")
            async with node.client() as client:
                answer = await client.post(f"/api/chat/{instance_id}/chat/completions",
                                           json={"messages": [{"role": "user", "content": "hi"}], "stream": False})
            assert answer.status_code == 200, answer.text


async def test_a_header_block_refused_behind_a_running_stream_is_dropped_unread(redis_url):
    """A chat stream runs on a kept-alive connection; a request pipelined behind it sends an endless
    header.  The block is refused where it passes the limit: the rest is left unread, or dropped
    unread whenever uvicorn resumes reading for the running stream (never fed to the parser), the
    stream ends whole, then the connection closes."""
    upstream = FakeUpstream(chunks=5, hold_after=1)
    async with running_upstream(upstream), relay_process(redis_url) as node:
        instance_id, token = await node.register()
        async with running_agent(node.url, token, openai_backend(upstream)):
            await wait_until(lambda: node_online(node, instance_id), DEADLINE, what="the agent online")
            reader, writer = await connect(node)
            try:
                body = orjson.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True})
                writer.write(f"POST /api/chat/{instance_id} HTTP/1.1\r\nHost: relay\r\n"
                             f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                             + body + b"GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Big: ")
                await writer.drain()
                piece = b"a" * MiB

                async def endless_header() -> None:  # blocks whenever the node stops reading: TCP pushes back
                    with contextlib.suppress(ConnectionError, OSError):
                        for _ in range(96):
                            writer.write(piece)
                            await writer.drain()

                async with node.watch() as watch:
                    sender = asyncio.create_task(endless_header())
                    await node.proc.wait_for_line(r"431 headers_too_large", DEADLINE)
                    await wait_until(lambda: upstream.inflight == 1, DEADLINE, what="the stream running")
                    # uvicorn resumes reading while the stream runs: all 96 MiB go in, to be dropped unread.
                    await asyncio.wait({sender}, timeout=DEADLINE)
                    upstream.release()
                    async with asyncio.timeout(DEADLINE):
                        status, _, answer = await read_answer(reader)
                    assert await closed(reader)
                    sender.cancel()
                watch.assert_within(24 * MiB, "an endless header pipelined behind a running stream")
                assert status == 200
                assert answer.rstrip().endswith(b"data: [DONE]"), answer[-200:]
            finally:
                close(writer)


async def test_a_connection_is_not_held_by_the_rest_of_a_body_the_node_answered_without(redis_url):
    """The node answers 404 before reading the body; the client sends the rest (all at once, or a
    byte at a time for ever): either way the connection is closed once idle for uvicorn's
    keep-alive time, counted from the first byte after the answer."""
    async with relay_process(redis_url) as node:
        for trickle in (False, True):
            reader, writer = await connect(node)
            try:
                writer.write(b"POST /api/chat/0123456789abcdef/chat/completions HTTP/1.1\r\nHost: relay\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{\"messages\"")
                await writer.drain()
                async with asyncio.timeout(DEADLINE):
                    status, _, _ = await read_answer(reader)
                assert status == 404
                eof = asyncio.create_task(closed(reader))
                with contextlib.suppress(ConnectionError, OSError):
                    if trickle:
                        while not eof.done():
                            writer.write(b" ")
                            await writer.drain()
                            await asyncio.wait({eof}, timeout=0.5)  # the trickle's pace, not a race
                    else:
                        writer.write(b" " * (1_000_000 - 11))
                        await writer.drain()
                assert await eof
            finally:
                close(writer)


async def test_empty_lines_between_requests_begin_no_header_block(redis_url):
    """A client that sends an empty line after its request (RFC 9112 says to ignore them) gets no
    unsolicited 408: its idle connection is simply closed at the keep-alive time."""
    async with relay_process(redis_url, RELAY_HEADER_TIMEOUT="1") as node:
        reader, writer = await connect(node)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
            await writer.drain()
            assert (await read_answer(reader))[0] == 200
            writer.write(b"\r\n")
            await writer.drain()
            async with asyncio.timeout(DEADLINE):
                rest = await reader.read()
            assert rest == b""  # closed without a word, not a 408
        finally:
            close(writer)


# -- E: a body that stops ---------------------------------------------------------------------


async def stalled_body(node: Node, path: str, headers: str, first: bytes) -> tuple[int, dict[str, str], bytes]:
    """A request that declares its body, sends ``first`` of it, then nothing; the node's answer, and its close."""
    reader, writer = await connect(node)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: relay\r\n{headers}\r\n".encode() + first)
        await writer.drain()
        async with asyncio.timeout(DEADLINE):
            answer = await read_answer(reader)
        assert await closed(reader)
        return answer
    finally:
        close(writer)


async def test_a_body_that_stalls_gets_408_in_the_doors_dialect_and_the_close(redis_url):
    async with relay_process(redis_url, RELAY_BODY_TIMEOUT="1") as node:
        instance_id, _ = await node.register()
        async with node.watch() as watch:
            status, headers, body = await stalled_body(
                node, "/v1/chat/completions", "Content-Type: application/json\r\nContent-Length: 1000\r\n",
                b'{"model": ')
            assert status == 408, body
            assert error_code(body) == "request_timeout"
            assert headers["connection"] == "close"
            status, headers, body = await stalled_body(  # chunked: no length to wait for
                node, f"/api/chat/{instance_id}/chat/completions",
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n", b"a\r\n{\"model\": \r\n")
            assert status == 408, body
            assert error_code(body) == "request_timeout"
            status, headers, body = await stalled_body(  # SwiftChat's converse: its errors are text
                node, "/api/converse", "Content-Type: application/json\r\nContent-Length: 500\r\n", b"{")
            assert status == 408
            assert body.startswith(b"Error: ")
        watch.assert_within(16 * MiB, "stalled bodies")


async def test_a_body_that_trickles_under_the_minimum_rate_gets_408(redis_url):
    """A byte every 0.2 s never pauses past ``RELAY_BODY_TIMEOUT`` (1 s), but averages 5 bytes a second,
    under ``RELAY_BODY_MIN_RATE`` (1000): 408 once the grace and what it earned are spent."""
    async with relay_process(redis_url, RELAY_BODY_TIMEOUT="1", RELAY_BODY_MIN_RATE="1000") as node:
        reader, writer = await connect(node)
        answer = asyncio.create_task(read_answer(reader))
        try:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
            sent = 0
            with contextlib.suppress(ConnectionError, OSError):
                while not answer.done() and sent < 100_000:
                    writer.write(b" ")
                    await writer.drain()
                    sent += 1
                    await asyncio.wait({answer}, timeout=0.2)  # the trickle's pace, not a race with the node
            async with asyncio.timeout(DEADLINE):
                status, _, body = await answer
        finally:
            answer.cancel()
            close(writer)
        assert status == 408, body
        assert error_code(body) == "request_timeout"
        assert b"slower than 1000 bytes a second" in body


# -- G: uploads that stall, past the node's upload budget ------------------------------------


def wav_file(seconds: float, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes((i * 7) % 256 for i in range(int(seconds * rate) * 2)))
    return buffer.getvalue()


UPLOAD_DECLARED = 15 * 1000 * 1000  # "15 MB", under RELAY_MAX_UPLOAD_BYTES (15 MiB)
UPLOAD_SENT = 14 * 1000 * 1000  # most of it, then nothing


async def stalled_upload(node: Node, path: str, local: str) -> tuple[int, dict[str, str], bytes]:
    """A multipart upload declaring 15 MB from ``local``: most of it sent, then nothing (or stopped when answered)."""
    reader, writer = await connect(node, local)
    answer = asyncio.create_task(read_answer(reader))
    try:
        boundary = "bounds"
        preamble = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
                    f"Content-Type: audio/wav\r\n\r\n").encode()
        writer.write((f"POST {path} HTTP/1.1\r\nHost: relay\r\nContent-Length: {UPLOAD_DECLARED}\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode() + preamble)
        piece = b"\0" * (256 * 1024)
        sent = len(preamble)
        with contextlib.suppress(ConnectionError, OSError):
            while sent < UPLOAD_SENT and not answer.done():
                writer.write(piece)
                await writer.drain()
                sent += len(piece)
        async with asyncio.timeout(DEADLINE):
            return await answer
    finally:
        answer.cancel()
        close(writer)


async def test_stalled_uploads_past_the_node_budget_get_503_and_the_budget_comes_back(redis_url):
    # The probe (32 uploads of 15 MB, stalling), from 8 addresses: each address holds at most a
    # quarter of the node's 64 MiB (one such upload: 429 past it), the node at most 64 MiB (503 past it).
    async with relay_process(redis_url, RELAY_BODY_TIMEOUT="3") as node:
        instance_id, token = await node.register()
        paths = [f"/api/chat/{instance_id}/audio/transcriptions", f"/api/chat/{instance_id}/audio-to-text"]
        async with node.watch() as watch:
            answers = await asyncio.gather(*(stalled_upload(node, paths[i % 2], f"127.0.0.{2 + i % 8}")
                                             for i in range(32)))
        statuses = sorted(status for status, _, _ in answers)
        print(f"\n[uploads] answers: {statuses.count(429)} x 429, {statuses.count(503)} x 503, "
              f"{statuses.count(408)} x 408")
        held = 64 * MiB // UPLOAD_DECLARED  # what the default budget (64 MiB) holds: 4
        assert statuses.count(408) <= held, statuses
        assert set(statuses) == {408, 429, 503}, statuses
        for status, headers, body in answers:
            if status in (429, 503):
                assert error_code(body) == {429: "too_many_uploads", 503: "uploads_busy"}[status]
                assert int(headers["retry-after"]) >= 1
            else:
                assert error_code(body) == "request_timeout"
        watch.assert_within(160 * MiB, "32 stalled 15 MB uploads from 8 addresses (budget 64 MiB)")
        # Every reservation was given back: a whole upload of the same size goes through.
        async with running_agent(node.url, token):
            wav = wav_file(1.0)
            padded = wav + b"\0" * (UPLOAD_DECLARED - 1024 - len(wav))
            async with node.client() as client:
                async def transcribed() -> httpx.Response | None:
                    response = await client.post(f"/api/chat/{instance_id}/audio/transcriptions",
                                                 files={"file": ("a.wav", padded, "audio/wav")})
                    return response if response.status_code != 503 or "uploads_busy" in response.text else None

                response = await wait_until(transcribed, DEADLINE, what="the agent online")
            assert response.status_code == 200, response.text


# -- B: JSON nested past the depth limit ------------------------------------------------------


def nested(depth: int) -> Any:
    """Objects nested ``depth`` levels deep (the innermost holds a number)."""
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def nested_list(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


async def test_json_nested_past_the_depth_limit_is_422_everywhere_and_63_still_goes_through(redis_url):
    # Rates off: 180 refusals from one caller are the point, not its rate.
    async with relay_process(redis_url, RELAY_RATE_PER_CALLER="0", RELAY_RATE_PER_INSTANCE="0") as node:
        instance_id, token = await node.register()
        chat = f"/api/chat/{instance_id}/chat/completions"
        user = {"role": "user", "content": "hi"}
        deep = nested(300)
        bodies = [
            (chat, {"messages": [user], "metadata": deep}),
            (chat, {"messages": [user], "tools": [{"type": "function",
                                                   "function": {"name": "f", "parameters": deep}}]}),
            (chat, {"messages": [{**user, "extra": deep}]}),
            (chat, {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "extra": deep}]}]}),
            (chat, {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "extra": deep}}]}]}),
            (chat, {"messages": [user], "metadata": {"a": nested_list(300)}}),
            ("/v1/chat/completions", {"model": instance_id, "messages": [user], "metadata": deep}),
            (f"/api/chat/{instance_id}/chat-messages", {"query": "hi", "user": "u", "inputs": deep}),
            ("/api/converse", {"messages": [{"role": "user", "content": [{"text": "hi"}]}], "modelId": instance_id,
                               "extra": deep}),
        ]
        async with running_agent(node.url, token), node.client() as client:
            async with node.watch() as watch:
                for path, body in bodies:
                    for _ in range(20):
                        response = await client.post(path, content=json.dumps(body),
                                                     headers={"Content-Type": "application/json"})
                        assert response.status_code == 422, (path, response.text)
                        if path != "/api/converse":
                            assert response.json()["error"]["code"] == "json_too_deep"
            watch.assert_within(16 * MiB, "180 requests with JSON nested 300 deep")
            # 63 levels in all (the body is one) still reach the model.
            async def answered() -> httpx.Response | None:
                response = await client.post(chat, json={"messages": [user], "stream": False, "metadata": nested(62)})
                return response if response.status_code != 503 else None

            response = await wait_until(answered, DEADLINE, what="the agent online")
            assert response.status_code == 200, response.text
            response = await client.post(chat, json={"messages": [{**user, "extra": nested(60)}], "stream": False,
                                                     "tools": [{"type": "function", "function": {
                                                         "name": "f", "parameters": nested(58)}}]})
            assert response.status_code == 200, response.text
        assert "Traceback" not in node.proc.output


# -- C: integers of thousands of digits in query parameters ------------------------------------


async def test_integer_query_parameters_of_4301_digits_are_422_naming_the_parameter(redis_url):
    async with relay_process(redis_url) as node:
        instance_id, token = await node.register()
        async with node.client() as client:
            key = (await client.post(f"/api/instances/{instance_id}/keys", json={"name": "k"},
                                     headers={"Authorization": f"Bearer {token}"})).json()["key"]
            caller = {"Authorization": f"Bearer {key}"}
            probes = [
                ("/api/instances", {"cursor": NINES}, {}, "cursor"),
                ("/api/instances", {"limit": NINES}, {}, "limit"),
                ("/api/instances", {"cursor": "-" + NINES}, {}, "cursor"),
                ("/v1/models", {"limit": NINES}, {}, "limit"),
                ("/v1/models", {"after": NINES}, {}, "after"),
                (f"/api/chat/{instance_id}/messages", {"conversation_id": "c", "user": "u", "limit": NINES}, {},
                 "limit"),
                ("/v1/messages", {"conversation_id": "c", "user": "u", "limit": NINES}, caller, "limit"),
                (f"/api/chat/{instance_id}/conversations", {"user": "u", "limit": NINES}, caller, "limit"),
                ("/v1/conversations", {"user": "u", "limit": NINES}, caller, "limit"),
            ]
            async with node.watch() as watch:
                for path, params, headers, name in probes:
                    for _ in range(20):
                        response = await client.get(path, params=params, headers=headers)
                        assert response.status_code == 422, (path, params.keys(), response.text)
                        assert response.json()["error"]["param"] == name, (path, response.text)
                # SwiftChat's upgrade check reads a version's numbers: its own dialect.
                for _ in range(20):
                    response = await client.get("/api/upgrade", params={"version": NINES})
                    assert response.status_code == 422, response.text
                    assert response.json()["code"] == "invalid_parameter"
            watch.assert_within(16 * MiB, "200 requests with 4301-digit integers")
            # Still integers in range where they belong.
            assert (await client.get("/api/instances", params={"limit": "5", "cursor": "0"})).status_code == 200
        assert "Traceback" not in node.proc.output


async def test_one_address_holds_a_share_of_the_upload_budget_and_others_still_upload(redis_url):
    """An address holding a stalled 15 MB upload gets 429 ``too_many_uploads`` for its next ones, while
    another address's upload of the same size goes through (it would be 503 if one address could take
    the whole budget)."""
    async with relay_process(redis_url, RELAY_BODY_TIMEOUT="20", RELAY_UPLOAD_MEMORY_BYTES=str(32 * MiB)) as node:
        instance_id, token = await node.register()
        path = f"/api/chat/{instance_id}/audio/transcriptions"
        async with running_agent(node.url, token):
            await wait_until(lambda: node_online(node, instance_id), DEADLINE, what="the agent online")
            async with node.watch() as watch:
                # Two from one address at once: whichever is reserved first is held, the other refused.
                first, second = (asyncio.create_task(stalled_upload(node, path, "127.0.0.2")) for _ in range(2))
                done, _ = await asyncio.wait({first, second}, timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED)
                assert len(done) == 1
                refused = done.pop()
                held = second if refused is first else first
                status, headers, body = refused.result()
                assert status == 429, body
                assert error_code(body) == "too_many_uploads" and int(headers["retry-after"]) >= 1
                wav = wav_file(1.0)
                padded = wav + b"\0" * (UPLOAD_DECLARED - 1024 - len(wav))
                transport = httpx.AsyncHTTPTransport(local_address="127.0.0.3")
                async with httpx.AsyncClient(base_url=node.url, transport=transport, timeout=60) as other:
                    response = await other.post(path, files={"file": ("a.wav", padded, "audio/wav")})
                assert response.status_code == 200, response.text
            watch.assert_within(64 * MiB, "one address's held upload beside another's whole one")
            assert not held.done()  # held all along: its 408 comes only after RELAY_BODY_TIMEOUT
            held.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await held


async def node_online(node: Node, instance_id: str) -> bool:
    async with node.client() as client:
        return (await client.get(f"/api/instances/{instance_id}")).json()["status"] == "online"
