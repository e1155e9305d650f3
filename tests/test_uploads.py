"""Request bodies that go relay -> agent as an upload, and the ``transcribe`` operation.

Through the real relay and the real agent: the file reaches a fake model
server intact, in frames of at most one window, never with more than a
window outstanding (watched on both sides, frame by frame, not timed); other
streams on the same websocket keep moving meanwhile; it crosses nodes; the
agent failing early, the caller leaving and the agent going away all stop
it.  Then the door's refusals (413, 415, 422, 501), the demo's transcript of
a WAV built here, and the hostile-agent rules the upload added.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import random
import tempfile
import wave
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import httpx
import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

import wire
from agent.demo_model import DemoBackend, demo_transcript
from agent.media import wav_summary
from agent.upstream import OpenAIBackend
from relay.serving.crossnode import RemoteLink
from relay.serving.inflight import Stream
from relay.serving.sessions import AgentSession
from tests.helpers import (
    FakeUpstream,
    assert_openai_error,
    keep_alive,
    running_agent,
    running_relay,
    running_upstream,
    stream_in_flight,
    wait_until,
)

pytestmark = pytest.mark.anyio

WINDOW = 16 * 1024
MB = 1024 * 1024


def audio_bytes(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def wav_file(seconds: float, rate: int = 16000, channels: int = 1, width: int = 2) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(rate)
        frames = int(seconds * rate)
        out.writeframes(bytes((i * 7) % 256 for i in range(frames * channels * width)))
    return buffer.getvalue()


def transcriber(upstream: FakeUpstream) -> OpenAIBackend:
    return OpenAIBackend(upstream.url, transcribe_models=["whisper-1"])


def files(data: bytes, name: str = "talk.mp3", content_type: str = "audio/mpeg") -> dict[str, Any]:
    return {"file": (name, data, content_type)}


class UploadWatch:
    """What the relay does with uploads, in order: each frame it sends, each credit it takes, each
    answer credit it grants; optionally holding the upload after ``hold_after`` frames until ``release``.

    Frames are noted as the machine counts them (before the hold), so the
    log's order is the accounts' order; ``delivered`` counts those that went
    on to the agent's websocket.
    """

    def __init__(self, monkeypatch, hold_after: int | None = None, on_hold: Any = None):
        self.events: list[tuple[str, int, int]] = []
        self.delivered = 0
        self.hold_after = hold_after
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        watch = self
        send_upload, send_credit, feed_credit = AgentSession.send_upload, AgentSession.send_credit, Stream.feed_credit

        async def watched_upload(session: AgentSession, stream_id: int, payload: bytes) -> None:
            watch.events.append(("upload", stream_id, len(payload)))
            if watch.hold_after is not None and watch.uploads() > watch.hold_after and not watch.release.is_set():
                watch.held.set()
                if on_hold is not None:
                    on_hold()
                await watch.release.wait()
            await send_upload(session, stream_id, payload)
            watch.delivered += 1

        async def watched_credit(session: AgentSession, stream_id: int, amount: int) -> None:
            watch.events.append(("answer-credit", stream_id, amount))
            await send_credit(session, stream_id, amount)

        def watched_feed(stream: Stream, event: wire.Credit) -> None:
            feed_credit(stream, event)
            if isinstance(stream.link, AgentSession):
                watch.events.append(("granted", stream.id, event.amount))

        monkeypatch.setattr(AgentSession, "send_upload", watched_upload)
        monkeypatch.setattr(AgentSession, "send_credit", watched_credit)
        monkeypatch.setattr(Stream, "feed_credit", watched_feed)

    def uploads(self) -> int:
        return sum(1 for kind, _, _ in self.events if kind == "upload")

    def uploaded(self) -> int:
        return sum(n for kind, _, n in self.events if kind == "upload")

    def max_outstanding(self) -> int:
        """The most upload bytes the relay ever had sent and not had credited back."""
        outstanding = most = 0
        for kind, _, n in self.events:
            if kind == "upload":
                outstanding += n
                most = max(most, outstanding)
            elif kind == "granted":
                outstanding -= n
        return most


class WatchedReceiver(wire.UploadReceiver):
    """The agent's upload account, noting each frame: (its size, bytes held beyond the credit granted)."""

    frames: ClassVar[list[tuple[int, int]]] = []

    def receive(self, nbytes: int) -> int:
        outstanding = self.received + nbytes - self.granted
        self.frames.append((nbytes, outstanding))
        return super().receive(nbytes)


