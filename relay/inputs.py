"""Reading a request: its credential, its client address, its JSON body.

Shared by every door (``relay/doors/``: ``relay_api``, ``openai``,
``swiftchat``, ``dify``, ``transcription``), so that body limits, credential
rules and validation errors read the same everywhere.
"""

from __future__ import annotations

import ipaddress
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from relay.errors import InvalidRequest, PayloadTooLarge, ValidationFailed

#: Bodies of owner actions and small API calls: a name, a description, a user.
SMALL_BODY_BYTES = 16 * 1024
#: The digits an integer query parameter may have: more is out of any range
#: the relay takes (2**63 has 19), and never reaches ``int()`` (past 4300
#: digits it raises, and below that it costs time quadratic in the length).
MAX_INT_DIGITS = 20
#: A body's pydantic model, and what ``validate`` returns.
Model = TypeVar("Model", bound=BaseModel)
#: Query parameters that look like credentials: refused outright, because a
#: secret in a URL ends up in proxy logs, browser history and Referer headers.
URL_CREDENTIAL_PARAMS = frozenset(
    {"token", "agent_token", "access_token", "api_key", "apikey", "key", "registration_key", "authorization"}
)


def bearer(headers, query_params=None) -> str | None:
    """The bearer credential of a request, or None; refuses credentials in the URL."""
    if query_params is not None and any(name.lower() in URL_CREDENTIAL_PARAMS for name in query_params):
        raise InvalidRequest(
            "credentials must be sent in the Authorization header, never in the URL",
            code="credentials_in_url",
        )
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def bearer_token(request: Request) -> str | None:
    """The request's bearer credential; 400 if one is offered in the URL instead."""
    return bearer(request.headers, request.query_params)


def client_ip(request: Request) -> str:
    """The client's address as every per-address limit counts it (rates, streams, uploads,
    anonymous conversations): an IPv4 address, or an IPv6 /64 (``address_group``)."""
    # uvicorn sets this from X-Forwarded-For only for trusted proxies
    # (--forwarded-allow-ips / FORWARDED_ALLOW_IPS), so callers cannot spoof it.
    return address_group(request.client.host) if request.client else "unknown"


def address_group(address: str) -> str:
    """Whom a per-address limit counts: one IPv4 address, or one IPv6 /64 (what one host is
    handed: counting its addresses one by one would give it 2**64 budgets)."""
    if ":" not in address:
        return address  # IPv4 (or a name): as it is
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def declared_length(request: Request) -> int | None:
    """The request's ``Content-Length`` as a number, None when absent (the HTTP parser refuses
    malformed ones); one of more than ``MAX_INT_DIGITS`` digits is past every limit, and read as such."""
    declared = request.headers.get("content-length")
    if declared is None or not (declared.isascii() and declared.isdigit()):
        return None
    return int(declared) if len(declared) <= MAX_INT_DIGITS else 10**MAX_INT_DIGITS


async def read_json(request: Request, limit: int, max_depth: int, *, empty: Any = None) -> Any:
    """The body as JSON: 413 past ``limit`` bytes (declared or actual), 400 if it is not JSON,
    422 ``json_too_deep`` past ``max_depth`` levels of arrays and objects (``RELAY_MAX_JSON_DEPTH``; 0: no limit).

    ``empty``, when not None, is what an empty body means (else it is not JSON).
    """
    declared = declared_length(request)
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    if not body and empty is not None:
        return empty
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if max_depth:
        check_depth(data, max_depth)
    return data


def check_depth(data: Any, max_depth: int) -> None:
    """422 ``json_too_deep`` if arrays and objects in ``data`` nest deeper than ``max_depth``.

    What the relay forwards is encoded again (``orjson.dumps``, pydantic's
    ``model_dump``), which fails past ~250 levels: a caller's ``metadata`` or
    ``tools`` nested 300 deep was a 500 and a traceback per request.  An
    iterative walk, one level at a time, of the containers only (no recursion
    to exhaust; ~0.03 ms for a chat of 200 messages in 1 MiB, ~3-4 ms for a
    MiB of 20,000 small objects, about what parsing them costs).
    """
    level = [data] if type(data) is dict or type(data) is list else []
    depth = 0
    while level:
        depth += 1
        if depth > max_depth:
            raise ValidationFailed(f"the JSON body nests arrays and objects deeper than {max_depth} levels",
                                   code="json_too_deep")
        below = []
        for value in level:  # orjson makes plain dicts and lists: exact type tests are enough
            for child in value.values() if type(value) is dict else value:
                if type(child) is dict or type(child) is list:
                    below.append(child)
        level = below


def validate(model: type[Model], data: Any) -> Model:
    """``data`` as ``model``; 422 naming the first offending field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ValidationFailed(f"{where}: {first['msg']}", param=where) from None


def int_param(params: Any, name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter within [low, high]; empty means the default."""
    raw = params.get(name) or ""
    if not raw:
        return default
    # ASCII digits only: int() would also take "+5", " 5", "1_0" and other scripts' digits.
    if not (raw.isascii() and raw.removeprefix("-").isdigit()):
        raise ValidationFailed(f"{name} must be an integer", param=name)
    if len(raw) > MAX_INT_DIGITS:
        raise ValidationFailed(f"{name} must be between {low} and {high}", param=name)
    value = int(raw)
    if not low <= value <= high:
        raise ValidationFailed(f"{name} must be between {low} and {high}", param=name)
    return value
