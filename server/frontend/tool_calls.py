"""Tool calling on chat completions, through vLLM's own parsers (`vllm.parser.ParserManager` composing a
`vllm.tool_parsers` parser): the same parsing, forced-call grammars and streaming state machine as `vllm serve
--enable-auto-tool-choice --tool-call-parser <name>`, none of it copied.

A request with `tools` is served only when both hold, else it is a 400 on `tools`:
- the server was started with a tool-call parser (`--tool-call-parser`, e.g. `hermes`), and
- the chat template shows tools to the model (`chat.renders_tools`; SmolLM2's own template does not, the
  bundled `smollm2-tools` template does).
`tool_choice: "none"` is the exception: the tools are neither rendered nor parsed (vLLM's
`--exclude-tools-when-tool-choice-none`), so it is accepted on every model.

The parser's `adjust_request` decides the sampling constraint: for `required` and a named function, a grammar that
forces a call (a structural tag or a JSON schema, whichever the parser asks for); for `auto`, free text with the
call syntax constrained once a call starts. Parsers are stateful: one per choice, whole or streamed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from steerserve.server.http.errors import BadRequest

from .chat import renders_tools

TEMPLATES = ("smollm2-tools",)  # chat templates shipped in server/frontend/templates/, usable by name
_PARSERS: dict[tuple[str, int], type] = {}


def parser_class(name: str, tokenizer) -> type:
    """vLLM's composed parser class for tool parser `name` (checked against `tokenizer`: a ValueError naming
    the parser if it is unknown or the tokenizer lacks what it needs)."""
    key = (name, id(tokenizer))
    if key not in _PARSERS:
        from vllm.parser import ParserManager

        try:
            _PARSERS[key] = ParserManager.get_parser(tool_parser_name=name, enable_auto_tools=True,
                                                     tokenizer=tokenizer)
        except (TypeError, KeyError) as exc:
            raise ValueError(f"tool-call parser {name!r}: {exc}") from None
    return _PARSERS[key]


def chat_template(name_or_path: str) -> str:
    """The text of a chat template given by a bundled name (`TEMPLATES`) or a file path."""
    from importlib.resources import files
    from pathlib import Path

    if name_or_path in TEMPLATES:
        return (files("steerserve.server.frontend") / "templates" / f"{name_or_path}.jinja").read_text()
    return Path(name_or_path).read_text()


def template_tools(tokenizer, tools: list[dict[str, Any]] | None, tool_choice: Any = None
                   ) -> list[dict[str, Any]] | None:
    """The tools to render into the prompt (None when there are none or tool_choice is "none"); a 400 if the
    chat template would not show them to the model."""
    if not tools or tool_choice == "none":
        return None
    if not renders_tools(tokenizer, tools):
        raise BadRequest("tools: this model's chat template does not support tools (it renders the chat the same "
                         "with and without them); serve it with a template that does (--chat-template)",
                         param="tools", code="tools_unsupported")
    return tools


@dataclass
class ToolCalling:
    """One chat request's tool calling: vLLM's request (adjusted by the parser) and one parser per choice."""

    parser_cls: type
    request: Any  # vllm ChatCompletionRequest
    tokenizer: Any
    named: bool
    prompt_ids: list[int] = field(default_factory=list)
    _streams: dict[int, Any] = field(default_factory=dict)
    _called: set[int] = field(default_factory=set)

    @classmethod
    def prepare(cls, parser_name: str | None, tokenizer, messages: list[dict[str, Any]],
                tools: list[dict[str, Any]] | None, tool_choice: Any, parallel_tool_calls: bool | None
                ) -> ToolCalling | None:
        """None when the request has no tools to call (none given, or tool_choice "none"); else checked and
        ready. `messages` and `tools` as sent (OpenAI's JSON); `tool_choice` is "auto", "required" or
        {"type": "function", "function": {"name": ...}}."""
        if tool_choice is not None and tool_choice != "none" and not tools:
            raise BadRequest("tool_choice needs tools", param="tool_choice")
        if isinstance(tool_choice, dict) and tool_choice["function"]["name"] not in {
                t["function"]["name"] for t in tools or []}:
            raise BadRequest(f"tool_choice names the function {tool_choice['function']['name']!r}, which is not "
                             "in tools", param="tool_choice.function.name")
        if template_tools(tokenizer, tools, tool_choice) is None:
            return None
        if parser_name is None:
            raise BadRequest("tools: this server has no tool-call parser (start it with --tool-call-parser)",
                             param="tools", code="tools_unsupported")
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        parser_cls = parser_class(parser_name, tokenizer)
        request = ChatCompletionRequest(messages=messages, tools=tools, tool_choice=tool_choice or "auto",
                                        parallel_tool_calls=parallel_tool_calls is not False)
        request = parser_cls(tokenizer, request.tools).adjust_request(request)
        return cls(parser_cls, request, tokenizer, isinstance(tool_choice, dict))

    @property
    def structured(self):
        """The sampling constraint the parser chose (vLLM StructuredOutputsParams), or None."""
        return self.request.structured_outputs

    @property
    def skip_special_tokens(self) -> bool:
        return self.request.skip_special_tokens

    def _parser(self):
        return self.parser_cls(self.tokenizer, self.request.tools)

    def _finish(self, called: bool, finish_reason: str | None) -> str | None:
        # OpenAI: "tool_calls" when the model stopped to call tools, "stop" when a named function was forced.
        return "tool_calls" if called and not self.named and finish_reason == "stop" else finish_reason

    def message(self, text: str, token_ids: list[int], finish_reason: str | None) -> tuple[dict, str | None]:
        """A whole choice's message (content and tool_calls) and finish reason."""
        from vllm.renderers.chat_utils import make_tool_call_id

        _, content, calls = self._parser().parse(text, self.request, enable_auto_tools=True,
                                                 model_output_token_ids=token_ids)
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
        if calls:
            message["tool_calls"] = [{"id": c.id or make_tool_call_id(), "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        return message, self._finish(bool(calls), finish_reason)

    def delta(self, index: int, text: str, token_ids: list[int], finish_reason: str | None
              ) -> tuple[dict | None, str | None]:
        """One streamed delta of choice `index` as OpenAI's `delta` (None: nothing to send yet) and its finish
        reason."""
        parser = self._streams.setdefault(index, self._parser())
        dm = parser.parse_delta(text, token_ids, self.request, self.prompt_ids, finished=finish_reason is not None)
        out = None
        if dm is not None:
            out = {k: v for k, v in dm.model_dump(exclude_none=True).items() if k in ("content", "tool_calls") and
                   (v or k == "content")}
            if out.get("tool_calls"):
                self._called.add(index)
                for call in out["tool_calls"]:
                    call.setdefault("index", 0)
        return out or None, self._finish(index in self._called, finish_reason)