@pytest.fixture
def agent_frames(monkeypatch) -> list[tuple[int, int]]:
    found: list[tuple[int, int]] = []
    monkeypatch.setattr(WatchedReceiver, "frames", found)
    monkeypatch.setattr(wire, "UploadReceiver", WatchedReceiver)
    return found


# -- through one relay ------------------------------------------------------------


async def test_a_multi_mb_upload_reaches_the_model_intact_in_window_sized_frames(redis_url, monkeypatch,
                                                                                  agent_frames):
    watch = UploadWatch(monkeypatch)
    data = audio_bytes(3 * MB + 123)
    upstream = FakeUpstream()
    async with running_upstream(upstream), running_relay(redis_url, stream_window=WINDOW) as relay:
        instance_id, token = await relay.register()
        async with running_agent(relay.url, token, transcriber(upstream)) as agent, relay.client() as client:
            response = await client.post(f"/api/chat/{instance_id}/audio/transcriptions", files=files(data),
                                         data={"model": "whisper-1", "language": "en", "prompt": "a talk",
                                               "temperature": "0.2"})
            assert response.status_code == 200, response.text
            assert response.headers["content-type"].startswith("application/json")
            assert response.json() == {"text": f"fake transcript of {len(data)} bytes"}
            await wait_until(lambda: agent.status.served == 1, what="the agent counting it served")
    (seen,) = upstream.transcriptions
    assert seen["size"] == len(data) and seen["sha256"] == hashlib.sha256(data).hexdigest()
    assert (seen["filename"], seen["content_type"]) == ("talk.mp3", "audio/mpeg")
    assert seen["fields"] == {"model": "whisper-1", "language": "en", "prompt": "a talk", "temperature": "0.2"}
    # The relay's side: every frame at most a window, all of it sent once, never a window outstanding.
    sizes = [n for kind, _, n in watch.events if kind == "upload"]
    assert sum(sizes) == len(data) and max(sizes) <= WINDOW and len(sizes) >= len(data) // WINDOW
    assert watch.max_outstanding() <= WINDOW
    assert sum(n for kind, _, n in watch.events if kind == "granted") == len(data) - WINDOW
    # The agent's side: the same frames, never holding more than a window beyond what it granted.
    assert [n for n, _ in agent_frames] == sizes
    assert max(outstanding for _, outstanding in agent_frames) <= WINDOW


@pytest.mark.slow
async def test_a_chat_stream_keeps_flowing_during_a_large_upload(redis_url, monkeypatch):
    # The chat is held by the model mid-answer; the upload is held by the relay
    # after a few frames and, while held, the model lets the chat go: the chat
    # must then run to its end (its answer needs many credits on the same
    # websocket) while the upload is stuck halfway.  Only then does the upload
    # finish.  Ordering, not timing: each step waits for the one before.
    upstream = FakeUpstream(chunks=600, hold_after=2)
    watch = UploadWatch(monkeypatch, hold_after=5, on_hold=upstream.release)
    data = audio_bytes(2 * MB)
    async with running_upstream(upstream), running_relay(redis_url, stream_window=WINDOW) as relay:
        instance_id, token = await relay.register()
        async with running_agent(relay.url, token, transcriber(upstream)), relay.client() as client, \
                stream_in_flight(client, f"/api/chat/{instance_id}",
                                 {"messages": [{"role": "user", "content": "x"}]}) as chat:
            upload = asyncio.create_task(client.post(f"/api/chat/{instance_id}/audio/transcriptions",
                                                     files=files(data), data={"model": "whisper-1"}))
            await asyncio.wait_for(watch.held.wait(), 30)
            events = await chat.rest()
            assert events[-1] == "[DONE]" and len(events) == 600 + 2
            assert not upload.done() and watch.uploaded() < len(data)  # still halfway
            watch.release.set()
            response = await upload
    assert response.status_code == 200, response.text
    assert upstream.transcriptions[0]["sha256"] == hashlib.sha256(data).hexdigest()
    # On the agent's websocket, the chat's credit went between the upload's frames.
    kinds = [kind for kind, _, _ in watch.events]
    first, last = kinds.index("upload"), len(kinds) - 1 - kinds[::-1].index("upload")
    assert kinds[first:last].count("answer-credit") >= 5


