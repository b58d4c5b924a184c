"""Typed errors: every server error (from the `openai` client or from our own httpx calls) maps here, in one place.

The server answers errors in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`, with `param`
naming the offending field (e.g. `steering.logits.bias.two words`, `X-Steering-Profile`).
"""
from __future__ import annotations

from typing import Any

import httpx
import openai

# 400s about steering: the body field, the X-Steering / X-Steering-Profile headers, or a profile body on PUT.
_STEERING_PARAMS = ("steering", "X-Steering", "profile")


class SteerServeError(Exception):
    """Base of every error this SDK raises. `param` names the field at fault, `status` is the HTTP status (None
    for an error reported inside a stream, or when the server could not be reached)."""

    def __init__(self, param: str | None, message: str, status: int | None = None, *, code: str | None = None,
                 type: str | None = None):
        super().__init__(f"{message} (param: {param})" if param and param not in message else message)
        self.param, self.message, self.status, self.code, self.type = param, message, status, code, type


class APIConnectionError(SteerServeError):
    """The server could not be reached, or the connection broke or timed out."""


class InvalidRequest(SteerServeError):
    """A 400 about anything other than steering (an unknown field, a bad value, a too-long prompt)."""


class SteeringError(InvalidRequest):
    """A 400 about steering: `param` is the spec field, e.g. `steering.logits.bias.two words`."""


class AuthenticationError(SteerServeError):
    """401: missing or wrong API key."""


class PermissionDenied(SteerServeError):
    """403: e.g. a non-admin writing a global profile."""


class NotFound(SteerServeError):
    """404: e.g. an unknown model."""


class ProfileNotFound(NotFound):
    """404 for a steering profile: not yours, not global, or not there at all."""


class AdapterNotFound(NotFound):
    """404 for an adapter (registry calls, or a request's `model` naming one): not yours, not global, or not
    there at all."""


class VectorNotFound(NotFound):
    """404 for a stored control vector: not yours, not global, or not there at all (also when a request's
    `steering.vectors` names one)."""


class ServerError(SteerServeError):
    """5xx, including 503 while the model is still loading."""


def from_error_body(status: int | None, body: Any, fallback: str = "") -> SteerServeError:
    """The typed error for a status and an error body (OpenAI's `{"error": {...}}` or the inner object)."""
    err = body.get("error", body) if isinstance(body, dict) else {}
    err = err if isinstance(err, dict) else {"message": str(err)}
    param, code = err.get("param"), err.get("code")
    message = err.get("message") or fallback or f"HTTP {status}"
    cls: type[SteerServeError]
    if status == 401:
        cls = AuthenticationError
    elif status == 403:
        cls = PermissionDenied
    elif status == 404:
        cls = {"profile_not_found": ProfileNotFound, "adapter_not_found": AdapterNotFound,
               "vector_not_found": VectorNotFound}.get(code, NotFound)
    elif isinstance(param, str) and param.startswith(_STEERING_PARAMS) and (status in (400, None)):
        cls = SteeringError
    elif status == 400:
        cls = InvalidRequest
    elif status is not None and status >= 500:
        cls = ServerError
    else:
        cls = SteerServeError
    return cls(param, message, status, code=code, type=err.get("type"))


def from_openai(exc: openai.OpenAIError) -> SteerServeError:
    """The typed error for an exception raised by the `openai` client (status errors, in-stream errors,
    connection errors)."""
    if isinstance(exc, openai.APIConnectionError):
        return APIConnectionError(None, str(exc) or type(exc).__name__)
    status = exc.status_code if isinstance(exc, openai.APIStatusError) else None
    body = getattr(exc, "body", None)
    return from_error_body(status, body, getattr(exc, "message", str(exc)))


def from_response(response: httpx.Response) -> SteerServeError:
    """The typed error for a non-2xx httpx response (read)."""
    try:
        body = response.json()
    except ValueError:
        body = {"message": response.text[:500]}
    return from_error_body(response.status_code, body)


def from_transport(exc: httpx.HTTPError) -> SteerServeError:
    return APIConnectionError(None, f"{type(exc).__name__}: {exc}")
