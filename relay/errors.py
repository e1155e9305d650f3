"""Errors the relay raises, and the one place they become HTTP responses.

    RelayError                 (status, OpenAI error type, code)
    ├── InvalidRequest         400 invalid_request_error  (malformed JSON, bad body)
    ├── ValidationFailed       422 invalid_request_error  (names the offending field)
    ├── Unauthorized           401 authentication_error
    ├── Forbidden              403 permission_error
    ├── NotFound               404 not_found_error        (the instance is unknown: nothing else)
    ├── ModelNotFound          404 invalid_request_error  (/v1: no such instance or model)
    ├── RequestTimeout         408 invalid_request_error  (the body paused past RELAY_BODY_TIMEOUT; closes)
    ├── PayloadTooLarge        413 invalid_request_error
    ├── HeadersTooLarge        431 invalid_request_error  (written by server/edge.py's protocol; closes)
    ├── RateLimited            429 rate_limit_error        (carries Retry-After)
    ├── OperationUnsupported   501 not_implemented_error   (no agent can run the operation)
    ├── UpstreamError          502 upstream_error          (the agent or model failed)
    ├── InstanceUnavailable    503 service_unavailable     (offline, or at capacity)
    ├── ServiceNotReady        503 service_unavailable     (Redis unreachable)
    └── ModelTimeout           504 timeout_error           (nothing arrived in time)

Bodies follow OpenAI's error shape so SDKs surface the message:
``{"error": {"message", "type", "param", "code"}}``.  :func:`as_relay_error`
is the one mapping from anything raised while serving a request (ours,
Redis's, Starlette's) to status, body and headers; the HTTP exception
handlers, the agent websocket's refusals and the SSE error events all go
through it.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from wire import SSE_DONE, error_body, sse_event

log = logging.getLogger("relay.errors")


class RelayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequest(RelayError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class ValidationFailed(RelayError):
    status, type, code = 422, "invalid_request_error", "invalid_parameter"


class Unauthorized(RelayError):
    status, type, code = 401, "authentication_error", "invalid_token"


class Forbidden(RelayError):
    status, type, code = 403, "permission_error", "forbidden"


class NotFound(RelayError):
    status, type, code = 404, "not_found_error", "instance_not_found"


class ModelNotFound(RelayError):
    """The global ``/v1`` doors: ``model`` names no instance, or a model its agents do not serve."""

    status, type, code = 404, "invalid_request_error", "model_not_found"


class NoSuchRoute(RelayError):
    status, type, code = 404, "not_found_error", None


class RequestTimeout(RelayError):
    """The caller stopped sending its request midway: answered, then the connection is closed."""

    status, type, code = 408, "invalid_request_error", "request_timeout"

    def __init__(self, message: str, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.headers.setdefault("Connection", "close")  # the rest of the body is never read


class PayloadTooLarge(RelayError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class HeadersTooLarge(RelayError):
    status, type, code = 431, "invalid_request_error", "headers_too_large"


class RateLimited(RelayError):
    status, type, code = 429, "rate_limit_error", "rate_limited"


class OperationUnsupported(RelayError):
    status, type, code = 501, "not_implemented_error", "capability_not_supported"


class UpstreamError(RelayError):
    status, type, code = 502, "upstream_error", "upstream_error"


class InstanceUnavailable(RelayError):
    status, type, code = 503, "service_unavailable", "instance_offline"


class ServiceNotReady(RelayError):
    status, type, code = 503, "service_unavailable", "not_ready"


class ModelTimeout(RelayError):
    status, type, code = 504, "timeout_error", "model_timeout"


_BY_STATUS = {
    cls.status: cls
    for cls in (
        InvalidRequest, ValidationFailed, Unauthorized, Forbidden, NotFound, PayloadTooLarge,
        RateLimited, OperationUnsupported, UpstreamError, InstanceUnavailable, ModelTimeout,
    )
}


#: Statuses an agent may not pass on as they are: to a caller they mean "your
#: credentials" or "no such instance", which the relay alone decides.  An
#: agent reporting one (an upstream 404 for an unknown model, a 401 from a
#: model server that wants a key) is a failure of the instance's upstream.
_NOT_FROM_AGENTS = frozenset({401, 403, 404, 407})


def from_status(status: int, message: str, code: str | None = None) -> RelayError:
    """Build the error matching an HTTP status an agent reported for a stream."""
    if status in _NOT_FROM_AGENTS:
        return UpstreamError(message, code="upstream_not_found" if status == 404 else "upstream_error")
    if not 400 <= status <= 599:
        return UpstreamError(message, code=code)
    cls = _BY_STATUS.get(status, UpstreamError)
    # A 503 (an agent at capacity, an overloaded node) is worth retrying shortly: say when.
    return cls(message, code=code, status=status, headers={"Retry-After": "1"} if status == 503 else None)


def as_relay_error(exc: BaseException) -> RelayError:
    """Any exception met while serving a request, as the RelayError the caller sees."""
    if isinstance(exc, RelayError):
        return exc
    if isinstance(exc, (RedisError, OSError, TimeoutError)):
        # Redis down is an outage of this node, not a bug: say so and let the
        # caller (or the load balancer, via /readyz) try another node.
        log.warning("storage error, answered 503: %s: %s", type(exc).__name__, exc)
        return ServiceNotReady("relay storage unavailable, retry shortly", headers={"Retry-After": "1"})
    if isinstance(exc, HTTPException):  # Starlette's routing: no such path, wrong method
        cls = NoSuchRoute if exc.status_code == 404 else InvalidRequest
        return cls(str(exc.detail), status=exc.status_code)
    return RelayError("internal error")


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: BaseException) -> ORJSONResponse:
    """The HTTP response for an exception (exception handlers, websocket refusals)."""
    error = as_relay_error(exc)
    return ORJSONResponse(error.body(), status_code=error.status, headers=error.headers)


def error_text(exc: BaseException) -> Response:
    """An error as SwiftChat's backend writes it: the status, and ``Error: <message>`` as text."""
    error = as_relay_error(exc)
    return Response(f"Error: {error.message}", status_code=error.status, headers=error.headers,
                    media_type="text/plain; charset=utf-8")


def error_string(exc: BaseException) -> ORJSONResponse:
    """An error as SwiftChat's JSON routes write it: ``{"error": "<message>", "code": ...}``."""
    error = as_relay_error(exc)
    return ORJSONResponse({"error": error.message, "code": error.code}, status_code=error.status,
                          headers=error.headers)


#: Routes whose clients read errors in another dialect than OpenAI's (SwiftChat's app
#: shows the body of a failed converse as text, and reads ``error`` as a string).
_DIALECTS = {"/api/converse": error_text, "/api/image": error_string, "/api/models": error_string,
             "/api/upgrade": error_string}


def render_error(path: str, exc: BaseException) -> Response:
    """The response for an exception raised serving ``path``: the one exception handler's body."""
    return _DIALECTS.get(path, error_response)(exc)


def sse_error(error: RelayError) -> bytes:
    """An error after streaming began: one event with the error body, then the end (DESIGN.md)."""
    return sse_event(orjson.dumps(error.body())) + SSE_DONE