@pytest.mark.slow
async def test_an_agent_that_fails_before_the_upload_ends_stops_it(redis_url, monkeypatch):
    # The agent takes at most 1 MiB: it refuses the 4 MiB file at once, and the
    # relay stops after what it may send before any credit (one window).
    watch = UploadWatch(monkeypatch)
    upstream = FakeUpstream()
    window = 64 * 1024
    async with running_upstream(upstream), running_relay(redis_url, stream_window=window) as relay:
        instance_id, token = await relay.register()
        async with running_agent(relay.url, token, transcriber(upstream), max_upload=MB) as agent, \
                relay.client() as client:
            response = await client.post(f"/api/chat/{instance_id}/audio/transcriptions",
                                         files=files(audio_bytes(4 * MB)), data={"model": "whisper-1"})
            assert_openai_error(response, 413, code="upload_too_large")
            assert watch.uploaded() <= window
            assert not any(kind == "granted" for kind, _, _ in watch.events)
            # The connection is still good, and so is the next, smaller file.
            small = audio_bytes(MB // 2)
            response = await client.post(f"/api/chat/{instance_id}/audio/transcriptions", files=files(small))
            assert response.status_code == 200, response.text
            assert agent.status.connected
    assert [t["size"] for t in upstream.transcriptions] == [MB // 2]


@pytest.mark.slow
@pytest.mark.parametrize("status", [400, 422])
async def test_an_upstream_4xx_reaches_the_caller_with_its_status(redis_url, status):
    upstream = FakeUpstream(fail_status=status)
    async with running_upstream(upstream), running_relay(redis_url) as relay:
        instance_id, token = await relay.register()
        async with running_agent(relay.url, token, transcriber(upstream)), relay.client() as client:
            response = await client.post(f"/api/chat/{instance_id}/audio/transcriptions",
                                         files=files(audio_bytes(300_000)))
            error = assert_openai_error(response, status)
    assert "fake transcription failure" in error["message"]
    assert upstream.transcriptions[0]["size"] == 300_000


def raw_post(port: int, url: str, data: bytes) -> bytes:
    """The bytes of a multipart POST, to send by hand on a socket the test can cut."""
    request = httpx.Request("POST", f"http://127.0.0.1:{port}{url}", files=files(data),
                            data={"model": "whisper-1"})
    body = request.read()
    head = (f"POST {url} HTTP/1.1\r\nHost: relay\r\nContent-Type: {request.headers['content-type']}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _idle(relay, agent) -> bool:
    return not any(s.streams for s in relay.services.sessions.all()) and agent.status.inflight == 0


@pytest.mark.slow
async def test_the_caller_hanging_up_mid_upload_cancels_it(redis_url, monkeypatch):
    watch = UploadWatch(monkeypatch, hold_after=3)
    upstream = FakeUpstream()
    async with running_upstream(upstream), running_relay(redis_url, stream_window=WINDOW) as relay:
        instance_id, token = await relay.register()
        async with running_agent(relay.url, token, transcriber(upstream)) as agent:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.settings.port)
            writer.write(raw_post(relay.settings.port, f"/api/chat/{instance_id}/audio/transcriptions",
                                  audio_bytes(MB)))
            await writer.drain()
            await asyncio.wait_for(watch.held.wait(), 30)
            writer.close()  # the caller leaves while the relay is uploading
            await wait_until(lambda: _idle(relay, agent), what="the upload cancelled at the relay and the agent")
            assert watch.delivered == 3  # the held frame never went, nor anything after it
            # Nothing is left over: the slot came back, and a new upload goes through.
            watch.hold_after = None
            watch.release.set()
            async with relay.client() as client:
                response = await client.post(f"/api/chat/{instance_id}/audio/transcriptions",
                                             files=files(audio_bytes(100_000)))
            assert response.status_code == 200, response.text
    assert [t["size"] for t in upstream.transcriptions] == [100_000]


@pytest.mark.slow
async def test_losing_the_agent_mid_upload_fails_the_request(redis_url, monkeypatch):
    watch = UploadWatch(monkeypatch, hold_after=2)
    upstream = FakeUpstream()
    async with running_upstream(upstream), running_relay(redis_url, stream_window=WINDOW) as relay:
        instance_id, token = await relay.register()
        async with running_agent(relay.url, token, transcriber(upstream)), relay.client() as client:
            caller = asyncio.create_task(client.post(f"/api/chat/{instance_id}/audio/transcriptions",
                                                     files=files(audio_bytes(MB))))
            await asyncio.wait_for(watch.held.wait(), 30)
            (session,) = relay.services.sessions.all()
            await session.close(wire.CloseCode.GOING_AWAY, "test: the agent goes away")
            watch.release.set()
            response = await caller
    assert_openai_error(response, 502, code="agent_disconnected")
    assert upstream.transcriptions == []


# -- across nodes ---------------------------------------------------------------------


@pytest.mark.slow
async def test_an_upload_crosses_nodes_and_its_credit_comes_back(redis_url, monkeypatch, agent_frames):
    published: list[int] = []
    send_upload = RemoteLink.send_upload

    async def watched(link: RemoteLink, stream_id: int, payload: bytes) -> None:
        published.append(len(payload))
        await send_upload(link, stream_id, payload)

    monkeypatch.setattr(RemoteLink, "send_upload", watched)
    watch = UploadWatch(monkeypatch)  # node B's session, in this process too
    data = audio_bytes(2 * MB + 5)
    upstream = FakeUpstream()
    async with running_upstream(upstream), running_relay(redis_url, stream_window=WINDOW) as node_a, \
            running_relay(redis_url, stream_window=WINDOW) as node_b:
        instance_id, token = await node_a.register()
        async with running_agent(node_b.url, token, transcriber(upstream)), node_a.client() as client:
            response = await client.post("/v1/audio/transcriptions", files=files(data, "talk.wav", "audio/wav"),
                                         data={"model": f"{instance_id}/whisper-1", "response_format": "text"})
            assert response.status_code == 200, response.text
            assert response.headers["content-type"].startswith("text/plain")
            assert response.text == f"fake transcript of {len(data)} bytes"
            await wait_until(lambda: not node_b.services.bus.egress and not node_a.services.bus.ingress,
                             what="both nodes done with the stream")
    assert upstream.transcriptions[0]["sha256"] == hashlib.sha256(data).hexdigest()
    assert upstream.transcriptions[0]["fields"] == {"model": "whisper-1", "response_format": "text"}
    assert sum(published) == len(data) and max(published) <= WINDOW  # A -> B on the bus
    assert [n for kind, _, n in watch.events if kind == "upload"] == published  # B -> agent, frame for frame
    assert watch.max_outstanding() <= WINDOW
    assert max(outstanding for _, outstanding in agent_frames) <= WINDOW


@pytest.mark.slow
async def test_a_caller_leaving_mid_upload_across_nodes_stops_it_on_both(redis_url, monkeypatch):
    watch = UploadWatch(monkeypatch, hold_after=3)  # held at node B, on its way to the agent
    upstream = FakeUpstream()
    async with running_upstream(upstream), running_relay(redis_url, stream_window=WINDOW) as node_a, \
            running_relay(redis_url, stream_window=WINDOW) as node_b:
        instance_id, token = await node_a.register()
        async with running_agent(node_b.url, token, transcriber(upstream)) as agent:
            reader, writer = await asyncio.open_connection("127.0.0.1", node_a.settings.port)
            writer.write(raw_post(node_a.settings.port, f"/api/chat/{instance_id}/audio/transcriptions",
                                  audio_bytes(MB)))
            await writer.drain()
            await asyncio.wait_for(watch.held.wait(), 30)
            writer.close()
            await wait_until(lambda: not node_a.services.bus.ingress and not node_b.services.bus.egress,
                             what="the stream gone from both nodes")
            await wait_until(lambda: _idle(node_b, agent), what="the agent's upload cancelled")
            assert watch.delivered == 3
    assert upstream.transcriptions == []


# -- the door's refusals ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def transcribing_relay(redis_url: str, backend: Any = None, **settings: Any) -> AsyncIterator[tuple]:
    async with running_relay(redis_url, **settings) as relay:
        instance_id, token = await relay.register()
        async with running_agent(relay.url, token, backend or DemoBackend(rate=0)), relay.client() as client:
            yield relay, client, instance_id


async def test_a_file_past_the_upload_limit_is_413_declared_or_counted(redis_url):
    limit = 256 * 1024
    async with transcribing_relay(redis_url, max_upload_bytes=limit) as (relay, client, instance_id):
        url = f"/api/chat/{instance_id}/audio/transcriptions"
        # Declared: refused before a byte of the body is read.
        response = await client.post(url, files=files(audio_bytes(limit + 100_000)))
        assert_openai_error(response, 413, code="payload_too_large")
        # Not declared (chunked): counted as it arrives.
        request = httpx.Request("POST", f"{relay.url}{url}", files=files(audio_bytes(limit + 100_000)))
        body = request.read()

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), 16 * 1024):
                yield body[start : start + 16 * 1024]

        response = await client.post(url, content=chunks(), headers={"content-type": request.headers["content-type"]})
        assert_openai_error(response, 413, code="payload_too_large")
        # Just past the limit, inside the form's room: the file itself is measured.
        response = await client.post(url, files=files(audio_bytes(limit + 1)))
        assert_openai_error(response, 413, code="payload_too_large")
        # At the limit: fine.
        response = await client.post(url, files=files(audio_bytes(limit)))
        assert response.status_code == 200, response.text


