"""Errors the relay raises, and the one place they become HTTP responses.

    RelayError                 (status, OpenAI error type, code)
    ├── InvalidRequest         400 invalid_request_error  (malformed JSON, bad body)
    ├── ValidationFailed       422 invalid_request_error  (names the offending field)
    ├── Unauthorized           401 authentication_error
    ├── Forbidden              403 permission_error
    ├── NotFound               404 not_found_error
    ├── PayloadTooLarge        413 invalid_request_error
    ├── RateLimited            429 rate_limit_error        (carries Retry-After)
    ├── UpstreamError          502 upstream_error          (the agent or model failed)
    ├── InstanceUnavailable    503 service_unavailable     (offline, or at capacity)
    ├── ServiceNotReady        503 service_unavailable     (Redis unreachable)
    └── ModelTimeout           504 timeout_error           (nothing arrived in time)

Bodies follow OpenAI's error shape so SDKs surface the message:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Any


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


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


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


class PayloadTooLarge(RelayError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class RateLimited(RelayError):
    status, type, code = 429, "rate_limit_error", "rate_limited"


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
        RateLimited, UpstreamError, InstanceUnavailable, ModelTimeout,
    )
}


def from_status(status: int, message: str, code: str | None = None) -> RelayError:
    """Build the error matching an HTTP status an agent reported for a stream."""
    cls = _BY_STATUS.get(status, UpstreamError)
    return cls(message, code=code, status=status)
