"""IAPT (instruction-aware prompt tuning, docs/adapters.md): per-layer generators that turn the instruction's hidden
states into 4 soft tokens. The paper's code is not public; everything below that the abstract does not fix is ours.

Our definition. A prompt is `instruction tokens (n) + 4 placeholder tokens`; generation follows. At every decoder
layer l, before the layer runs, the residual-stream states of the 4 placeholder positions are *replaced* by

    Z   = RMS(H_l) @ Wd_l + bd_l                     H_l: layer-l input of the n instruction tokens  [n, d] -> [n, m]
    A   = softmax_n(Z @ Q_l^T / sqrt(m))             Q_l: 4 learned queries                            [n, 4]
    P_l = R_l(A^T @ Z) @ Wu_l + bu_l                 R_l: learned rational activation, per layer        [4, d]

with RMS(h) = h / sqrt(mean(h^2) + 1e-6) per token (no weight: it makes one generator work at every depth),
and R(x) = (a_0 + a_1 x + ... + a_p x^p) / (1 + |b_1 x + ... + b_q x^q|), the Padé activation unit, elementwise,
degrees (p, q) = (5, 4) by default, initialised to the identity (a_1 = 1, all else 0). With `shared` the two
projections (Wd, bd, Wu, bu) are shared by all layers; queries and activations stay per layer. The placeholders
take ordinary positions n .. n+3; their token ids do not matter (layer 0's input is replaced too). Later tokens
attend to them at every layer.

The pooling is a softmax over instruction tokens, so it can be computed in pieces (chunked prefill) and merged
exactly like flash attention's partial softmaxes: `pool_partial` per piece, `merge_pools`, then `finish`.
Computed in fp32 whatever the model's dtype.

Files: `iapt_config.json` (IaptConfig's fields) and `iapt_model.safetensors` (the tensors of `IaptModel`,
stacked over layers: projections have a leading dimension of 1 when shared, else num_layers).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

SOFT_TOKENS = 4
PLACEHOLDER_ID = 0  # the token id the server puts at the soft positions (any id works; see above)
CONFIG_FILE, WEIGHTS_FILE = "iapt_config.json", "iapt_model.safetensors"
_EPS = 1e-6


@dataclass(frozen=True)
class IaptConfig:
    base_model: str  # the base model's name or path, as the trainer saw it (registration checks the shapes)
    hidden_size: int  # d
    num_layers: int
    bottleneck: int = 32  # m
    degrees: tuple[int, int] = (5, 4)  # (p, q) of the rational activation
    shared: bool = False  # one pair of projections for all layers
    soft_tokens: int = SOFT_TOKENS

    def __post_init__(self) -> None:
        object.__setattr__(self, "degrees", tuple(self.degrees))
        if self.soft_tokens != SOFT_TOKENS:
            raise ValueError(f"soft_tokens must be {SOFT_TOKENS}")
        if min(self.hidden_size, self.num_layers, self.bottleneck) < 1:
            raise ValueError("hidden_size, num_layers and bottleneck must be positive")
        p, q = self.degrees
        if not (0 <= p <= 16 and 0 <= q <= 16):
            raise ValueError("rational degrees must lie in 0..16")

    @classmethod
    def load(cls, path: Path) -> IaptConfig:
        raw = json.loads((path / CONFIG_FILE).read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"{CONFIG_FILE} is not a JSON object")
        return cls(**raw)

    def save(self, path: Path) -> None:
        (path / CONFIG_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensors a weights file must hold, with their shapes."""
        d, m, layers, s = self.hidden_size, self.bottleneck, self.num_layers, self.soft_tokens
        proj = 1 if self.shared else layers
        p, q = self.degrees
        return {"down.weight": (proj, m, d), "down.bias": (proj, m), "up.weight": (proj, d, m), "up.bias": (proj, d),
                "queries": (layers, s, m), "act.num": (layers, p + 1), "act.den": (layers, q)}