async def test_the_file_never_touches_the_relays_disk(redis_url, monkeypatch):
    # Starlette's form parser spools a file past 1 MiB to a temporary file; the door keeps it in memory.
    rolled: list[int] = []
    rollover = tempfile.SpooledTemporaryFile.rollover

    def watched(self) -> None:
        rolled.append(1)
        rollover(self)

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", watched)
    async with transcribing_relay(redis_url) as (relay, client, instance_id):
        response = await client.post(f"/api/chat/{instance_id}/audio/transcriptions",
                                     files=files(audio_bytes(5 * MB)))
        assert response.status_code == 200, response.text
    assert rolled == []


@pytest.mark.slow
@pytest.mark.parametrize("name, content_type", [("notes.txt", "text/plain"), ("voice.ogg", "audio/ogg"),
                                                ("noext", "application/octet-stream"), ("cat.png", "image/png")])
async def test_a_format_that_is_not_audio_is_415(redis_url, name, content_type):
    async with transcribing_relay(redis_url) as (relay, client, instance_id):
        response = await client.post(f"/api/chat/{instance_id}/audio/transcriptions",
                                     files=files(b"not audio", name, content_type))
        assert_openai_error(response, 415, code="unsupported_file_format", param="file")


@pytest.mark.slow
@pytest.mark.parametrize("name, content_type, sent_as", [
    ("talk.MP3", "application/octet-stream", "talk.MP3"), ("memo", "audio/x-m4a", "memo.m4a"),
    ("C:\\rec\\take 1.webm", None, "take 1.webm"), ("clip.mpga", "audio/mpeg", "clip.mpga"),
])
async def test_formats_go_by_extension_then_content_type(redis_url, name, content_type, sent_as):
    upstream = FakeUpstream()
    async with running_upstream(upstream), transcribing_relay(redis_url, transcriber(upstream)) as (
            relay, client, instance_id):
        response = await client.post(f"/api/chat/{instance_id}/audio/transcriptions",
                                     files=files(b"\x00" * 64, name, content_type))
        assert response.status_code == 200, response.text
    assert upstream.transcriptions[0]["filename"] == sent_as


