"""``relay-agent``: register an instance, serve it, or show its status.

    relay-agent run --relay-url URL [--token T] --backend demo|openai
                    [--upstream-url URL] [--model NAME] [--image-model NAME]
                    [--transcribe-model NAME] [--max-concurrency N]
    relay-agent register --relay-url URL [--name NAME]
    relay-agent status --relay-url URL [--instance-id ID] [--json]

On a terminal, ``run`` keeps a live status line (see ``console.py``);
``status`` exits 0 when the instance is online and 3 when it is offline.

Every flag has an ``AGENT_*`` environment variable (``--upstream-url`` is
``AGENT_UPSTREAM_URL``); flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from typing import Any

from . import __version__
from . import credentials as creds_store
from .backends import BackendError
from .backoff import FatalAgentError, backoff_delays
from .client import AgentClient
from .console import Console, format_status
from .credentials import Credentials
from .demo_model import DemoBackend
from .registration import RelayHTTPError, instance_status, register
from .settings import AgentSettings
from .upstream import OpenAIBackend


def _say(line: str) -> None:
    print(f"relay-agent: {line}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay-agent", description="Serve a local model through an instance-relay.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--relay-url", help="relay base URL (AGENT_RELAY_URL), e.g. http://127.0.0.1:8080; "
                                           "run accepts several, comma-separated, tried in turn")
        p.add_argument("--credentials", help="credentials file (AGENT_CREDENTIALS)")
        p.add_argument("--registration-key", help="the relay's registration key, if it requires one "
                                                  "(AGENT_REGISTRATION_KEY)")

    run = sub.add_parser("run", help="connect to the relay and serve requests (registers on first run)")
    common(run)
    run.add_argument("--token", help="agent token (AGENT_TOKEN); default: saved credentials or register")
    run.add_argument("--backend", choices=["demo", "openai"], help="where answers come from (AGENT_BACKEND)")
    run.add_argument("--upstream-url",
                     help="OpenAI base URL of the model, e.g. http://127.0.0.1:11434/v1 (AGENT_UPSTREAM_URL)")
    run.add_argument("--upstream-api-key", help="API key for the upstream (AGENT_UPSTREAM_API_KEY)")
    run.add_argument("--model",
                     help="model name(s) to serve, comma-separated (AGENT_MODEL); default: the upstream's /models")
    run.add_argument("--image-model",
                     help="image generation model(s) to serve, comma-separated (AGENT_IMAGE_MODEL); with them "
                          "the agent also answers /images/generations (openai backend; the demo has demo-image)")
    run.add_argument("--transcribe-model",
                     help="transcription model(s) to serve, comma-separated (AGENT_TRANSCRIBE_MODEL); with them "
                          "the agent also answers /audio/transcriptions (openai backend; the demo has "
                          "demo-transcribe)")
    run.add_argument("--introduction", help="opening statement suggested for the instance's conversation API "
                                            "(AGENT_INTRODUCTION; the owner's PATCH wins)")
    run.add_argument("--variables", help="JSON list of input variables suggested for the conversation API "
                                         "(AGENT_VARIABLES), e.g. '[{\"key\": \"book\", \"required\": true}]'")
    run.add_argument("--max-concurrency", type=int, help="requests served at once (AGENT_MAX_CONCURRENCY, default 8)")
    run.add_argument("--name", help="instance name when registering (AGENT_NAME)")
    run.add_argument("--demo-rate", type=float, help="demo model words per second, 0 = unthrottled (AGENT_DEMO_RATE)")
    run.add_argument("-v", "--verbose", action="store_true")

    reg = sub.add_parser("register", help="register a new instance and save its credentials")
    common(reg)
    reg.add_argument("--name", help="instance name (AGENT_NAME)")
    reg.add_argument("--description", help="instance description (AGENT_DESCRIPTION)")

    status = sub.add_parser("status", help="show the instance's public status (exit 0 online, 3 offline)")
    common(status)
    status.add_argument("--instance-id", help="instance to show (default: the saved one)")
    status.add_argument("--json", action="store_true", help="print the relay's JSON instead of a summary")
    return parser


def registration_headers(settings: AgentSettings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.registration_key}"} if settings.registration_key else {}


def settings_from(args: argparse.Namespace) -> AgentSettings:
    overrides: dict[str, Any] = {}
    for name in ("relay_url", "token", "backend", "upstream_url", "upstream_api_key", "model", "image_model",
                 "transcribe_model", "max_concurrency", "name", "description", "credentials", "demo_rate",
                 "registration_key", "introduction", "variables"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return AgentSettings(**overrides)


def make_backend(settings: AgentSettings):
    if settings.backend == "demo":
        names = settings.model_names()
        return DemoBackend(rate=settings.demo_rate, model=names[0] if names else "demo")
    if not settings.upstream_url:
        raise SystemExit("relay-agent: --backend openai needs --upstream-url (e.g. http://127.0.0.1:11434/v1)")
    return OpenAIBackend(settings.upstream_url, api_key=settings.upstream_api_key,
                         models=settings.model_names(), image_models=settings.image_model_names(),
                         transcribe_models=settings.transcribe_model_names(), timeout=settings.upstream_timeout)


async def obtain_credentials(settings: AgentSettings) -> Credentials:
    """The token to connect with: flag/env, else saved, else register now."""
    relay_url = settings.primary_relay_url()
    if settings.token:
        return Credentials(relay_url, "", settings.token, "")
    saved = creds_store.load(settings.credentials, relay_url)
    if saved is not None:
        return saved
    creds = await register(relay_url, settings.name, settings.description, headers=registration_headers(settings))
    creds_store.save(settings.credentials, creds)
    _say(f"registered instance {creds.instance_id}; credentials saved to {settings.credentials}")
    _say(f"chat URL: {creds.chat_url}")
    return creds


async def wait_for_models(backend, settings: AgentSettings) -> list[str]:
    """Ask the backend what it serves; a model server still starting is waited for."""
    delays = backoff_delays(cap=settings.max_backoff)
    while True:
        try:
            return await backend.models()
        except BackendError as exc:
            delay = next(delays)
            _say(f"{exc}; retrying in {delay:.1f}s")
            await asyncio.sleep(delay)


async def serve(settings: AgentSettings) -> None:
    try:
        parameters = settings.parameters()
    except ValueError as exc:
        raise SystemExit(f"relay-agent: {exc}") from None
    backend = make_backend(settings)
    try:
        creds = await obtain_credentials(settings)
        models = await wait_for_models(backend, settings)
        # On a terminal: a live status line; otherwise plain event lines.
        console = Console()
        client = AgentClient(
            relay_url=settings.relay_url, token=creds.agent_token, backend=backend, models=models,
            max_concurrency=settings.max_concurrency, max_backoff=settings.max_backoff, on_status=console.event,
            max_upload=settings.max_upload_bytes, parameters=parameters,
        )
        console.attach(client.status)
        refresher = asyncio.create_task(console.run())
        if console.live:
            _route_logs_through(console)
        try:
            await client.run()
        finally:
            refresher.cancel()
            console.close()
    finally:
        await backend.aclose()


def _route_logs_through(console: Console) -> None:
    root = logging.getLogger()
    handler = console.log_handler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)


async def _run_until_signal(coro) -> None:
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        _say("stopped")


def run_event_loop(coro) -> None:
    """Run the agent on uvloop when it is installed: the agent's own CPU per
    chunk (socket writes, timers) is what bounds one stream's throughput."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            run_event_loop(_run_until_signal(serve(settings)))
        elif args.command == "register":
            creds = asyncio.run(register(settings.primary_relay_url(), settings.name, settings.description,
                                         headers=registration_headers(settings)))
            creds_store.save(settings.credentials, creds)
            print(json.dumps({"instance_id": creds.instance_id, "chat_url": creds.chat_url,
                              "credentials": str(settings.credentials)}, indent=2))
        elif args.command == "status":
            instance_id = args.instance_id
            if not instance_id:
                saved = creds_store.load(settings.credentials, settings.primary_relay_url())
                if saved is None:
                    raise SystemExit("relay-agent: no saved instance; pass --instance-id")
                instance_id = saved.instance_id
            view = asyncio.run(instance_status(settings.primary_relay_url(), instance_id, version=__version__))
            print(json.dumps(view, indent=2) if args.json else format_status(view))
            # Scriptable: 0 online, 3 offline (as `systemctl status` does for inactive).
            return 0 if view.get("status") == "online" else 3
    except (FatalAgentError, RelayHTTPError, BackendError) as exc:
        print(f"relay-agent: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
