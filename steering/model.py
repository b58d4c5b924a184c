"""What steering needs to know about the served model (tokenizer, sizes), and the error for specs it rejects."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any


class SpecError(ValueError):
    """A steering spec that cannot be applied to the served model: `field` is its dotted path in the spec."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclass(frozen=True, eq=False)
class ModelFacts:
    """The served model as steering sees it; each method's `facts` fills its fields (steering/methods/)."""

    tokenizer: Any
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()
    num_layers: int = 0  # decoder layers
    num_heads: int = 0  # query heads per layer
    num_kv_heads: int = 0
    moe_layers: tuple[int, ...] = ()  # decoder layers with routed experts; () for a dense model
    num_experts: int = 0  # routed experts per MoE layer
    experts_top_k: int = 0  # experts the router selects per token
    router: str = ""  # the router's kind, e.g. "softmax_topk", "grouped_sigmoid_bias"
    # Why a method family cannot run on this model (the model, or its failed start-up self-test): {family: reason}
    unsupported: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, object] = field(default_factory=dict)  # facts a method needs that have no field here

    @property
    def attention_unsupported(self) -> str | None:
        return self.unsupported.get("attention")

    @property
    def experts_unsupported(self) -> str | None:
        return self.unsupported.get("experts")

    def single_token(self, text: str) -> int | None:
        """The id of `text` if the tokenizer encodes it as exactly one token (no special tokens added)."""
        return _single_token(self, text)


@lru_cache(maxsize=4096)
def _single_token(model: ModelFacts, text: str) -> int | None:
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None