async def test_a_missing_file_or_a_body_that_is_not_multipart_is_refused(redis_url):
    async with transcribing_relay(redis_url) as (relay, client, instance_id):
        url = f"/api/chat/{instance_id}/audio/transcriptions"
        assert_openai_error(await client.post(url, data={"model": "demo-transcribe"}), 422, param="file")
        assert_openai_error(await client.post(url, files={"model": (None, "demo-transcribe")}), 422, param="file")
        # A text field named "file" is not a file.
        assert_openai_error(await client.post(url, files={"file": (None, "x")}), 422, param="file")
        assert_openai_error(await client.post(url, files=files(b"")), 422, param="file")  # empty
        assert_openai_error(await client.post(url, json={"file": "x"}), 415, code="multipart_required")
        assert_openai_error(await client.post(url, files=files(b"x"), data={"response_format": "xml"}), 422,
                            param="response_format")
        assert_openai_error(await client.post(url, files=files(b"x"), data={"temperature": "hot"}), 422,
                            param="temperature")
        # Two files: one too many.
        response = await client.post(url, files=[("file", ("a.mp3", b"x", "audio/mpeg")),
                                                 ("file", ("b.mp3", b"y", "audio/mpeg"))])
        assert_openai_error(response, 400)


@pytest.mark.slow
async def test_an_instance_without_a_transcribing_agent_is_501(redis_url):
    upstream = FakeUpstream()
    async with running_upstream(upstream), transcribing_relay(redis_url, OpenAIBackend(upstream.url)) as (
            relay, client, instance_id):
        response = await client.post(f"/api/chat/{instance_id}/audio/transcriptions", files=files(b"x" * 10))
        assert_openai_error(response, 501, code="capability_not_supported")
        response = await client.post("/v1/audio/transcriptions", files=files(b"x" * 10),
                                     data={"model": instance_id})
        assert_openai_error(response, 501, code="capability_not_supported")
    assert upstream.transcriptions == []


