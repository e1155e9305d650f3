"""The optional ``real_model`` bench phase (bench/realmodel.py), without a real model.

The phase is pointed at the bench's fake upstream through ``real_model.url`` (any OpenAI-compatible
server will do); a real llama.cpp server is never needed here. No timing assertions.
"""

from __future__ import annotations

import asyncio

import pytest

from bench import loadgen as lg
from bench import realmodel
from bench.run import Options, build_parser, options_from, run_bench, table
from bench.upstream import UpstreamServer

pytestmark = pytest.mark.slow


def _event(text: str | None) -> bytes:
    delta = {"content": text} if text is not None else {"role": "assistant"}
    return b"data: " + realmodel.json.dumps({"choices": [{"delta": delta}]}).encode() + b"\n\n"


def test_content_events_across_chunks_and_reads():
    events = [_event(None), _event("Hel"), _event("lo"), _event(""), b"data: [DONE]\n\n"]
    body = b"".join(events)
    # HTTP chunks that do not line up with events, and reads that split chunks
    chunks = [body[:40], body[40:90], body[90:]]
    raw = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    raw += b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks) + b"0\r\n\r\n"
    cut = raw.index(b"lo") + 1  # the second token's event completes in the second read
    log = [(1.0, raw[:cut]), (2.0, raw[cut:])]
    found = realmodel.content_events(log)
    assert [text for _, text in found] == ["Hel", "lo"]
    assert [t for t, _ in found] == [1.0, 2.0]
    # a plain (Content-Length) body
    plain = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    assert [text for _, text in realmodel.content_events([(0.5, plain)])] == ["Hel", "lo"]


def test_timed_request_through_the_load_generator():
    async def scenario() -> None:
        async with UpstreamServer() as up, lg.HTTPConnection("127.0.0.1", up.port) as conn:
            for n in (1, 5):  # twice on one keep-alive connection; paced, so that the reads differ
                one = await realmodel._timed_request(lg, conn, "/v1/chat/completions", lg.chat_body(n, rate=200.0))
                assert one["ok"] and one["tokens"] == n and one["ttft"] is not None
                assert ("rate" in one) == (n > 1)

    asyncio.run(scenario())


def test_phase_is_optional_and_asked_for_by_flag(monkeypatch):
    monkeypatch.setenv("RELAY_BENCH_REAL_MODEL", "/some/model.gguf")
    o = options_from([])
    assert "real_model" not in o.phases and o.real_model["model"] == "/some/model.gguf"
    o = options_from(["--real-model-url", "http://127.0.0.1:1/v1", "--phases", "ttfc"])
    assert o.phases == ["ttfc", "real_model"]
    assert options_from(["--phases", "real_model", "--quick"]).real_model["requests"] == realmodel.QUICK["requests"]
    assert "--real-model" in build_parser().format_help()


def test_phase_end_to_end_and_skipped(tmp_path):
    async def scenario() -> tuple[dict, dict]:
        async with UpstreamServer() as up:
            cfg = dict(realmodel.DEFAULTS, url=f"http://127.0.0.1:{up.port}/v1", requests=3, warmup=1)
            ran, _ = await run_bench(Options(phases=["real_model"], real_model=cfg, paths=["direct", "relay"],
                                             nginx=False, httpx=False, output=tmp_path, plot=False))
        skipped, _ = await run_bench(Options(phases=["real_model"], real_model=dict(realmodel.DEFAULTS),
                                             paths=["direct", "relay"], nginx=False, httpx=False, output=tmp_path,
                                             plot=False))
        return ran, skipped

    ran, skipped = asyncio.run(scenario())
    rm = ran["real_model"]
    assert rm["status"] == "ok", rm
    for name in ("direct", "relay"):
        assert rm[name]["n"] == 3 and rm[name]["errors"] == 0 and rm[name]["ttft_ms"]["p50"] is not None
    # (the fake upstream writes an unpaced stream at once, so there may be no token rate to compare)
    assert rm["relay"]["added_p50_ms"] is not None and "tokens_per_s" in rm["relay"]
    assert rm["same_text_every_request"]
    assert "real model server (bench" in table(ran)
    assert skipped["real_model"]["status"] == "skipped"
    assert "real_model: skipped (no model server given" in table(skipped)
