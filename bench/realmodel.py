"""Optional bench phase ``real_model``: the relay in front of a real model server.

    python -m bench --phases real_model --real-model MODEL.gguf --real-model-python /tmp/llvenv/bin/python
    python -m bench --phases real_model --real-model-url http://127.0.0.1:8080/v1   # a server already running

Given a GGUF file, the phase starts ``python -m llama_cpp.server`` (llama-cpp-python, installed in an
interpreter of its own: it is no dependency of this project) and waits for ``/v1/models``; given a URL it
uses that server as it is. It registers one more instance on relay A, starts an agent for it
(``relay-agent run --backend openai --upstream-url <server>``), and sends sequential streamed chat
requests (a short prompt, ``max_tokens`` 32, temperature 0), alternating direct and through the relay
on keep-alive connections of ``bench.loadgen``. Per path it reports the time to the first content
token (p50/p99), the added time, and the token rate after the first token (content chunks per second),
with the relay's rate as a ratio of the direct one.

Nothing here is needed for CI: the phase is not among the default phases, and when no model server
is given, or the interpreter cannot import ``llama_cpp.server``, or the file is missing, it records
``{"status": "skipped", "reason": ...}`` and the run goes on.

``python -m bench.realmodel make-model`` writes a GGUF file that llama.cpp can load without any
download: a small LLaMA-shaped network with seeded random weights and the real LLaMA tokenizer of
the vocabulary file llama.cpp ships for its tokenizer tests (inside the llama-cpp-python sdist). Its
text is gibberish; its tokenizer, sampling, attention and matrix products are real work of the size
given (see bench/README.md). It needs ``numpy`` and ``gguf`` (both from PyPI), so run it with the
model server's interpreter.

This module imports only the standard library at the top, so that the model server's interpreter
can run ``make-model`` without this project's dependencies.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import subprocess
import sys
import tarfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

ENV = {  # option -> environment variable that supplies its default
    "model": "RELAY_BENCH_REAL_MODEL",
    "python": "RELAY_BENCH_REAL_MODEL_PYTHON",
    "url": "RELAY_BENCH_REAL_MODEL_URL",
    "server_args": "RELAY_BENCH_REAL_MODEL_SERVER_ARGS",
}
DEFAULTS: dict[str, Any] = {
    "model": None,  # GGUF file: the phase starts llama_cpp.server on it
    "python": None,  # interpreter with llama-cpp-python[server] (default: this one)
    "url": None,  # or an OpenAI-compatible server already running: http://127.0.0.1:PORT/v1
    "server_args": "--n_ctx 512",  # extra arguments for llama_cpp.server
    "requests": 30,  # measured requests per path
    "warmup": 3,  # requests per path before measuring
    "max_tokens": 32,
    "prompt": "Write one sentence about a lighthouse.",
    "start_timeout": 300.0,  # seconds for the server to answer /v1/models
}
QUICK = {"requests": 3, "warmup": 1, "max_tokens": 8}
HOST = "127.0.0.1"


# -- options ----------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("real_model phase (optional; see bench/README.md)")
    g.add_argument("--real-model", metavar="GGUF",
                   help=f"GGUF file to serve with llama_cpp.server ({ENV['model']}); adds the phase")
    g.add_argument("--real-model-python", metavar="PYTHON",
                   help=f"interpreter that has llama-cpp-python[server] ({ENV['python']}; default: this one)")
    g.add_argument("--real-model-url", metavar="URL",
                   help=f"an OpenAI-compatible server already running, http://127.0.0.1:PORT/v1 ({ENV['url']});"
                        " adds the phase")
    g.add_argument("--real-model-server-args", metavar="ARGS",
                   help=f"extra llama_cpp.server arguments ({ENV['server_args']}; default {DEFAULTS['server_args']!r})")
    g.add_argument("--real-model-requests", type=int, metavar="N",
                   help=f"measured requests per path (default {DEFAULTS['requests']})")
    g.add_argument("--real-model-max-tokens", type=int, metavar="N",
                   help=f"max_tokens per request (default {DEFAULTS['max_tokens']})")


def options(args: argparse.Namespace, quick: bool = False) -> tuple[dict[str, Any], bool]:
    """The phase's settings from the command line, then the environment, then the defaults; and
    whether a flag asked for the phase (the environment alone never does)."""
    cfg = dict(DEFAULTS)
    if quick:
        cfg.update(QUICK)
    for key, var in ENV.items():
        if os.environ.get(var):
            cfg[key] = os.environ[var]
    given = {
        "model": args.real_model, "python": args.real_model_python, "url": args.real_model_url,
        "server_args": args.real_model_server_args, "requests": args.real_model_requests,
        "max_tokens": args.real_model_max_tokens,
    }
    cfg.update({k: v for k, v in given.items() if v is not None})
    if args.real_model_requests is not None:
        cfg["warmup"] = min(cfg["warmup"], max(1, args.real_model_requests // 10))
    return cfg, bool(args.real_model or args.real_model_url)


# -- the phase ---------------------------------------------------------------------------------


class Skip(Exception):
    """A piece of the phase is missing; the reason is what the run prints."""


async def run_phase(bench: Any) -> None:
    """Measure direct vs relay 1 node in front of a real model server; results in
    ``bench.results["real_model"]``."""
    cfg = bench.o.real_model
    started: list[Any] = []
    try:
        out = await _measure(bench, cfg, started)
    except Skip as why:
        out = {"status": "skipped", "reason": str(why)}
        bench.say(f"real_model: skipped ({why})")
    finally:
        for proc in reversed(started):
            bench.group.stop(proc)
            bench.procs.pop(proc.name, None)
    bench.results["real_model"] = out


async def _measure(bench: Any, cfg: dict[str, Any], started: list[Any]) -> dict[str, Any]:
    from bench import loadgen as lg
    from bench.procs import console_script, free_port

    server: dict[str, Any] = {}
    if cfg.get("url"):
        url = urllib.parse.urlsplit(str(cfg["url"]).rstrip("/"))
        if url.scheme != "http" or url.port is None or url.hostname is None:
            raise Skip(f"--real-model-url must look like http://127.0.0.1:PORT/v1, not {cfg['url']!r}")
        try:
            lg.check_loopback(url.hostname)
        except ValueError as e:
            raise Skip(str(e)) from None
        host, port, base = url.hostname, url.port, url.path or "/v1"
        server["url"] = cfg["url"]
    elif cfg.get("model"):
        model, size, python = await asyncio.to_thread(_check_server_pieces, cfg)
        host, port, base = HOST, free_port(), "/v1"
        cmd = [python, "-m", "llama_cpp.server", "--model", str(model), "--host", host, "--port", str(port),
               *str(cfg.get("server_args") or "").split()]
        bench.say(f"real_model: starting {' '.join(cmd)}")
        proc = bench.group.start("real_model_server", cmd)
        started.append(proc)
        bench.procs["real_model_server"] = proc
        server.update(command=cmd, model_file=str(model), model_bytes=size)
        deadline = time.monotonic() + float(cfg["start_timeout"])
        while True:
            try:
                status, _ = await lg.get_json(host, port, f"{base}/models")
                if status == 200:
                    break
            except (OSError, lg.LoadgenError):
                pass
            if not proc.alive():
                raise Skip(f"llama_cpp.server exited ({proc.popen.returncode}): {proc.tail(5)}")
            if time.monotonic() > deadline:
                raise Skip(f"llama_cpp.server not answering {base}/models after {cfg['start_timeout']} s")
            await asyncio.sleep(0.2)
    else:
        raise Skip("no model server given: pass --real-model FILE.gguf (with --real-model-python) or"
                   " --real-model-url http://127.0.0.1:PORT/v1")

    try:
        status, listing = await lg.get_json(host, port, f"{base}/models")
    except (OSError, lg.LoadgenError) as e:
        raise Skip(f"{host}:{port}{base}/models: {e}") from None
    models = [m.get("id") for m in (listing or {}).get("data", []) if isinstance(m, dict)] \
        if isinstance(listing, dict) else []
    if status != 200 or not models:
        raise Skip(f"{host}:{port}{base}/models answered {status} with no model")
    model_id = str(models[0])
    server["model"] = model_id

    inst, token = await bench.register("relay_a", "bench-real-model")
    agent = bench.group.start("agent_real", [
        *console_script("relay-agent", "agent.cli"),
        "run", "--relay-url", f"http://{HOST}:{bench.ports['relay_a']}", "--token", token,
        "--backend", "openai", "--upstream-url", f"http://{host}:{port}{base}", "--model", model_id,
        "--max-concurrency", "4",
    ], env={"AGENT_CREDENTIALS": str(bench.work / "agent_real.json")})
    started.append(agent)
    bench.procs["agent_real"] = agent
    await bench.wait_online("relay_a", inst, "agent_real", timeout=60.0)

    paths = {"direct": (host, port, f"{base}/chat/completions"),
             "relay": (HOST, bench.ports["relay_a"], f"/api/chat/{inst}/chat/completions")}
    body = json.dumps({
        "model": model_id, "messages": [{"role": "user", "content": cfg["prompt"]}], "stream": True,
        "max_tokens": int(cfg["max_tokens"]), "temperature": 0, "seed": 1,
    }).encode()
    n, warm = int(cfg["requests"]), int(cfg["warmup"])
    bench.say(f"real_model: {model_id}, {warm}+{n} requests per path, interleaved, max_tokens {cfg['max_tokens']}")
    conns = {name: lg.HTTPConnection(h, p) for name, (h, p, _) in paths.items()}
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
    errors: dict[str, list[str]] = {name: [] for name in paths}
    try:
        for i in range(warm + n):
            names = list(paths)
            k = i % len(names)
            for name in names[k:] + names[:k]:  # who goes first alternates
                try:
                    one = await _timed_request(lg, conns[name], paths[name][2], body)
                except (OSError, lg.LoadgenError) as e:
                    one = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                if i < warm:
                    continue
                if one["ok"] and one["ttft"] is not None:
                    samples[name].append(one)
                else:
                    errors[name].append(str(one.get("error"))[:200])
    finally:
        for conn in conns.values():
            await conn.close()
    return _summarize(samples, errors, server, cfg)


def _check_server_pieces(cfg: dict[str, Any]) -> tuple[Path, int, str]:
    """The model file, its size and the interpreter that can run llama_cpp.server; else Skip."""
    model = Path(cfg["model"]).expanduser()
    if not model.is_file():
        raise Skip(f"model file {model} not found")
    python = str(cfg.get("python") or sys.executable)
    try:
        check = subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True, text=True,
                               timeout=120, check=False)
    except OSError as e:
        raise Skip(f"cannot run {python}: {e}") from None
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        raise Skip(f"{python} cannot import llama_cpp.server ({last}); install llama-cpp-python[server]"
                   " into a separate venv, see bench/README.md")
    return model, model.stat().st_size, python


class _TapReader:
    """Stands in for the connection's StreamReader: the load generator reads through it as usual,
    and it notes the time and bytes of every read, to find the content tokens afterwards."""

    __slots__ = ("inner", "log")

    def __init__(self, inner: asyncio.StreamReader):
        self.inner = inner
        self.log: list[tuple[float, bytes]] = []

    async def read(self, n: int = -1) -> bytes:
        data = await self.inner.read(n)
        self.log.append((time.perf_counter(), data))
        return data


async def _timed_request(lg: Any, conn: Any, path: str, body: bytes) -> dict[str, Any]:
    if conn.writer is None:
        await conn.connect()
    if not isinstance(conn.reader, _TapReader):
        conn.reader = _TapReader(conn.reader)
    tap = conn.reader
    tap.log = []
    t0 = time.perf_counter()
    result = await conn.request("POST", path, body)
    tokens = content_events(tap.log)
    times = [t - t0 for t, _ in tokens]
    out: dict[str, Any] = {
        "ok": result.ok, "status": result.status, "error": result.error,
        "first_event": result.ttfc, "total": result.total,
        "ttft": times[0] if times else None, "tokens": len(times),
        "text": "".join(text for _, text in tokens),
    }
    if len(times) >= 2 and times[-1] > times[0]:
        out["rate"] = (len(times) - 1) / (times[-1] - times[0])
        out["span"] = times[-1] - times[0]
    if result.ok and not times:
        out.update(ok=False, error="no content in the stream")
    return out


def content_events(log: list[tuple[float, bytes]]) -> list[tuple[float, str]]:
    """(arrival time, text) of every SSE event that carries content, from the raw reads of one
    HTTP response: the time is that of the read that completed the event, as the load generator
    timestamps its events."""
    raw = b"".join(data for _, data in log)
    ends, total = [], 0
    for _, data in log:
        total += len(data)
        ends.append(total)
    head_end = raw.find(b"\r\n\r\n")
    if head_end < 0:
        return []
    head = raw[:head_end].lower()
    pos = head_end + 4
    # the body and, per body byte range, where it came from in ``raw``
    pieces: list[tuple[int, int]] = []  # (raw start, length)
    if b"transfer-encoding: chunked" in head:
        while True:
            eol = raw.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(raw[pos:eol].split(b";", 1)[0] or b"0", 16)
            if size == 0:
                break
            pieces.append((eol + 2, size))
            pos = eol + 2 + size + 2
    else:
        pieces.append((pos, len(raw) - pos))
    body = b"".join(raw[a : a + size] for a, size in pieces)
    starts, acc = [], 0  # body offset where each piece starts
    for _, size in pieces:
        starts.append(acc)
        acc += size

    def arrival(body_index: int) -> float:
        j = bisect.bisect_right(starts, body_index) - 1
        raw_index = pieces[j][0] + body_index - starts[j]
        return log[min(bisect.bisect_right(ends, raw_index), len(log) - 1)][0]

    out: list[tuple[float, str]] = []
    at = 0
    while (end := body.find(b"\n\n", at)) >= 0:
        event, at = body[at:end], end + 2
        data = b"\n".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
        if not data or data == b"[DONE]":
            continue
        try:
            obj = json.loads(data)
            text = obj["choices"][0]["delta"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            continue
        if text:
            out.append((arrival(end + 1), text))
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


def _summarize(samples: dict[str, list[dict[str, Any]]], errors: dict[str, list[str]], server: dict[str, Any],
               cfg: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"status": "ok", "server": server,
                           "request": {k: cfg[k] for k in ("prompt", "max_tokens", "requests", "warmup")}}
    for name, rows in samples.items():
        ttft = [r["ttft"] for r in rows]
        rates = [r["rate"] for r in rows if "rate" in r]
        spans = sum(r.get("span", 0.0) for r in rows)
        after_first = sum(r["tokens"] - 1 for r in rows if "span" in r)
        out[name] = {
            "n": len(rows), "errors": len(errors[name]), "error_samples": errors[name][:3],
            "ttft_ms": {"p50": _ms(_pct(ttft, 50)), "p99": _ms(_pct(ttft, 99)),
                        "min": _ms(min(ttft, default=None)), "max": _ms(max(ttft, default=None))},
            "first_event_ms_p50": _ms(_pct([r["first_event"] for r in rows if r["first_event"] is not None], 50)),
            "total_ms_p50": _ms(_pct([r["total"] for r in rows], 50)),
            "tokens_per_request_mean": round(sum(r["tokens"] for r in rows) / len(rows), 1) if rows else None,
            # content chunks after the first, per second of the time from the first to the last
            "tokens_per_s": round(after_first / spans, 1) if spans > 0 else None,
            "tokens_per_s_p50": round(_pct(rates, 50) or 0.0, 1) if rates else None,
        }
    d, r = out.get("direct", {}), out.get("relay", {})
    dp, rp = d.get("ttft_ms", {}), r.get("ttft_ms", {})
    if dp.get("p50") is not None and rp.get("p50") is not None:
        r["added_p50_ms"] = round(rp["p50"] - dp["p50"], 2)
        r["added_p99_ms"] = round(rp["p99"] - dp["p99"], 2)
    if d.get("tokens_per_s") and r.get("tokens_per_s"):
        r["tokens_per_s_ratio"] = round(r["tokens_per_s"] / d["tokens_per_s"], 3)
    texts = {row["text"] for rows in samples.values() for row in rows}
    out["same_text_every_request"] = len(texts) == 1
    out["sample_text"] = next(iter(texts), "")[:200]
    return out


def table_lines(results: dict[str, Any]) -> list[str]:
    """The phase's section of the printed table (nothing when it was not asked for)."""
    rm = results.get("real_model")
    if not rm:
        return []
    if rm.get("status") != "ok":
        return [f"real_model: skipped ({rm.get('reason')})"]
    srv = rm["server"]
    size = f", {srv['model_bytes'] / 2**20:.1f} MiB" if "model_bytes" in srv else ""
    d, r = rm.get("direct", {}), rm.get("relay", {})

    def f(v: Any, nd: int = 2) -> str:
        return "-" if v is None else f"{v:,.{nd}f}" if isinstance(v, float) else str(v)

    w0, w = 38, 16
    name = Path(srv["model"]).name if "model_file" in srv else srv["model"]
    lines = [(f"real model server ({name}{size}; {rm['request']['requests']} requests per path,"
              f" max_tokens {rm['request']['max_tokens']}):"),
             "".ljust(w0) + "direct".rjust(w) + "relay 1 node".rjust(w)]
    for label, key in (("  TTFT p50 ms", "p50"), ("  TTFT p99 ms", "p99")):
        lines.append(label.ljust(w0) + f(d.get("ttft_ms", {}).get(key)).rjust(w)
                     + f(r.get("ttft_ms", {}).get(key)).rjust(w))
    lines.append("  added p50 / p99 ms".ljust(w0) + "".rjust(w)
                 + f"{f(r.get('added_p50_ms'))} / {f(r.get('added_p99_ms'))}".rjust(w))
    lines.append("  tokens/s after the first".ljust(w0) + f(d.get("tokens_per_s"), 1).rjust(w)
                 + f(r.get("tokens_per_s"), 1).rjust(w))
    lines.append("  relay / direct tokens/s".ljust(w0) + "".rjust(w) + f(r.get("tokens_per_s_ratio"), 3).rjust(w))
    per = [f"{f(x.get('tokens_per_request_mean'), 1)}, {x.get('errors')}".rjust(w) for x in (d, r)]
    lines.append("  tokens per request, errors".ljust(w0) + "".join(per))
    return lines


