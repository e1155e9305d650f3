"""The web dashboard: static pages and assets, served by the relay itself.

The pages are fixed files (``relay/web``): nothing the relay or an instance
supplies is ever written into HTML on the server.  The scripts fetch the
public API and build the page with DOM text nodes, so an instance named
``<img src=x onerror=…>`` is text wherever it shows.  Every response here
carries the headers that make the rest hold: a Content-Security-Policy that
allows only this origin's scripts and styles (no inline script, no eval, no
third-party anything: the pages work on a machine with no internet), no
framing, no MIME sniffing, no referrer.  Credentials travel in
``Authorization`` headers set by the scripts, never in cookies, so a
cross-site form cannot act for anyone.
"""

from __future__ import annotations

from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from relay.serving.targets import INSTANCE_ID

WEB = Path(__file__).parent

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "manifest-src 'self'",
    "form-action 'self'",
    "base-uri 'none'",
    "frame-ancestors 'none'",
])

SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=()"),
]


class Secured:
    """ASGI wrapper: the dashboard's security headers on every response of ``app``."""

    def __init__(self, app: object):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_secured)  # type: ignore[operator]


def page(name: str) -> Secured:
    path = WEB / name

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            # Answered here rather than by the router, so that it carries the headers too.
            refusal = PlainTextResponse("Method Not Allowed", status_code=405, headers={"Allow": "GET, HEAD"})
            await refusal(scope, receive, send)
            return
        instance_id = scope.get("path_params", {}).get("instance_id")
        # A malformed id cannot name an instance: 404, with the page, which says "no such instance".
        status = 404 if instance_id is not None and not INSTANCE_ID.fullmatch(instance_id) else 200
        # no-cache: never served stale after an upgrade (pages are small; assets answer 304s).
        response: Response = FileResponse(path, status_code=status, media_type="text/html; charset=utf-8",
                                          headers={"Cache-Control": "no-cache"})
        await response(scope, receive, send)

    return Secured(endpoint)


class _Assets(StaticFiles):
    """The pages' scripts and styles, revalidated on every load (small, and never stale after an upgrade)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        try:
            return await super().get_response(path, scope)
        except HTTPException as exc:
            # Answered here, inside Secured, so a missing asset carries the headers too.
            return PlainTextResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)

    def file_response(self, *args: object, **kwargs: object) -> Response:
        response = super().file_response(*args, **kwargs)  # type: ignore[arg-type]
        response.headers["Cache-Control"] = "no-cache"
        return response


def routes() -> list[BaseRoute]:
    return [
        # Every method reaches the page, which refuses all but GET and HEAD itself.
        Route("/", page("index.html")),
        Route("/register", page("register.html")),
        Route("/i/{instance_id}", page("instance.html")),
        Mount("/static", Secured(_Assets(directory=WEB / "static"))),
    ]
