"""User-facing errors: one typed exception, one OpenAI-shaped JSON body, one place that maps them to HTTP."""
from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error the client caused (or must be told about), rendered as OpenAI's error object."""

    status = 400
    type = "invalid_request_error"

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
