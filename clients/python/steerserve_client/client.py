"""`SteerClient` / `AsyncSteerClient`: the official `openai` client (`.openai`) plus steering, profiles, the
control vector store and typed errors. Chat and completions go through openai; the server's own routes through httpx."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, overload

import httpx
import openai
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ._admin import Admin, AsyncAdmin
from .adapters import Adapters, AsyncAdapters
from .errors import NotFound, from_openai
from .profiles import AsyncProfiles, Profiles
from .results import Applied, AsyncSteeredStream, SteeredResponse, SteeredStream
from .steering import Steering
from .vectors import AsyncVectors, Vectors

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
PROFILE_HEADER = "X-Steering-Profile"
SCHEMA_ROUTE = "/v1/steering/schema"
SteeringArg = Steering | dict[str, Any] | None
ProfilesArg = str | Sequence[str] | None
Prompt = str | list[str] | list[int]


def _urls(base_url: str | None) -> tuple[str, str]:
    """(server root, OpenAI base URL): accept either form, with or without the trailing /v1."""
    root = (base_url or os.environ.get("STEERSERVE_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    root = root.removesuffix("/v1")
    return root, root + "/v1"


def _api_key(api_key: str | None) -> str:
    # openai insists on a key; a server in open mode ignores whatever is sent.
    return api_key or os.environ.get("STEERSERVE_API_KEY") or "none"


def _options(steering: SteeringArg, profiles: ProfilesArg, kwargs: dict[str, Any]) -> dict[str, Any]:
    """openai `create` kwargs with steering in `extra_body` and profiles in `extra_headers`, merged into any the
    caller passed. A dict spec is sent as is: the server is the authority on what it accepts."""
    body, headers = dict(kwargs.pop("extra_body", None) or {}), dict(kwargs.pop("extra_headers", None) or {})
    if steering is not None:
        body["steering"] = steering.to_json() if isinstance(steering, Steering) else steering
    if profiles:
        headers[PROFILE_HEADER] = profiles if isinstance(profiles, str) else ",".join(profiles)
    return {**kwargs, **({"extra_body": body} if body else {}), **({"extra_headers": headers} if headers else {})}


def _stream_flag(stream: bool) -> dict[str, Any]:
    return {"stream": True} if stream else {}  # leave it off the wire unless streaming, as openai does


class SteerClient:
    """A steerserve client. `base_url` is the server (with or without `/v1`; default `$STEERSERVE_BASE_URL` or
    http://127.0.0.1:8000), `api_key` yours (default `$STEERSERVE_API_KEY`), `model` the default model (default:
    the one the server serves). `http_client` is used for every call (openai's and ours), e.g. to set a
    transport; the client closes only what it created."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, model: str | None = None,
                 timeout: float | httpx.Timeout = 600.0, max_retries: int = 2, http_client: httpx.Client | None = None):
        root, v1 = _urls(base_url)
        key = _api_key(api_key)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)
        self.openai = openai.OpenAI(base_url=v1, api_key=key, timeout=timeout, max_retries=max_retries,
                                    http_client=http_client)
        admin = Admin(self._http, root, key)
        self._admin = admin
        self.profiles = Profiles(admin)
        self.adapters = Adapters(admin, lambda: self._model(None))
        self.vectors = Vectors(admin)
        self.model = model

    @overload
    def chat(self, messages: Iterable[dict[str, Any]], *, model: str | None = ..., steering: SteeringArg = ...,
             profiles: ProfilesArg = ..., stream: Literal[False] = ..., **openai_kwargs: Any
             ) -> SteeredResponse[ChatCompletion]: ...
    @overload
    def chat(self, messages: Iterable[dict[str, Any]], *, model: str | None = ..., steering: SteeringArg = ...,
             profiles: ProfilesArg = ..., stream: Literal[True], **openai_kwargs: Any
             ) -> SteeredStream[ChatCompletionChunk]: ...

    def chat(self, messages: Iterable[dict[str, Any]], *, model: str | None = None, steering: SteeringArg = None,
             profiles: ProfilesArg = None, stream: bool = False, **openai_kwargs: Any) -> Any:
        """`chat.completions.create` with steering. Returns a SteeredResponse (or, with stream=True, a
        SteeredStream of chunks); both carry `.applied`."""
        create = self.openai.chat.completions.with_raw_response.create
        return self._call(create, stream, model=self._model(model), messages=messages,
                          **_options(steering, profiles, openai_kwargs))

    @overload
    def complete(self, prompt: Prompt, *, model: str | None = ..., steering: SteeringArg = ...,
                 profiles: ProfilesArg = ..., stream: Literal[False] = ..., **openai_kwargs: Any
                 ) -> SteeredResponse[Completion]: ...
    @overload
    def complete(self, prompt: Prompt, *, model: str | None = ..., steering: SteeringArg = ...,
                 profiles: ProfilesArg = ..., stream: Literal[True], **openai_kwargs: Any
                 ) -> SteeredStream[Completion]: ...

    def complete(self, prompt: Prompt, *, model: str | None = None, steering: SteeringArg = None,
                 profiles: ProfilesArg = None, stream: bool = False, **openai_kwargs: Any) -> Any:
        """`completions.create` with steering; returns as `chat` does."""
        create = self.openai.completions.with_raw_response.create
        return self._call(create, stream, model=self._model(model), prompt=prompt,
                          **_options(steering, profiles, openai_kwargs))

    def schema(self) -> dict[str, Any]:
        """The server's JSON schema of the steering spec."""
        return self._admin.call("GET", SCHEMA_ROUTE)

    def _call(self, create: Callable[..., Any], stream: bool, **kwargs: Any) -> Any:
        try:
            raw = create(**_stream_flag(stream), **kwargs)  # raw: headers first; a stream's body is not read yet
            applied, parsed = Applied.from_headers(raw.headers), raw.parse()
        except openai.OpenAIError as exc:
            raise from_openai(exc) from exc
        return SteeredStream(parsed, applied) if stream else SteeredResponse(parsed, applied)

    def _model(self, model: str | None) -> str:
        if model or self.model:
            return model or self.model  # type: ignore[return-value]
        try:
            self.model = next((m.id for m in self.openai.models.list()), None)  # steerserve serves one model
        except openai.OpenAIError as exc:
            raise from_openai(exc) from exc
        if self.model is None:
            raise NotFound("model", "the server lists no model", 404)
        return self.model

    def close(self) -> None:
        if self._owns_http:  # openai closes its http client even when it was handed one
            self.openai.close()
            self._http.close()

    def __enter__(self) -> SteerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSteerClient:
    """The asyncio counterpart of `SteerClient` (same arguments; `http_client` is an httpx.AsyncClient)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, model: str | None = None,
                 timeout: float | httpx.Timeout = 600.0, max_retries: int = 2,
                 http_client: httpx.AsyncClient | None = None):
        root, v1 = _urls(base_url)
        key = _api_key(api_key)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self.openai = openai.AsyncOpenAI(base_url=v1, api_key=key, timeout=timeout, max_retries=max_retries,
                                         http_client=http_client)
        admin = AsyncAdmin(self._http, root, key)
        self._admin = admin
        self.profiles = AsyncProfiles(admin)
        self.adapters = AsyncAdapters(admin, lambda: self._model(None))
        self.vectors = AsyncVectors(admin)
        self.model = model

    @overload
    async def chat(self, messages: Iterable[dict[str, Any]], *, model: str | None = ...,
                   steering: SteeringArg = ..., profiles: ProfilesArg = ..., stream: Literal[False] = ...,
                   **openai_kwargs: Any) -> SteeredResponse[ChatCompletion]: ...
    @overload
    async def chat(self, messages: Iterable[dict[str, Any]], *, model: str | None = ...,
                   steering: SteeringArg = ..., profiles: ProfilesArg = ..., stream: Literal[True],
                   **openai_kwargs: Any) -> AsyncSteeredStream[ChatCompletionChunk]: ...

    async def chat(self, messages: Iterable[dict[str, Any]], *, model: str | None = None,
                   steering: SteeringArg = None, profiles: ProfilesArg = None, stream: bool = False,
                   **openai_kwargs: Any) -> Any:
        """See `SteerClient.chat`; with stream=True returns an AsyncSteeredStream."""
        create = self.openai.chat.completions.with_raw_response.create
        return await self._call(create, stream, model=await self._model(model), messages=messages,
                                **_options(steering, profiles, openai_kwargs))

    @overload
    async def complete(self, prompt: Prompt, *, model: str | None = ..., steering: SteeringArg = ...,
                       profiles: ProfilesArg = ..., stream: Literal[False] = ..., **openai_kwargs: Any
                       ) -> SteeredResponse[Completion]: ...
    @overload
    async def complete(self, prompt: Prompt, *, model: str | None = ..., steering: SteeringArg = ...,
                       profiles: ProfilesArg = ..., stream: Literal[True], **openai_kwargs: Any
                       ) -> AsyncSteeredStream[Completion]: ...

    async def complete(self, prompt: Prompt, *, model: str | None = None, steering: SteeringArg = None,
                       profiles: ProfilesArg = None, stream: bool = False, **openai_kwargs: Any) -> Any:
        create = self.openai.completions.with_raw_response.create
        return await self._call(create, stream, model=await self._model(model), prompt=prompt,
                                **_options(steering, profiles, openai_kwargs))

    async def schema(self) -> dict[str, Any]:
        return await self._admin.call("GET", SCHEMA_ROUTE)

    async def _call(self, create: Callable[..., Any], stream: bool, **kwargs: Any) -> Any:
        try:
            raw = await create(**_stream_flag(stream), **kwargs)
            applied, parsed = Applied.from_headers(raw.headers), raw.parse()  # parse() is sync here too
        except openai.OpenAIError as exc:
            raise from_openai(exc) from exc
        return AsyncSteeredStream(parsed, applied) if stream else SteeredResponse(parsed, applied)

    async def _model(self, model: str | None) -> str:
        if model or self.model:
            return model or self.model  # type: ignore[return-value]
        try:
            async for m in self.openai.models.list():
                self.model = m.id
                break
        except openai.OpenAIError as exc:
            raise from_openai(exc) from exc
        if self.model is None:
            raise NotFound("model", "the server lists no model", 404)
        return self.model

    async def close(self) -> None:
        if self._owns_http:
            await self.openai.close()
            await self._http.aclose()

    async def __aenter__(self) -> AsyncSteerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
