"""Stand-in for Ollama (the compose test's `ollama/ollama` image): stdlib only.

``ollama serve`` listens on OLLAMA_HOST (0.0.0.0:11434) and answers what compose.yaml and
the agent ask of Ollama: ``/api/tags`` (``ollama list``), ``/api/pull`` (``ollama pull``:
the model is only noted, under ~/.ollama, and listed from then on), ``/api/version``, and
the OpenAI-compatible ``/v1/models`` and ``/v1/chat/completions`` (streamed or not), whose
answer echoes the last user message.  A model that was not pulled is a 404, as in Ollama.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MODELS = Path.home() / ".ollama" / "standin-models.json"


def address() -> tuple[str, int]:
    host = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434").split("://")[-1].rstrip("/")
    name, _, port = host.rpartition(":") if ":" in host else (host, "", "11434")
    return name or "127.0.0.1", int(port or 11434)


def pulled() -> list[str]:
    try:
        return json.loads(MODELS.read_text())
    except (OSError, ValueError):
        return []


def reply_words(body: dict) -> list[str]:
    last = ""
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            last = content if isinstance(content, str) else " ".join(
                p.get("text", "") for p in content or [] if isinstance(p, dict))
            break
    words = f"{body.get('model')} (the ollama stand-in) heard: {last}".split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"ollama: {self.command} {self.path} {format % args}\n")

    def send_json(self, status: int, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.end_headers()

    def do_GET(self) -> None:
        if self.path == "/":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"Ollama is running")
        elif self.path == "/api/version":
            self.send_json(200, {"version": "0.0.0-standin"})
        elif self.path == "/api/tags":
            self.send_json(200, {"models": [{"name": m, "model": m, "size": 0} for m in pulled()]})
        elif self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "library"} for m in pulled()]})
        else:
            self.send_json(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = self.body()
        if self.path == "/api/pull":
            name = body.get("model") or body.get("name")
            models = pulled()
            if name not in models:
                MODELS.parent.mkdir(parents=True, exist_ok=True)
                MODELS.write_text(json.dumps([*models, name]))
            self.send_json(200, {"status": "success"})
        elif self.path == "/v1/chat/completions":
            self.chat(body)
        else:
            self.send_json(404, {"error": "not found"})

    def chat(self, body: dict) -> None:
        model = body.get("model")
        if model not in pulled():
            self.send_json(404, {"error": {"message": f'model "{model}" not found, try pulling it first',
                                           "type": "api_error", "param": None, "code": None}})
            return
        words, ident, created = reply_words(body), f"chatcmpl-{uuid.uuid4().hex[:8]}", int(time.time())
        if not body.get("stream"):
            self.send_json(200, {"id": ident, "object": "chat.completion", "created": created, "model": model,
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": "".join(words)}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": len(words),
                                           "total_tokens": 1 + len(words)}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()

        def event(delta: dict, finish: str | None = None) -> None:
            chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()

        event({"role": "assistant", "content": ""})
        for word in words:
            event({"content": word})
        event({}, "stop")
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


def client(method: str, path: str, payload: dict | None = None) -> dict:
    host, port = address()
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(f"http://{host}:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "serve"
    try:
        if command == "serve":
            # PID 1 in its container: without a handler, SIGTERM (docker stop) would be ignored.
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            server = ThreadingHTTPServer(address(), Handler)
            print(f"ollama stand-in listening on {server.server_address}", flush=True)
            server.serve_forever()
        elif command in ("list", "ls"):
            print("NAME")
            for model in client("GET", "/api/tags")["models"]:
                print(model["name"])
        elif command == "pull" and len(argv) == 2:
            print(client("POST", "/api/pull", {"model": argv[1], "stream": False})["status"])
        else:
            print("usage: ollama serve | list | pull MODEL", file=sys.stderr)
            return 2
    except (urllib.error.URLError, OSError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
