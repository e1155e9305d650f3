"""The agent's side of ``images``: the backends, the client's dispatch, bodies in frames.

The demo model's PNGs are checked by decoding them (signature, chunk CRCs,
IHDR, pixel rows), not by trusting the encoder.  The OpenAI backend talks to
``FakeUpstream`` over real HTTP (or, for answers no sane server gives, to an
``httpx.MockTransport``).  The client is driven by a hand-written relay on a
real websocket, which checks every frame against the credit it granted; one
test goes through the real relay with a frame limit that a body sent as one
frame would break.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import struct
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import ClassVar

import httpx
import orjson
import pytest
import websockets

import wire
from agent.backends import BackendError
from agent.cli import build_parser, make_backend, settings_from
from agent.client import AgentClient
from agent.demo_model import DemoBackend, demo_image
from agent.media import encode_png
from agent.upstream import MAX_IMAGE_DOWNLOAD, OpenAIBackend
from tests.helpers import (
    FAKE_PNG,
    FakeUpstream,
    free_port,
    openai_backend,
    running_agent,
    running_relay,
    running_upstream,
    wait_until,
)

pytestmark = pytest.mark.anyio

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, RGB rows) of an 8-bit RGB, filter-0 PNG; asserts it is well formed."""
    assert data[:8] == PNG_SIGNATURE
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from("!I", data, pos)
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from("!I", data, pos + 8 + length)
        assert crc == zlib.crc32(kind + body), f"bad CRC on {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack("!IIBBBBB", chunks[0][1])
    assert (depth, colour, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + 3 * width
    assert len(raw) == height * stride
    rows = [raw[y * stride : (y + 1) * stride] for y in range(height)]
    assert all(row[0] == 0 for row in rows)  # filter type "none" on every scanline
    return width, height, [row[1:] for row in rows]


def images_of(answer: bytes) -> list[dict]:
    body = orjson.loads(answer)
    assert isinstance(body["created"], int)
    assert body["data"] and all("url" not in item for item in body["data"])
    return body["data"]


def png_of(item: dict) -> bytes:
    return base64.b64decode(item["b64_json"], validate=True)


# -- the demo model --------------------------------------------------------------


def test_the_demo_declares_images_and_its_image_model():
    demo = DemoBackend()
    assert demo.capabilities == (wire.OP_CHAT, wire.OP_IMAGES, wire.OP_TRANSCRIBE)
    assert demo.image_models == ("demo-image",)


async def test_the_demo_draws_a_valid_png_of_the_prompt():
    answer = await DemoBackend().images({"prompt": "a red fox", "model": "demo-image"})
    (item,) = images_of(answer)
    assert item["revised_prompt"] == "a red fox"
    width, height, rows = read_png(png_of(item))
    assert (width, height) == (256, 256)
    assert rows[0] != rows[-1]  # a gradient, not one flat colour
    # The same prompt draws the same picture; another prompt, another one.
    assert png_of(images_of(await DemoBackend().images({"prompt": "a red fox"}))[0]) == png_of(item)
    assert png_of(images_of(await DemoBackend().images({"prompt": "a blue fox"}))[0]) != png_of(item)


def test_the_demo_png_reads_in_an_independent_decoder():
    image_module = pytest.importorskip("PIL.Image")
    png = demo_image("lighthouse", 40, 30)
    with image_module.open(io.BytesIO(png)) as image:
        image.load()
        assert image.size == (40, 30) and image.mode == "RGB"
        _, _, rows = read_png(png)
        assert image.getpixel((0, 0)) == tuple(rows[0][:3])
        assert image.getpixel((20, 15)) == tuple(rows[15][60:63])


@pytest.mark.parametrize("size, expected", [
    (None, (256, 256)), ("auto", (256, 256)), ("64x32", (64, 32)), ("1x1", (1, 1)), (" 17X9 ", (17, 9)),
    ("1024x1024", (1024, 1024)), ("0x5000", (1, 1024)), ("4096x2", (1024, 2)),
])
async def test_the_demo_honours_size_clamped_to_1_to_1024(size, expected):
    body = {"prompt": "p"} if size is None else {"prompt": "p", "size": size}
    (item,) = images_of(await DemoBackend().images(body))
    width, height, _ = read_png(png_of(item))
    assert (width, height) == expected


@pytest.mark.parametrize("n", [None, 1, 2, 4])
async def test_the_demo_draws_n_different_images(n):
    body = {"prompt": "three cats", "size": "16x16"} if n is None else {"prompt": "three cats", "size": "16x16", "n": n}
    items = images_of(await DemoBackend().images(body))
    assert len(items) == (n or 1)
    pngs = [png_of(item) for item in items]
    assert len(set(pngs)) == len(pngs)
    for png in pngs:
        assert read_png(png)[:2] == (16, 16)


@pytest.mark.parametrize("size", ["big", "12x", "x12", "-1x5", "1.5x2", "", "12x12x12", "1e3x5", 512, ["1x1"],
                                  "1234567890x1"])
async def test_a_malformed_size_is_422(size):
    with pytest.raises(BackendError) as info:
        await DemoBackend().images({"prompt": "p", "size": size})
    assert info.value.status == 422
    assert "WIDTHxHEIGHT" in info.value.message


@pytest.mark.parametrize("n", [0, 11, -1, "2", True, 1.5])
async def test_n_outside_1_to_10_is_422(n):
    with pytest.raises(BackendError) as info:
        await DemoBackend().images({"prompt": "p", "n": n, "size": "8x8"})
    assert info.value.status == 422


def test_encode_png_refuses_rows_that_do_not_fit():
    with pytest.raises(ValueError):
        encode_png(2, 1, [b"\x00" * 5])
    with pytest.raises(ValueError):
        encode_png(1, 2, [b"\x00" * 3])


# -- the OpenAI-compatible backend -----------------------------------------------


async def test_images_are_offered_only_with_image_models():
    plain = OpenAIBackend("http://127.0.0.1:9/v1")
    drawing = OpenAIBackend("http://127.0.0.1:9/v1", image_models=["sdxl", "flux"])
    try:
        assert plain.capabilities == (wire.OP_CHAT,) and plain.image_models == ()
        assert drawing.capabilities == (wire.OP_CHAT, wire.OP_IMAGES)
        assert drawing.image_models == ("sdxl", "flux")
    finally:
        await plain.aclose()
        await drawing.aclose()


def test_the_cli_passes_image_models_to_the_openai_backend(monkeypatch):
    args = build_parser().parse_args(["run", "--backend", "openai", "--upstream-url", "http://127.0.0.1:9/v1",
                                      "--image-model", "sdxl, flux"])
    backend = make_backend(settings_from(args))
    assert backend.image_models == ("sdxl", "flux") and wire.OP_IMAGES in backend.capabilities
    monkeypatch.setenv("AGENT_IMAGE_MODEL", "from-env")
    args = build_parser().parse_args(["run", "--backend", "openai", "--upstream-url", "http://127.0.0.1:9/v1"])
    assert make_backend(settings_from(args)).image_models == ("from-env",)
    # The demo draws with its own model whatever is asked.
    demo = make_backend(settings_from(build_parser().parse_args(["run", "--backend", "demo",
                                                                 "--image-model", "sdxl"])))
    assert demo.image_models == ("demo-image",)


async def test_b64_answers_pass_through_and_the_body_reaches_the_model():
    async with running_upstream(FakeUpstream()) as upstream:
        backend = OpenAIBackend(upstream.url, image_models=["fake-image"])
        try:
            body = {"prompt": "a boat", "model": "fake-image", "n": 2, "size": "3x2",
                    "response_format": "b64_json", "stream": True}
            items = images_of(await backend.images(body))
        finally:
            await backend.aclose()
    # Everything but "stream": the answer travels as one body, never as partial images.
    assert upstream.image_requests == [{k: v for k, v in body.items() if k != "stream"}]
    assert len(items) == 2
    for item in items:
        assert png_of(item) == FAKE_PNG
        assert read_png(png_of(item))[:2] == (3, 2)


async def test_url_answers_are_downloaded_and_sent_as_b64():
    async with running_upstream(FakeUpstream(image_as_url=True)) as upstream:
        backend = OpenAIBackend(upstream.url, api_key="sk-upstream", image_models=["fake-image"])
        try:
            items = images_of(await backend.images({"prompt": "a lake", "model": "fake-image", "n": 2}))
        finally:
            await backend.aclose()
    assert [png_of(item) for item in items] == [FAKE_PNG, FAKE_PNG]
    assert [item["revised_prompt"] for item in items] == ["a lake", "a lake"]  # the rest of each item stays
    assert len(upstream.file_requests) == 2
    # The download is the model server's own: its key goes with it.
    assert all(headers["authorization"] == "Bearer sk-upstream" for headers in upstream.file_requests)


async def test_a_download_past_20_mib_is_refused_with_502():
    too_big = FAKE_PNG + b"\x00" * MAX_IMAGE_DOWNLOAD
    async with running_upstream(FakeUpstream(image_as_url=True, image_file=too_big)) as upstream:
        backend = OpenAIBackend(upstream.url, image_models=["fake-image"])
        try:
            with pytest.raises(BackendError) as info:
                await backend.images({"prompt": "huge", "model": "fake-image"})
        finally:
            await backend.aclose()
    assert info.value.status == 502 and "20 MiB" in info.value.message


def mock_backend(handler, **kwargs) -> OpenAIBackend:
    return OpenAIBackend("http://upstream.test/v1", image_models=["m"], transport=httpx.MockTransport(handler),
                         **kwargs)


async def test_images_stored_elsewhere_are_fetched_without_the_upstream_key():
    seen: dict[str, httpx.Request] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen[request.url.host] = request
        if request.url.path == "/v1/images/generations":
            return httpx.Response(200, json={"created": 5, "usage": {"total_tokens": 1}, "data": [
                {"url": "http://store.test/signed/abc.png"},
                {"url": "data:image/png;base64," + base64.b64encode(FAKE_PNG).decode()},
                {"b64_json": base64.b64encode(b"already").decode()},
            ]})
        return httpx.Response(200, content=FAKE_PNG, headers={"content-type": "image/png"})

    backend = mock_backend(handler, api_key="sk-secret")
    try:
        answer = orjson.loads(await backend.images({"prompt": "p", "model": "m"}))
    finally:
        await backend.aclose()
    assert answer["created"] == 5 and answer["usage"] == {"total_tokens": 1}
    assert [base64.b64decode(item["b64_json"]) for item in answer["data"]] == [FAKE_PNG, FAKE_PNG, b"already"]
    assert seen["upstream.test"].headers["authorization"] == "Bearer sk-secret"
    assert "authorization" not in seen["store.test"].headers


@pytest.mark.parametrize("answer", [
    b"not json", b"[]", b'{"created": 1}', b'{"data": "x"}', b'{"data": [1]}', b'{"data": [{"revised_prompt": "p"}]}',
    b'{"data": [{"url": "data:image/png,notbase64"}]}', b'{"data": [{"url": "data:image/png;base64,a$b"}]}',
    b'{"data": [{"url": 7}]}',
])
async def test_answers_that_are_no_images_response_are_502(answer):
    backend = mock_backend(lambda request: httpx.Response(200, content=answer))
    try:
        with pytest.raises(BackendError) as info:
            await backend.images({"prompt": "p", "model": "m"})
    finally:
        await backend.aclose()
    assert info.value.status == 502


async def test_an_image_url_that_fails_is_502():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/images/generations":
            return httpx.Response(200, json={"data": [{"url": "http://upstream.test/gone.png"}]})
        return httpx.Response(410)

    backend = mock_backend(handler)
    try:
        with pytest.raises(BackendError) as info:
            await backend.images({"prompt": "p", "model": "m"})
    finally:
        await backend.aclose()
    assert info.value.status == 502 and "410" in info.value.message


async def test_an_unreachable_upstream_is_502():
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", image_models=["m"])
    try:
        with pytest.raises(BackendError) as info:
            await backend.images({"prompt": "p", "model": "m"})
    finally:
        await backend.aclose()
    assert info.value.status == 502 and "unreachable" in info.value.message


@pytest.mark.parametrize("call", ["images", "complete", "stream"])
async def test_an_upstream_404_is_502_upstream_not_found(call):
    # A 404 reaching the caller would read as "no such instance".
    async with running_upstream(FakeUpstream(fail_status=404)) as upstream:
        backend = OpenAIBackend(upstream.url, image_models=["fake-image"])
        body = {"prompt": "p", "model": "fake-image", "messages": [{"role": "user", "content": "x"}]}
        try:
            with pytest.raises(BackendError) as info:
                if call == "stream":
                    async for _ in backend.stream(body):
                        pass
                else:
                    await getattr(backend, call)(body)
        finally:
            await backend.aclose()
    assert (info.value.status, info.value.code) == (502, "upstream_not_found")
    assert "fake" in info.value.message and "failure" in info.value.message  # the upstream's own words


@pytest.mark.slow
@pytest.mark.parametrize("status, mapped, code", [
    (400, 400, "upstream_error"), (422, 422, "upstream_error"), (429, 429, "upstream_error"),
    (401, 502, "upstream_error"), (403, 502, "upstream_error"), (407, 502, "upstream_error"),
    (404, 502, "upstream_not_found"), (500, 502, "upstream_error"), (503, 502, "upstream_error"),
])
async def test_upstream_errors_on_images_map_like_chat(status, mapped, code):
    async with running_upstream(FakeUpstream(fail_status=status)) as upstream:
        backend = OpenAIBackend(upstream.url, image_models=["fake-image"])
        try:
            with pytest.raises(BackendError) as info:
                await backend.images({"prompt": "p", "model": "fake-image"})
        finally:
            await backend.aclose()
    assert (info.value.status, info.value.code) == (mapped, code)
    assert info.value.message == "model server: fake image failure"


# -- the client, against a hand-written relay -------------------------------------


@dataclass
class Answer:
    data: list[bytes] = field(default_factory=list)
    end: wire.End | wire.StreamError | None = None

    @property
    def body(self) -> bytes:
        return b"".join(self.data)


class HandRelay:
    """A relay of a few lines: welcomes one agent, sends it requests, reads their frames.

    Credit is granted only once the agent has run out (a window at a time), so
    every large body makes the agent wait for credit, more than once.
    """

    def __init__(self) -> None:
        self.hello: wire.Hello | None = None
        self._ws = None
        self._connected = asyncio.Event()
        self._done = asyncio.Event()

    async def handler(self, ws) -> None:
        hello = wire.decode(await ws.recv())
        assert type(hello) is wire.Hello
        self.hello = hello
        await ws.send(wire.encode(wire.Welcome(wire.PROTOCOL_VERSION, "inst", "node", 5.0)))
        self._ws = ws
        self._connected.set()
        await self._done.wait()

    async def ask(self, request: wire.Request) -> Answer:
        """Send ``request``; read its frames to its end, checking each against the credit granted."""
        assert self._ws is not None
        await self._ws.send(wire.encode(request))
        answer, sent, granted = Answer(), 0, 0
        async with asyncio.timeout(30):
            while answer.end is None:
                event = wire.decode(await self._ws.recv())
                match event:
                    case wire.Data(id=sid, payload=payload):
                        assert sid == request.id
                        assert len(payload) <= request.window, "a frame larger than the window"
                        # What the agent sent before this frame is below all it was
                        # ever granted (it may overdraw its last credit, never send on none).
                        assert sent < request.window + granted, "sent without credit"
                        sent += len(payload)
                        answer.data.append(payload)
                        if sent >= request.window + granted:
                            await self._ws.send(wire.encode_credit(sid, request.window))
                            granted += request.window
                    case wire.End() | wire.StreamError():
                        assert event.id == request.id
                        answer.end = event
                    case wire.Ping(ts=ts):
                        await self._ws.send(wire.encode(wire.Pong(ts)))
        return answer


class WatchedWindow(wire.SendWindow):
    """The agent's credit window, noting every send made with no credit left."""

    overdrafts: ClassVar[list[int]] = []  # one list per test: the fixture sets it

    def sent(self, nbytes: int) -> None:
        if self.credit <= 0:
            self.overdrafts.append(nbytes)
        super().sent(nbytes)


@pytest.fixture
def overdrafts(monkeypatch) -> list[int]:
    """Sends the agent makes without credit (an empty list, if it behaves)."""
    found: list[int] = []
    monkeypatch.setattr(WatchedWindow, "overdrafts", found)
    monkeypatch.setattr(wire, "SendWindow", WatchedWindow)
    return found


@contextlib.asynccontextmanager
async def hand_relay(backend, models: list[str]) -> AsyncIterator[HandRelay]:
    relay = HandRelay()
    port = free_port()
    async with websockets.serve(relay.handler, "127.0.0.1", port, max_size=None):
        client = AgentClient(relay_url=f"http://127.0.0.1:{port}", token="ira_x", backend=backend, models=models,
                             on_status=lambda line: None)
        task = asyncio.create_task(client.run())
        try:
            await asyncio.wait_for(relay._connected.wait(), 10)
            yield relay
        finally:
            relay._done.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_the_hello_names_the_image_models():
    async with hand_relay(DemoBackend(rate=0), ["demo"]) as relay:
        assert relay.hello is not None
        assert relay.hello.image_models == ("demo-image",)
        assert relay.hello.capabilities == (wire.OP_CHAT, wire.OP_IMAGES, wire.OP_TRANSCRIBE)
    async with running_upstream(FakeUpstream()) as upstream, hand_relay(openai_backend(upstream), ["m"]) as relay:
        assert relay.hello is not None
        assert relay.hello.image_models == () and relay.hello.capabilities == (wire.OP_CHAT,)


async def test_an_images_request_is_answered_with_one_json_body():
    async with hand_relay(DemoBackend(rate=0), ["demo"]) as relay:
        answer = await relay.ask(wire.Request(1, {"prompt": "a kite", "model": "demo-image", "n": 2,
                                                  "size": "32x24"}, False, op=wire.OP_IMAGES))
    assert answer.end == wire.End(1)
    items = images_of(answer.body)
    assert [read_png(png_of(item))[:2] for item in items] == [(32, 24), (32, 24)]


async def test_a_failed_images_request_is_a_stream_error():
    async with hand_relay(DemoBackend(rate=0), ["demo"]) as relay:
        answer = await relay.ask(wire.Request(3, {"prompt": "p", "size": "wide"}, False, op=wire.OP_IMAGES))
    assert answer.data == []
    assert type(answer.end) is wire.StreamError and answer.end.status == 422


async def test_images_to_an_agent_without_the_capability_is_501():
    async with running_upstream(FakeUpstream()) as upstream, hand_relay(openai_backend(upstream), ["m"]) as relay:
        answer = await relay.ask(wire.Request(5, {"prompt": "p", "model": "m"}, False, op=wire.OP_IMAGES))
        # The connection is still good for what the agent can do.
        chat = await relay.ask(wire.Request(6, {"model": "m", "messages": [{"role": "user", "content": "x"}]},
                                            False))
    assert answer.data == []
    assert answer.end == wire.StreamError(5, 501, "this agent cannot run 'images'", "capability_not_supported")
    assert upstream.image_requests == []
    assert chat.end == wire.End(6) and orjson.loads(chat.body)["object"] == "chat.completion"


async def test_a_large_images_body_goes_in_window_sized_frames(overdrafts):
    async with hand_relay(DemoBackend(rate=0), ["demo"]) as relay:
        body = {"prompt": "a storm", "n": 4, "size": "1024x1024"}
        answer = await relay.ask(wire.Request(7, body, False, window=4096, op=wire.OP_IMAGES))
    assert answer.end == wire.End(7)
    assert len(answer.data) > 2
    assert overdrafts == []  # it waited for credit each time it ran out
    assert all(len(frame) == 4096 for frame in answer.data[:-1])
    # Reassembled, the frames are the body the demo draws (pictures are deterministic).
    assert images_of(answer.body) == images_of(await DemoBackend().images(body))
    for item in images_of(answer.body):
        assert read_png(png_of(item))[:2] == (1024, 1024)


async def test_a_large_chat_body_goes_in_window_sized_frames(overdrafts):
    async with running_upstream(FakeUpstream(chunks=3000)) as upstream, \
            hand_relay(openai_backend(upstream), ["fake-model"]) as relay:
        request = wire.Request(9, {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}, False,
                               window=1000)
        answer = await relay.ask(request)
    assert answer.end == wire.End(9)
    assert len(answer.data) > 10
    assert all(len(frame) == 1000 for frame in answer.data[:-1])
    assert overdrafts == []
    text = orjson.loads(answer.body)["choices"][0]["message"]["content"]
    assert text == " ".join(f"w{i}" for i in range(3000))


# -- through the real relay ----------------------------------------------------------


async def test_a_body_larger_than_the_relays_frame_limit_reaches_the_caller(redis_url):
    # Sent as one frame, this answer would exceed max_frame_bytes and the relay
    # would close the agent's connection; in window-sized frames it is fine.
    frame_limit = 64 * 1024
    upstream = FakeUpstream(chunks=30_000)
    async with running_upstream(upstream), \
            running_relay(redis_url, max_frame_bytes=frame_limit, stream_window=16 * 1024) as relay:
        instance_id, token = await relay.register()
        async with running_agent(relay.url, token, openai_backend(upstream)) as agent, relay.client() as client:
            response = await client.post(f"/api/chat/{instance_id}", json={
                "stream": False, "messages": [{"role": "user", "content": "long"}]})
            assert response.status_code == 200, response.text
            assert len(response.content) > frame_limit
            text = response.json()["choices"][0]["message"]["content"]
            assert text == " ".join(f"w{i}" for i in range(30_000))
            await wait_until(lambda: agent.status.served == 1, what="the agent counting the request served")
            assert agent.status.connected and agent.status.failed == 0


@pytest.mark.parametrize("failure", ["status", "transport"])
async def test_a_signed_image_url_never_reaches_the_error_message(failure):
    # The model server may sign an image URL for the agent alone: its query is a credential.
    import httpx

    signed = "https://store.example/img.png?X-Amz-Signature=SECRETSIG&X-Amz-Credential=AKIAXXXX"

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/images/generations"):
            return httpx.Response(200, json={"created": 1, "data": [{"url": signed}]})
        if failure == "transport":
            raise httpx.ConnectError(f"cannot connect to {request.url}")
        return httpx.Response(403)

    backend = OpenAIBackend("http://upstream.local/v1", models=["m"], image_models=["i"],
                            transport=httpx.MockTransport(answer))
    try:
        with pytest.raises(BackendError) as info:
            await backend.images({"prompt": "p", "model": "i"})
    finally:
        await backend.aclose()
    assert info.value.status == 502 and "store.example" in info.value.message
    assert not any(secret in info.value.message for secret in ("SECRETSIG", "AKIA", "img.png"))