# -- make-model: a GGUF llama.cpp can load, made here ------------------------------------------------

VOCAB_MEMBER = "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"


def make_model(vocab: Path, out: Path, *, embd: int, layers: int, ff: int, heads: int, ctx: int,
               seed: int) -> Path:
    """Write a LLaMA-architecture GGUF: the tokenizer of ``vocab`` (a vocabulary-only GGUF, or the
    llama-cpp-python sdist that holds one), seeded random f16 weights of the shape given."""
    import tempfile

    import gguf  # type: ignore[import-not-found]
    import numpy as np  # type: ignore[import-not-found]

    with tempfile.TemporaryDirectory() as tmp:
        if vocab.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(vocab) as tar:
                member = next((m for m in tar.getmembers() if m.name.endswith(VOCAB_MEMBER)), None)
                if member is None:
                    raise SystemExit(f"{vocab} holds no {VOCAB_MEMBER}")
                src = tar.extractfile(member)
                assert src is not None
                path = Path(tmp) / "vocab.gguf"
                path.write_bytes(src.read())
        else:
            path = vocab
        reader = gguf.GGUFReader(str(path))
        tok = {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}
    tokens = tok["tokenizer.ggml.tokens"]
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def weights(*shape: int, scale: float = 0.02) -> Any:
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float16)

    ones = np.ones(embd, dtype=np.float32)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(f"relay-bench synthetic llama {embd}x{layers}")
    w.add_context_length(ctx)
    w.add_embedding_length(embd)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(embd // heads)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model(tok["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in tok:
        w.add_tokenizer_pre(tok["tokenizer.ggml.pre"])
    w.add_token_list(tokens)
    w.add_token_scores(tok["tokenizer.ggml.scores"])
    w.add_token_types(tok["tokenizer.ggml.token_type"])
    w.add_bos_token_id(tok["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(tok["tokenizer.ggml.eos_token_id"])
    w.add_unk_token_id(tok["tokenizer.ggml.unknown_token_id"])
    w.add_add_bos_token(bool(tok.get("tokenizer.ggml.add_bos_token", True)))
    w.add_add_eos_token(bool(tok.get("tokenizer.ggml.add_eos_token", False)))
    w.add_tensor("token_embd.weight", weights(n_vocab, embd))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", weights(embd, embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", weights(ff, embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", weights(ff, embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", weights(embd, ff))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", weights(n_vocab, embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.realmodel")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model", help="write a synthetic LLaMA GGUF (real tokenizer, random weights)")
    m.add_argument("--vocab", type=Path, required=True,
                   help="llama-cpp-python sdist (.tar.gz) or a vocabulary GGUF such as ggml-vocab-llama-spm.gguf")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--embd", type=int, default=512)
    m.add_argument("--layers", type=int, default=8)
    m.add_argument("--ff", type=int, default=1536)
    m.add_argument("--heads", type=int, default=8)
    m.add_argument("--ctx", type=int, default=2048)
    m.add_argument("--seed", type=int, default=13)
    a = p.parse_args(argv)
    path = make_model(a.vocab, a.out, embd=a.embd, layers=a.layers, ff=a.ff, heads=a.heads, ctx=a.ctx, seed=a.seed)
    print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
