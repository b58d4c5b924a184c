"""OpenAI request schemas (strict: unknown fields are a 400) and their translation into vLLM SamplingParams."""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import BadRequest

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionDefinition(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(Strict):
    """One entry of `tools` (OpenAI's function tool)."""

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class CalledFunction(Strict):
    name: str
    arguments: str


class ToolCall(Strict):
    """A tool call of an earlier assistant message, as the client sends it back."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates read it: text content; tool calls with their arguments as JSON objects
        where they parse (as vLLM hands them to templates), else as the string sent."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": c.type, "function": {"name": c.function.name,
                                                                          "arguments": _json_or_text(c.function.arguments)}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format.json_schema.schema is required when type is 'json_schema'")
        return self


class SteeringStats(Strict):
    """steerserve's opt-in response extension `steering_stats` (also `X-Steering-Stats: routed_experts`)."""

    routed_experts: bool = Field(False, description="Per-layer counts of the experts routing chose (MoE models).")
    conjugate: bool = Field(False, description="Return conjugate prompting's intermediate texts.")


class SamplingRequest(Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    min_p: Probability = 0.0
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    steering: dict[str, Any] | None = None  # steerserve's extension; parsed by steering.spec, not here
    steering_stats: SteeringStats | None = None  # steerserve's extension: extra output in the response

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 16 or any(not s for s in stops)):
            raise ValueError("stop takes at most 16 non-empty strings")
        return stops

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and (not v or any(isinstance(p, list | str) and not p for p in v)):
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported by this server")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, v: int | None, info) -> int | None:
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported by this server")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _logprob_options(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


def sampling_params(req: SamplingRequest, *, prompt_len: int, max_model_len: int, vocab_size: int,
                    logprobs: int | None, structured=None, extra_args: dict | None = None,
                    skip_prefix_cache: bool = False, skip_special_tokens: bool = True):
    """Translate a validated request into vLLM SamplingParams, checking what only the served model can decide.
    `skip_prefix_cache`: compute the whole prompt even if a cached prefix exists (IAPT adapters need that)."""
    room = max_model_len - prompt_len
    if room < 1:
        raise BadRequest(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has {prompt_len} "
            "tokens, which leaves no room to generate.", param="messages" if hasattr(req, "messages") else "prompt",
            code="context_length_exceeded")
    if req.max_tokens is not None and req.max_tokens > room:
        raise BadRequest(
            f"This model's maximum context length is {max_model_len} tokens. The prompt has {prompt_len} tokens and "
            f"max_tokens is {req.max_tokens}, {prompt_len + req.max_tokens} in total. Reduce the prompt or max_tokens.",
            param="max_tokens", code="context_length_exceeded")
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    try:
        return SamplingParams(
            n=req.n,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            seed=req.seed,
            stop=req.stop,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            max_tokens=req.max_tokens or room,
            logprobs=logprobs,
            logit_bias=_token_bias(req.logit_bias, vocab_size),
            ignore_eos=req.ignore_eos,
            structured_outputs=structured,
            skip_special_tokens=skip_special_tokens,
            extra_args=extra_args,
            skip_reading_prefix_cache=True if skip_prefix_cache else None,
            # deltas even for non-streaming requests: the server times every token (TTFT, ITL) the same way
            output_kind=RequestOutputKind.DELTA,
        )
    except (ValueError, VLLMClientError) as exc:  # vLLM's own checks, e.g. n > 1 with greedy sampling
        raise BadRequest(str(exc), param=getattr(exc, "parameter", None)) from None


def _token_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise BadRequest(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if not 0 <= token < vocab_size:
            raise BadRequest(f"logit_bias token id {token} is outside the vocabulary [0, {vocab_size})",
                             param="logit_bias")
        out[token] = value
    return out


def structured_output(fmt: ResponseFormat | None):
    """vLLM structured-output parameters for OpenAI's response_format (None for plain text)."""
    from vllm.sampling_params import StructuredOutputsParams

    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    assert fmt.json_schema is not None and fmt.json_schema.schema_ is not None
    try:
        json.dumps(fmt.json_schema.schema_)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"response_format.json_schema.schema is not valid JSON: {exc}",
                         param="response_format.json_schema.schema") from None
    return StructuredOutputsParams(json=fmt.json_schema.schema_)
