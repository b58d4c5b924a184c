"""User-facing errors: one typed exception, one OpenAI-shaped JSON body, one place that maps them to HTTP."""
from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error the client caused (or must be told about), rendered as OpenAI's error object."""

    status = 400
    type = "invalid_request_error"
    headers: dict[str, str] = {}  # extra response headers (e.g. Retry-After)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(APIError):
    pass


class Unauthorized(APIError):
    status, type = 401, "authentication_error"


class Forbidden(APIError):
    status, type = 403, "permission_error"


class NotFound(APIError):
    status, type = 404, "not_found_error"


class Unavailable(APIError):
    status, type = 503, "service_unavailable"


class PayloadTooLarge(APIError):
    status = 413


class UnsupportedMediaType(APIError):
    status = 415


class Misdirected(APIError):
    status = 421


class HeadersTooLarge(APIError):
    status = 431


class TooManyRequests(APIError):
    """Over an admission bound (server/http/admission.py): OpenAI's rate-limit shape, with Retry-After."""

    status, type = 429, "requests"

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, code="rate_limit_exceeded")
        self.headers = {"Retry-After": str(retry_after)}


class SteeringFault(APIError):
    """A request whose steering failed inside the engine (server/engine/faults.py): it was stopped, never served
    unsteered; the other requests in the engine were not affected."""

    status, type = 500, "server_error"

    def __init__(self, request_id: str, reason: str):
        family = reason.split(":", 1)[0]
        super().__init__(f"request {request_id} was stopped: its steering failed inside the engine ({reason}); it "
                         "was not served unsteered, and other requests were not affected",
                         param="model" if family == "iapt" else f"steering.{family}", code="steering_fault")


class GatewayTimeout(APIError):
    status, type = 504, "timeout"


def pydantic_to_api_error(exc: Any) -> BadRequest:
    """The first validation error of a pydantic ValidationError (or FastAPI's), with its field path as `param`."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": str(exc)}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return BadRequest(message, param=param, code="invalid_value")
