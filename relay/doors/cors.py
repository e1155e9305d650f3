"""CORS for the doors browsers may call from other sites: the chat and model endpoints."""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send


class ChatCORS:
    """CORS (Fetch standard) on the chat and model endpoints only, never with credentials.

    Third-party web apps calling an instance from the browser are the point of
    a public instance, so the default is any origin.  Credentials mode stays
    off: callers authenticate with an explicit ``Authorization`` header, never
    with cookies, so a page cannot ride on a visitor's ambient credentials.
    Owner endpoints get no CORS headers at all: browsers keep other sites out.
    """

    #: The per-instance doors, the global OpenAI door, SwiftChat's routes.
    PREFIXES = ("/api/chat/", "/v1/", "/api/converse", "/api/models", "/api/image", "/api/upgrade")

    def __init__(self, app: ASGIApp, origins: list[str]):
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],  # the OpenAI SDKs send x-stainless-* and openai-* headers
            allow_credentials=False,
            expose_headers=["Retry-After", "X-Request-Id"],
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.PREFIXES):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)
