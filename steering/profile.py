"""Sink / dormant head profiling (docs/tools.md): per (layer, query head) attention statistics over a text set.

For one sequence and one head, A is the L x L causal attention matrix (rows: queries, columns: keys):
- key-0 mass     M = mean_{i>=1} A[i, 0]                         (row 0 can only attend to key 0: left out)
- row entropy    R = mean_{i>=1} H_i,  H_i = -sum_j A[i,j] ln A[i,j] / ln(i+1)      (in [0, 1])
- column entropy C = max_{j<=L-2} C_j, C_j = -sum_i Ã[i,j] ln Ã[i,j] / ln(L-j),  Ã[:, j] = A[:, j] / sum_i A[i, j]
  (the last key has one query: left out)
Per head, M and R are averaged over the texts and so is C (each text's max). A head is flagged a *sink* head when
R < row_threshold and C > col_threshold (Guo et al., arXiv 2410.13835: every row concentrated, one key collecting
attention evenly from all queries), and *dormant* when M > mass_threshold (nearly all attention parked on key 0).
The paper's code publishes no threshold values; our defaults (0.3, 0.9, 0.8) are documented choices, configurable
on the command line.

Attention comes from HF transformers' eager attention (fp32) on the served model's weights, one text at a time
(no padding, so key 0 is each text's first token, as in vLLM).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROW_THRESHOLD, COL_THRESHOLD, MASS_THRESHOLD = 0.3, 0.9, 0.8


def key0_mass(attn: torch.Tensor) -> torch.Tensor:
    """[..., L, L] attention -> [...] mean weight on key 0 over queries 1..L-1."""
    return attn[..., 1:, 0].double().mean(-1)


def row_entropy(attn: torch.Tensor) -> torch.Tensor:
    """[..., L, L] causal attention -> [...] mean over queries 1..L-1 of the row entropy / ln(i + 1)."""
    a = attn.double()[..., 1:, :]
    h = -torch.where(a > 0, a * a.log(), torch.zeros_like(a)).sum(-1)
    norm = torch.arange(2, attn.shape[-1] + 1, dtype=torch.float64).log()
    return (h / norm).mean(-1)


def column_entropy(attn: torch.Tensor) -> torch.Tensor:
    """[..., L, L] causal attention -> [...] max over keys 0..L-2 of the column's normalised entropy / ln(L - j)."""
    a = attn.double()[..., :-1]
    col = a / a.sum(-2, keepdim=True).clamp_min(1e-300)
    h = -torch.where(col > 0, col * col.log(), torch.zeros_like(col)).sum(-2)
    L = attn.shape[-1]
    norm = torch.arange(L, 1, -1, dtype=torch.float64).log()  # ln(L - j), j = 0..L-2
    return (h / norm).amax(-1)


@dataclass
class SinkProfile:
    model: str
    texts: int
    num_layers: int
    num_heads: int
    key0_mass: list[list[float]]  # [layer][head]
    row_entropy: list[list[float]]
    col_entropy: list[list[float]]
    row_threshold: float = ROW_THRESHOLD
    col_threshold: float = COL_THRESHOLD
    mass_threshold: float = MASS_THRESHOLD

    def sink_heads(self) -> list[str]:
        return [f"{layer}.{head}" for layer in range(self.num_layers) for head in range(self.num_heads)
                if self.row_entropy[layer][head] < self.row_threshold
                and self.col_entropy[layer][head] > self.col_threshold]

    def dormant_heads(self) -> list[str]:
        return [f"{layer}.{head}" for layer in range(self.num_layers) for head in range(self.num_heads)
                if self.key0_mass[layer][head] > self.mass_threshold]

    def to_json(self) -> dict:
        return asdict(self) | {"sink_heads": self.sink_heads(), "dormant_heads": self.dormant_heads()}


def load_model(model_path: str | Path):
    """The HF model (fp32, eager attention, so attention weights can be returned) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), AutoTokenizer.from_pretrained(model_path)


def attention_stats(model, token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[layers, heads] key-0 mass, row entropy and column entropy of one sequence."""
    with torch.no_grad():
        out = model(torch.tensor([list(token_ids)]), output_attentions=True, use_cache=False)
    attn = torch.stack([a[0] for a in out.attentions])  # [layers, heads, L, L]
    return key0_mass(attn), row_entropy(attn), column_entropy(attn)


def profile_sinks(model, sequences: Iterable[Sequence[int]], name: str = "",
                  progress: Callable[[Iterable], Iterable] = lambda x: x, **thresholds: float) -> SinkProfile:
    """Average the per-sequence statistics over `sequences` (token id lists of at least 2 tokens)."""
    totals = None
    n = 0
    for ids in progress(sequences):
        if len(ids) < 2:
            continue
        stats = attention_stats(model, ids)
        totals = stats if totals is None else tuple(t + s for t, s in zip(totals, stats, strict=True))
        n += 1
    if totals is None:
        raise ValueError("no text of at least 2 tokens to profile")
    m, r, c = (t / n for t in totals)
    layers, heads = m.shape
    return SinkProfile(name, n, layers, heads, m.tolist(), r.tolist(), c.tolist(), **thresholds)


def read_texts(path: Path | None, tokenizer) -> list[list[int]]:
    """Token ids to profile: a task file's rendered prompts (JSONL, the shipped one by default, exactly what
    calibration feeds the model), or a plain text file with one text per line (tokenised as is)."""
    from .tasks import SHIPPED, load_tasks, render

    if path is None or path.suffix == ".jsonl":
        tasks = load_tasks(path or SHIPPED)
        return [render(tokenizer, t, it) for t in tasks.values() for it in t.items]
    return [tokenizer.encode(line) for line in path.read_text().splitlines() if line.strip()]


def plot(profile: SinkProfile, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("key-0 mass M", profile.key0_mass, profile.dormant_heads(), f"x: M > {profile.mass_threshold}"),
              ("row entropy R", profile.row_entropy, profile.sink_heads(),
               f"x: sink (R < {profile.row_threshold}, C > {profile.col_threshold})"),
              ("max column entropy C", profile.col_entropy, profile.sink_heads(), "x: sink")]
    fig, axes = plt.subplots(1, 3, figsize=(4 + 1.1 * profile.num_heads, 2 + 0.22 * profile.num_layers),
                             constrained_layout=True)
    for ax, (title, values, marked, note) in zip(axes, panels, strict=True):
        im = ax.imshow(values, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
        for key in marked:
            layer, head = map(int, key.split("."))
            ax.text(head, layer, "x", ha="center", va="center", color="red", fontsize=7)
        ax.set_title(f"{title}\n{note}", fontsize=9)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"{profile.model}: {profile.texts} texts", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(profile: SinkProfile, json_path: Path, png_path: Path | None) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(profile.to_json(), indent=1) + "\n")
    if png_path is not None:
        plot(profile, png_path)