async def test_the_global_door_names_the_instance_with_model(redis_url):
    async with transcribing_relay(redis_url) as (relay, client, instance_id):
        response = await client.post("/v1/audio/transcriptions", files=files(b"x" * 10),
                                     data={"model": f"{instance_id}/no-such-model"})
        assert_openai_error(response, 404, code="model_not_found")
        response = await client.post("/v1/audio/transcriptions", files=files(b"x" * 10),
                                     data={"model": "0123456789abcdef"})
        assert_openai_error(response, 404, code="model_not_found")
        response = await client.post("/v1/audio/transcriptions", files=files(b"x" * 10))
        assert_openai_error(response, 422, param="model")
        response = await client.post("/v1/audio/transcriptions", files=files(b"x" * 10),
                                     data={"model": instance_id})
        assert response.status_code == 200, response.text


# -- the demo model ------------------------------------------------------------------


def test_the_demo_reads_a_wav_header_and_hashes_anything_else():
    wav = wav_file(1.5)
    assert wav_summary(wav) == (1.5, 16000, 1)
    assert demo_transcript(wav, "audio/wav")[0] == "demo transcript: 1.5 s of audio, 16000 Hz, 1 channel"
    stereo = wav_file(0.25, rate=8000, channels=2, width=1)
    assert demo_transcript(stereo, "audio/wav")[0] == "demo transcript: 0.25 s of audio, 8000 Hz, 2 channels"
    other = b"ID3\x04" + bytes(100)
    text, _ = demo_transcript(other, "audio/mpeg")
    assert text == f"demo transcript: 104 bytes of audio/mpeg, sha256 {hashlib.sha256(other).hexdigest()[:12]}"
    assert wav_summary(b"RIFF\x00\x00\x00\x00WAVEjunk") is None and wav_summary(wav[:30]) is None


