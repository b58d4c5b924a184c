"""fTRI (docs/methods/experts.md): find the experts whose routing frequency separates one behaviour class from the rest.

    steerserve ftri --model DIR --sets refuse.jsonl comply.jsonl --target refuse --out results/
    steerserve ftri --model DIR --sets prompts.jsonl --classify "refuse=(?i)\\bI can(no|')t\\b" --target refuse ...

Each prompt gets the per-(decoder layer, expert) frequency with which the router selected the expert over its
tokens (prompt tokens; with `--generated-tokens N`, also the first N - 1 generated ones), recorded by the engine's
router hook (the `steering_stats` counting). Classes: one per JSONL set (the file stem, or a line's "label"), or,
with one set and `--classify class=regex ...`, the first class whose regex matches the greedy response ("other"
if none). Each expert's score is its mean frequency in the target class minus the mean of the other classes'
means. Writes `ftri.json` (ranked experts with their frequencies), `ftri.png` (heatmap of the scores, layers x
experts) and `profile.json` (a steering profile switching off the top k).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from pathlib import Path


def load_sets(paths: list[Path]) -> list[tuple[str, str | None]]:
    """(prompt, label) pairs; the label is a line's "label", else its file's stem."""
    out = []
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                out.append((row["prompt"], row.get("label", path.stem)))
    return out


def classify(text: str, classes: list[tuple[str, re.Pattern]]) -> str:
    return next((name for name, rx in classes if rx.search(text)), "other")


def open_engine(model: Path):
    """An in-process fp32 vLLM engine on `model` with the steering hooks (expert masks, routing counts)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from steerserve.server.engine.builder import open_steering_llm
    from steerserve.server.engine.router_hook import STATS_DIR

    os.environ.setdefault(STATS_DIR, tempfile.mkdtemp(prefix="steerserve-ftri-"))
    return open_steering_llm(model, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
                             kv_cache_memory_bytes=512 << 20)


def run(model: Path, sets: list[Path], target: str, out: Path, *, classify_rules: list[str] = (),
        generated_tokens: int = 0, max_tokens: int = 32, top_k: int = 10, chat: bool = True, llm=None) -> dict:
    """Rank the experts (see the module docstring) on `llm`, else on a fresh `open_engine(model)`."""
    import torch
    from vllm import SamplingParams

    from steerserve.server.engine import vllm_compat
    from steerserve.server.engine.router_hook import read_counts
    from steerserve.steering.experts import moe_layout
    from steerserve.steering.methods.stats import StatsPlan
    from steerserve.steering.plan import Plan

    llm = llm or open_engine(model)
    layout = moe_layout(vllm_compat.llm_model_config(llm).hf_text_config)
    if layout is None:
        raise SystemExit(f"{model} has no routed experts")
    tok = llm.get_tokenizer()
    rows = load_sets(sets)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             if chat and tok.chat_template else p for p, _ in rows]
    rules = [(name, re.compile(rx)) for name, _, rx in (r.partition("=") for r in classify_rules)]
    labels = [label for _, label in rows]
    if rules:  # one set: the classes come from the responses
        outs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=True)
        labels = [classify(o.outputs[0].text, rules) for o in outs]
    if target not in labels:
        raise SystemExit(f"no prompt falls into the target class {target!r} (classes: {sorted(set(labels))})")
    keys = [uuid.uuid4().hex for _ in texts]
    n_gen = max(generated_tokens, 1)  # max_tokens=1: only prompt tokens run through the model
    params = [SamplingParams(temperature=0, max_tokens=n_gen, ignore_eos=True, extra_args=Plan("", StatsPlan(k)).to_extra_args())
              for k in keys]
    outs = llm.generate(texts, params, use_tqdm=True)  # the progress bar
    freq = []
    for key, o in zip(keys, outs, strict=True):
        counts = read_counts(key, layout.layers)
        n_tokens = len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1
        freq.append(torch.tensor([counts[str(la)] for la in layout.layers], dtype=torch.float64) / n_tokens)
    freq_t = torch.stack(freq)  # [prompts, MoE layers, E]
    classes = sorted(set(labels))
    means = {c: freq_t[[i for i, lab in enumerate(labels) if lab == c]].mean(0) for c in classes}
    rest = torch.stack([means[c] for c in classes if c != target]).mean(0) if len(classes) > 1 else \
        torch.zeros_like(means[target])
    score = means[target] - rest
    order = torch.argsort(score.flatten(), descending=True).tolist()
    E = layout.num_experts
    ranked = [{"expert": f"{layout.layers[i // E]}.{i % E}", "score": score.flatten()[i].item(),
               "freq_target": means[target].flatten()[i].item(), "freq_rest": rest.flatten()[i].item()}
              for i in order]
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": str(model), "target": target, "classes": {c: labels.count(c) for c in classes},
              "tokens": "prompt" + (f" + {generated_tokens - 1} generated" if generated_tokens > 1 else ""),
              "layers": list(layout.layers), "ranked": ranked}
    (out / "ftri.json").write_text(json.dumps(report, indent=2))
    profile = {"experts": {"off": [r["expert"] for r in ranked[:top_k]]}}
    (out / "profile.json").write_text(json.dumps(profile, indent=2))
    _heatmap(score, layout.layers, target, out / "ftri.png")
    return report


def _heatmap(score, layers, target: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, score.shape[1] * 0.25 + 2), max(3, len(layers) * 0.25 + 1.5)))
    lim = float(score.abs().max()) or 1.0
    im = ax.imshow(score.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_yticks(range(len(layers)), [str(la) for la in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("decoder layer")
    ax.set_title(f"fTRI: routing frequency, {target!r} minus the rest")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
