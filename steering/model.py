"""What steering needs to know about the served model (tokenizer, sizes), and the error for specs it rejects."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any


class SpecError(ValueError):
    """A steering spec that cannot be applied to the served model: `field` is its dotted path in the spec."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclass(frozen=True, eq=False)
class ModelFacts:
    tokenizer: Any
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()
    num_layers: int = 0  # decoder layers
    num_heads: int = 0  # query heads per layer
    num_kv_heads: int = 0
    attention_unsupported: str | None = None  # why attention steering cannot run on this model, if it cannot
    moe_layers: tuple[int, ...] = ()  # decoder layers with routed experts; () for a dense model
    num_experts: int = 0  # routed experts per MoE layer
    experts_top_k: int = 0  # experts the router selects per token
    router: str = ""  # the router's kind, e.g. "softmax_topk", "grouped_sigmoid_bias"
    experts_unsupported: str | None = None  # why expert steering cannot run on this MoE model, if it cannot

    def single_token(self, text: str) -> int | None:
        """The id of `text` if the tokenizer encodes it as exactly one token (no special tokens added)."""
        return _single_token(self, text)


@lru_cache(maxsize=4096)
def _single_token(model: ModelFacts, text: str) -> int | None:
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None
