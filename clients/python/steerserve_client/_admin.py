"""The JSON transport of the server's own (non-OpenAI) routes: httpx, the client's base URL and API key, typed
errors."""
from __future__ import annotations

from typing import Any

import httpx

from .errors import from_response, from_transport


def _json(response: httpx.Response) -> Any:
    if response.is_error:
        raise from_response(response)
    return response.json()


class Admin:
    def __init__(self, http: httpx.Client, root: str, api_key: str):
        self._http, self._root, self._headers = http, root, {"Authorization": f"Bearer {api_key}"}

    def call(self, method: str, path: str, *, params: dict[str, str] | None = None, json: Any = None,
             files: Any = None) -> Any:
        """`files`: multipart parts (httpx's `files`), sent instead of `json`."""
        try:
            response = self._http.request(method, self._root + path, params=params, json=json, files=files,
                                          headers=self._headers)
        except httpx.HTTPError as exc:
            raise from_transport(exc) from exc
        return _json(response)

    def send(self, method: str, path: str, *, params: dict[str, str] | None = None, **request: Any) -> httpx.Response:
        """Any request (binary bodies and answers); the response, read, or the typed error."""
        headers = {**self._headers, **request.pop("headers", {})}
        try:
            response = self._http.request(method, self._root + path, params=params, headers=headers, **request)
        except httpx.HTTPError as exc:
            raise from_transport(exc) from exc
        if response.is_error:
            raise from_response(response)
        return response


class AsyncAdmin:
    def __init__(self, http: httpx.AsyncClient, root: str, api_key: str):
        self._http, self._root, self._headers = http, root, {"Authorization": f"Bearer {api_key}"}

    async def call(self, method: str, path: str, *, params: dict[str, str] | None = None, json: Any = None,
                   files: Any = None) -> Any:
        try:
            response = await self._http.request(method, self._root + path, params=params, json=json, files=files,
                                                headers=self._headers)
        except httpx.HTTPError as exc:
            raise from_transport(exc) from exc
        return _json(response)

    async def send(self, method: str, path: str, *, params: dict[str, str] | None = None,
                   **request: Any) -> httpx.Response:
        headers = {**self._headers, **request.pop("headers", {})}
        try:
            response = await self._http.request(method, self._root + path, params=params, headers=headers, **request)
        except httpx.HTTPError as exc:
            raise from_transport(exc) from exc
        if response.is_error:
            raise from_response(response)
        return response