@pytest.mark.slow
async def test_the_demo_transcribes_a_real_wav_through_the_relay(redis_url):
    wav = wav_file(1.5)
    async with transcribing_relay(redis_url) as (relay, client, instance_id):
        response = await client.post(f"/api/chat/{instance_id}/audio/transcriptions",
                                     files=files(wav, "hello.wav", "audio/wav"), data={"model": "whisper-1"})
        assert response.status_code == 200, response.text
        assert response.json() == {"text": "demo transcript: 1.5 s of audio, 16000 Hz, 1 channel"}
        response = await client.post(f"/api/chat/{instance_id}/audio/transcriptions",
                                     files=files(wav, "hello.wav", "audio/wav"), data={"response_format": "srt"})
        assert response.text == ("1\n00:00:00,000 --> 00:00:01,500\n"
                                 "demo transcript: 1.5 s of audio, 16000 Hz, 1 channel\n")
        response = await client.post(f"/api/chat/{instance_id}/audio/transcriptions",
                                     files=files(wav, "hello.wav", "audio/wav"),
                                     data={"response_format": "verbose_json", "language": "de"})
        verbose = response.json()
        assert verbose["duration"] == 1.5 and verbose["language"] == "de" and verbose["text"].startswith("demo")


async def test_the_openai_sdk_transcribes_through_the_global_door(redis_url):
    openai = pytest.importorskip("openai")
    wav = wav_file(2.0, rate=22050)
    async with transcribing_relay(redis_url) as (relay, client, instance_id):
        sdk = openai.AsyncOpenAI(base_url=f"{relay.url}/v1", api_key="anything", max_retries=0)
        try:
            result = await sdk.audio.transcriptions.create(model=f"{instance_id}/demo-transcribe",
                                                           file=("hi.wav", wav, "audio/wav"))
            assert result.text == "demo transcript: 2 s of audio, 22050 Hz, 1 channel"
            text = await sdk.audio.transcriptions.create(model=instance_id, file=("hi.wav", wav),
                                                         response_format="text")
            assert text.strip() == "demo transcript: 2 s of audio, 22050 Hz, 1 channel"
        finally:
            await sdk.close()


# -- the agent, driven by hand -----------------------------------------------------------


@contextlib.asynccontextmanager
async def raw_agent(relay_url: str, token: str) -> AsyncIterator[Any]:
    url = relay_url.replace("http://", "ws://") + "/api/agent/connect"
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"}, max_size=None,
                                  ping_interval=None, close_timeout=1) as ws:
        await ws.send(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, "raw", "raw", ("m",), 4,
                                             (wire.OP_CHAT, wire.OP_TRANSCRIBE), 2, (), ("w",))))
        assert type(wire.decode(await ws.recv())) is wire.Welcome
        heartbeat = asyncio.create_task(keep_alive(ws))  # so the relay's heartbeat timeout decides nothing here
        try:
            yield ws
        finally:
            heartbeat.cancel()




async def next_of(ws, kind: type) -> Any:
    async with asyncio.timeout(10):
        while True:
            event = wire.decode(await ws.recv())
            if type(event) is kind:
                return event


async def close_code(ws) -> int | None:
    try:
        async with asyncio.timeout(10):
            while True:
                await ws.recv()
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None


@pytest.mark.slow
@pytest.mark.parametrize("misdeed", ["credit for a chat", "credit past the upload", "answer mid-upload"])
async def test_an_agent_breaking_the_upload_rules_is_closed_1002(redis_url, misdeed):
    async with running_relay(redis_url, stream_window=WINDOW) as relay, relay.client() as client:
        instance_id, token = await relay.register()
        async with raw_agent(relay.url, token) as ws:
            if misdeed == "credit for a chat":
                caller = asyncio.create_task(client.post(f"/api/chat/{instance_id}",
                                                         json={"messages": [{"role": "user", "content": "x"}]}))
                request = await next_of(ws, wire.Request)
                await ws.send(wire.encode_credit(request.id, 10))  # a credit with no upload in progress
            else:
                caller = asyncio.create_task(client.post(f"/api/chat/{instance_id}/audio/transcriptions",
                                                         files=files(audio_bytes(200_000))))
                request = await next_of(ws, wire.Request)
                assert (request.op, request.upload, request.window) == (wire.OP_TRANSCRIBE, 200_000, WINDOW)
                await next_of(ws, wire.Upload)
                if misdeed == "credit past the upload":
                    await ws.send(wire.encode_credit(request.id, 200_000))
                else:
                    await ws.send(wire.encode_data(request.id, b'{"text": "too soon"}'))
            assert await close_code(ws) == 1002
            response = await caller
    assert_openai_error(response, 502, code="agent_disconnected")