def rational(x: torch.Tensor, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """The Padé activation unit: (num[0] + num[1] x + ...) / (1 + |den[0] x + den[1] x^2 + ...|), by Horner."""
    top = torch.zeros_like(x) + num[-1]
    for a in num.flip(0)[1:]:
        top = top * x + a
    bottom = torch.zeros_like(x)
    for b in den.flip(0):
        bottom = (bottom + b) * x
    return top / (1 + bottom.abs())


@dataclass
class Pool:
    """Partial softmax-pooling statistics over some instruction tokens: running max, denominator and weighted sum
    of each query."""

    max: torch.Tensor  # [S]
    den: torch.Tensor  # [S]
    acc: torch.Tensor  # [S, m]


def merge_pools(a: Pool | None, b: Pool) -> Pool:
    """The statistics of both pieces together (order does not matter)."""
    if a is None:
        return b
    top = torch.maximum(a.max, b.max)
    wa, wb = torch.exp(a.max - top), torch.exp(b.max - top)
    return Pool(top, a.den * wa + b.den * wb, a.acc * wa[:, None] + b.acc * wb[:, None])


class IaptModel(nn.Module):
    """All layers' generators of one adapter."""

    def __init__(self, config: IaptConfig):
        super().__init__()
        self.config = config
        shapes = config.shapes()
        self.params = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(torch.zeros(s)) for k, s in shapes.items()})
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        d, m = self.config.hidden_size, self.config.bottleneck
        with torch.no_grad():
            self.tensor("down.weight").normal_(0, 1 / math.sqrt(d), generator=generator)
            self.tensor("down.bias").zero_()
            self.tensor("queries").normal_(0, 1.0, generator=generator)
            self.tensor("up.weight").normal_(0, 0.02 / math.sqrt(m), generator=generator)
            self.tensor("up.bias").zero_()
            self.tensor("act.num").zero_()
            if self.config.degrees[0] >= 1:
                self.tensor("act.num")[:, 1] = 1.0  # identity
            self.tensor("act.den").zero_()

    def tensor(self, name: str) -> nn.Parameter:
        return self.params[name.replace(".", "_")]

    def state(self) -> dict[str, torch.Tensor]:
        return {k: self.tensor(k).detach().contiguous() for k in self.config.shapes()}

    def _proj(self, name: str, layer: int) -> torch.Tensor:
        return self.tensor(name)[0 if self.config.shared else layer]

    def project(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Z: the down-projected, RMS-normalised instruction states [n, m] (fp32)."""
        h = hidden.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + _EPS)
        return h @ self._proj("down.weight", layer).T + self._proj("down.bias", layer)

    def pool_partial(self, layer: int, hidden: torch.Tensor) -> Pool:
        """Pooling statistics of some of the instruction tokens' layer-`layer` inputs `hidden` [n, d], n >= 1."""
        z = self.project(layer, hidden)
        scores = z @ self.tensor("queries")[layer].T / math.sqrt(self.config.bottleneck)  # [n, S]
        top = scores.max(0).values
        weights = torch.exp(scores - top)
        return Pool(top, weights.sum(0), weights.T @ z)

    def finish(self, layer: int, pool: Pool) -> torch.Tensor:
        """P_l [S, d] (fp32) from the statistics of the whole instruction."""
        pooled = pool.acc / pool.den[:, None]
        act = rational(pooled, self.tensor("act.num")[layer], self.tensor("act.den")[layer])
        return act @ self._proj("up.weight", layer).T + self._proj("up.bias", layer)

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """P_l [S, d] from all instruction states of layer `layer` at once."""
        return self.finish(layer, self.pool_partial(layer, hidden))

    # --- files ------------------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        self.config.save(path)
        save_file(self.state(), str(path / WEIGHTS_FILE))

    @classmethod
    def load(cls, path: Path, device: str | torch.device = "cpu") -> IaptModel:
        from safetensors.torch import load_file

        config = IaptConfig.load(path)
        tensors = load_file(str(path / WEIGHTS_FILE), device=str(device))
        expected = config.shapes()
        if set(tensors) != set(expected):
            raise ValueError(f"{WEIGHTS_FILE} holds {sorted(tensors)}, expected {sorted(expected)}")
        model = cls(config).to(device)
        with torch.no_grad():
            for name, shape in expected.items():
                if tuple(tensors[name].shape) != shape:
                    raise ValueError(f"{name} has shape {list(tensors[name].shape)}, expected {list(shape)}")
                model.tensor(name).copy_(tensors[name])
        return model.eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@contextmanager
def hf_soft_prompts(model: nn.Module, iapt: IaptModel, instruction_lens: Sequence[int]) -> Iterator[None]:
    """Apply `iapt` inside forwards of a Hugging Face decoder (Llama-like: `model.model.layers`), for a batch whose
    row b holds `instruction_lens[b]` instruction tokens, then the 4 placeholders, from position 0 (right padding
    only). Forwards that do not cover a row's soft positions (decode steps with a KV cache) are left alone.
    Differentiable: the trainer uses it."""
    layers = model.get_decoder().layers
    s = iapt.config.soft_tokens

    def hook(layer: int):
        def pre(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] < max(instruction_lens) + s:
                return None
            # All rows' P from the unmodified input first: writing into the copy while its rows are still being
            # read would bump the version of tensors autograd saved (backward then fails).
            soft = [iapt(layer, hidden[b, :n]) for b, n in enumerate(instruction_lens)]
            hidden = hidden.clone()
            for b, n in enumerate(instruction_lens):
                hidden[b, n:n + s] = soft[b].to(hidden.dtype)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}
        return pre

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
