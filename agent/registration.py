"""The agent's few plain HTTP calls to the relay: register and status."""

from __future__ import annotations

from typing import Any

import httpx

import wire

from .credentials import Credentials


class RelayHTTPError(Exception):
    pass


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    message = wire.error_message(response.content) or response.text[:200]
    raise RelayHTTPError(f"relay answered {response.status_code}: {message}")


async def register(relay_url: str, name: str, description: str = "", *, headers: dict | None = None) -> Credentials:
    async with httpx.AsyncClient(base_url=relay_url.rstrip("/"), timeout=15) as client:
        try:
            response = await client.post("/api/instances", json={"name": name, "description": description},
                                         headers=headers or {})
        except httpx.HTTPError as exc:
            raise RelayHTTPError(f"cannot reach relay at {relay_url}: {exc or type(exc).__name__}") from exc
        _raise_for(response)
        data = response.json()
    return Credentials(
        relay_url=relay_url.rstrip("/"),
        instance_id=data["instance_id"],
        agent_token=data["agent_token"],
        chat_url=data["chat_url"],
    )


async def instance_status(relay_url: str, instance_id: str, *, version: str | None = None) -> dict[str, Any]:
    """The instance's public view; with ``version`` (this agent's), plus ``upgrade`` when one is available."""
    async with httpx.AsyncClient(base_url=relay_url.rstrip("/"), timeout=15) as client:
        try:
            response = await client.get(f"/api/instances/{instance_id}")
            _raise_for(response)
            view: dict[str, Any] = response.json()
            if version is not None:
                latest = await _upgrade(client, version)
                if latest:
                    view["upgrade"] = latest
        except httpx.HTTPError as exc:
            raise RelayHTTPError(f"cannot reach relay at {relay_url}: {exc or type(exc).__name__}") from exc
        return view


async def _upgrade(client: httpx.AsyncClient, version: str) -> str | None:
    """The newer agent version the relay ships, if any (a relay without ``/api/upgrade`` says nothing)."""
    response = await client.get("/api/upgrade", params={"version": version})
    if response.status_code != 200:
        return None
    info = response.json()
    return str(info.get("version")) if isinstance(info, dict) and info.get("needUpgrade") is True else None
