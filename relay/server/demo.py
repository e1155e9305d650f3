"""``relay demo``: everything a newcomer needs, in one process.

Starts an embedded Redis, a relay node, registers an instance (reused on the
next run: the credentials are saved in the data directory), and serves it
with the agent's demo model.  Prints the chat URL and ways to call it, then
runs until Ctrl-C and stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from agent import credentials as creds_store
from agent.client import AgentClient
from agent.demo_model import DemoBackend
from agent.registration import register
from relay.app import create_app
from relay.server.edge import RelayServer, uvicorn_config
from relay.settings import RelaySettings
from relay.store.embedded import redis_for

log = logging.getLogger("relay.demo")


def banner(chat_url: str, relay_url: str, instance_id: str) -> str:
    return f"""
  instance-relay demo is running.

  Dashboard: {relay_url}/  (this instance: {relay_url}/i/{instance_id}, with a playground)
  Chat URL:  {chat_url}
  One OpenAI base URL for every instance:  {relay_url}/v1  (model "{instance_id}")

  curl:
    curl -N {chat_url}/chat/completions \\
      -H 'Content-Type: application/json' \\
      -d '{{"messages": [{{"role": "user", "content": "Hello!"}}]}}'

  openai SDK (pip install openai):
    from openai import OpenAI
    client = OpenAI(base_url="{chat_url}", api_key="unused")
    print(client.chat.completions.create(
        model="demo", messages=[{{"role": "user", "content": "Hello!"}}]).choices[0].message.content)
    for chunk in client.chat.completions.create(
            model="demo", messages=[{{"role": "user", "content": "Hello!"}}], stream=True):
        print(chunk.choices[0].delta.content or "", end="", flush=True)

  Press Ctrl-C to stop.
"""


async def run_demo(settings: RelaySettings) -> None:
    with redis_for(settings, data_subdir="demo-redis") as redis_url:
        app = create_app(settings, redis_url=redis_url)
        services = app.state.services
        server = RelayServer(uvicorn_config(app, settings), services)
        server_task = asyncio.create_task(server.serve())
        while not server.started:
            if server_task.done():
                await server_task  # surfaces the startup error (port in use ...)
                raise RuntimeError(f"relay failed to start on port {settings.port}")
            await asyncio.sleep(0.02)

        relay_url = f"http://127.0.0.1:{settings.port}"
        creds_path = settings.data_dir / "demo-agent.json"
        creds = creds_store.load(creds_path, relay_url)
        if creds is None or not await services.registry.exists(creds.instance_id):
            creds = await register(relay_url, "demo", "the built-in demo model")
            creds_store.save(creds_path, creds)

        backend = DemoBackend()
        agent = AgentClient(
            relay_url=relay_url, token=creds.agent_token, backend=backend, models=await backend.models(),
            on_status=lambda line: log.info("agent: %s", line),
        )
        agent_task = asyncio.create_task(agent.run())
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(10):
                await agent.connected.wait()
        print(banner(services.registry.chat_url(creds.instance_id), settings.base_url(), creds.instance_id),
              flush=True)

        try:
            await server_task  # returns when uvicorn sees Ctrl-C / SIGTERM
        finally:
            agent_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await agent_task
            if not server_task.done():
                server.should_exit = True
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await server_task
