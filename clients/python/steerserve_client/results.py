"""What a steered call returns: the openai response object plus the steering the server says it applied."""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import openai

from .errors import from_openai

T = TypeVar("T")
APPLIED_HEADER = "X-Steering-Applied"


@dataclass(frozen=True)
class Applied:
    """The `X-Steering-Applied` response header: the merged spec's fingerprint ("" when unsteered) and the
    methods applied, e.g. `("logits.bias", "logits.rules")`."""

    fingerprint: str
    methods: tuple[str, ...]

    @property
    def steered(self) -> bool:
        return bool(self.fingerprint)

    @classmethod
    def parse(cls, value: str | None) -> Applied | None:
        """`"<fingerprint>; methods=a,b"` -> Applied; None when the header is absent (not a steerserve server)."""
        if value is None:
            return None
        fingerprint, _, rest = value.partition(";")
        methods = rest.strip().removeprefix("methods=")
        return cls(fingerprint.strip(), tuple(m for m in methods.split(",") if m))

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Applied | None:
        return cls.parse(headers.get(APPLIED_HEADER))


@dataclass(frozen=True)
class SteeredResponse(Generic[T]):
    """A completed call: `.response` is the openai object (ChatCompletion or Completion), `.applied` the steering.
    Attributes not defined here are read from `.response`, so `result.choices[0]` works as with openai."""

    response: T
    applied: Applied | None

    @property
    def text(self) -> str | None:
        """The first choice's text (chat: its message content)."""
        choice = self.response.choices[0]  # type: ignore[attr-defined]
        message = getattr(choice, "message", None)
        return message.content if message is not None else choice.text

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("response", "applied"):  # no recursion while (un)pickling
            raise AttributeError(name)
        return getattr(self.response, name)


class SteeredStream(Generic[T]):
    """A streaming call: iterate for chunks; `.applied` is known before the first chunk. Close it (or use it as a
    context manager, or read it to the end) to free the connection. In-stream errors raise typed errors."""

    def __init__(self, stream: openai.Stream[T], applied: Applied | None):
        self.response, self.applied = stream, applied

    def __iter__(self) -> Iterator[T]:
        try:
            yield from self.response
        except openai.OpenAIError as exc:
            raise from_openai(exc) from exc

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> SteeredStream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSteeredStream(Generic[T]):
    """The asyncio counterpart of `SteeredStream`: `async for chunk in stream`, `async with`, `await aclose()`."""

    def __init__(self, stream: openai.AsyncStream[T], applied: Applied | None):
        self.response, self.applied = stream, applied

    async def __aiter__(self) -> AsyncIterator[T]:
        try:
            async for chunk in self.response:
                yield chunk
        except openai.OpenAIError as exc:
            raise from_openai(exc) from exc

    async def aclose(self) -> None:
        await self.response.close()

    async def __aenter__(self) -> AsyncSteeredStream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