async def test_an_agent_gets_exactly_what_it_grants_and_may_fail_early(redis_url):
    """A raw agent grants credit by hand: the relay sends only that, and stops at the agent's error."""
    data = audio_bytes(100_000)
    async with running_relay(redis_url, stream_window=WINDOW) as relay, relay.client() as client:
        instance_id, token = await relay.register()
        async with raw_agent(relay.url, token) as ws:
            caller = asyncio.create_task(client.post(f"/api/chat/{instance_id}/audio/transcriptions",
                                                     files=files(data)))
            request = await next_of(ws, wire.Request)
            assert request.body["model"] == "w" and request.body["filename"] == "talk.mp3"
            received = bytearray()
            while len(received) < WINDOW:  # the first window comes without credit
                received += (await next_of(ws, wire.Upload)).payload
            assert len(received) == WINDOW
            await ws.send(wire.encode_credit(request.id, 1000))
            upload = await next_of(ws, wire.Upload)
            assert len(upload.payload) == 1000 and bytes(received + upload.payload) == data[:WINDOW + 1000]
            await ws.send(wire.encode(wire.StreamError(request.id, 422, "not this one", "bad_audio")))
            response = await caller
            assert_openai_error(response, 422, code="bad_audio")
            # Nothing more came for that stream: the next frame the agent gets is the next request's.
            second = asyncio.create_task(client.post(f"/api/chat/{instance_id}",
                                                     json={"stream": False,
                                                           "messages": [{"role": "user", "content": "x"}]}))
            event = wire.decode(await ws.recv())
            while type(event) is wire.Pong:
                event = wire.decode(await ws.recv())
            assert type(event) is wire.Request and event.op == wire.OP_CHAT, event
            answer = orjson.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": "ok"}}]})
            await ws.send(wire.encode_data(event.id, answer))
            await ws.send(wire.encode(wire.End(event.id)))
            assert (await second).status_code == 200


def test_the_bus_carries_upload_frames_and_names_the_session_of_an_upload_credit():
    upload = wire.encode_envelope("node-a", wire.Upload(3, b"\x00\x01audio"))
    assert wire.decode_envelope(upload) == wire.Envelope("node-a", wire.Upload(3, b"\x00\x01audio"))
    credit = wire.encode_envelope("node-b", wire.Credit(3, 4096), "session-1")
    assert wire.decode_envelope(credit) == wire.Envelope("node-b", wire.Credit(3, 4096), "session-1")


@pytest.mark.slow
async def test_one_address_cannot_make_the_relay_hold_more_uploads_than_its_stream_limit(redis_url):
    """Forms are read before any stream lease (on /v1 before the instance is known): the relay
    bounds how many one address has in its memory at once, whatever the door."""
    async with transcribing_relay(redis_url, max_streams_per_caller=1) as (relay, client, instance_id):
        boundary = "b0undary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
                "Content-Type: audio/wav\r\n\r\n").encode()
        wav = wav_file(0.5)
        tail = f"\r\n--{boundary}--\r\n".encode()
        more = asyncio.Event()

        async def slow_body():
            yield head + wav[:100]
            await more.wait()  # the relay is reading this form, holding the address's one slot
            yield wav[100:] + tail

        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        first = asyncio.create_task(client.post("/v1/audio/transcriptions", content=slow_body(), headers=headers,
                                                params={}))
        await wait_until(lambda: relay.services.stream_leases.held, what="the first form being read")
        for url in ("/v1/audio/transcriptions", f"/api/chat/{instance_id}/audio/transcriptions",
                    f"/api/chat/{instance_id}/audio-to-text"):
            refused = await client.post(url, files=files(wav, "b.wav", "audio/wav"))
            assert_openai_error(refused, 429, code="too_many_streams")
        more.set()
        answered = await first
        assert answered.status_code == 422  # it named no instance: refused once read, and the slot is free again
        ok = await client.post(f"/api/chat/{instance_id}/audio/transcriptions", files=files(wav, "c.wav", "audio/wav"))
        assert ok.status_code == 200, ok.text
