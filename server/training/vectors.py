"""Training control vectors from contrastive pairs: `steerserve vectors train`.

Each pair is a positive and a negative text. The model (a Hugging Face causal LM in fp32) reads every text once;
at each chosen decoder layer l we take the residual stream at the output of layer l (the layer module's output,
what layer l + 1 reads: the same place the `vectors` method adds to, and llama.cpp's `direction.l`) at the
text's last token. Then, per layer, with d_i = h(positive_i) - h(negative_i):

- `mean`: contrastive activation addition (Rimsky et al. 2024): v_l = mean_i d_i. It keeps the natural scale of
  the difference, so `scale: 1` adds the average positive-minus-negative difference.
- `pca`: representation reading (Zou et al. 2023): the first principal direction of the d_i, uncentred (the top
  right singular vector of the matrix of differences), a unit vector. Zou et al. take PCA of the differences of
  *randomly ordered* pairs; random sign flips leave the uncentred second moment unchanged and the mean near zero
  (so centring then changes little): this is their direction without the randomness.
- `pca-centred`: exactly repeng's `pca_diff`: sklearn's PCA, which centres the d_i first. When every pair is
  ordered positive-first, centring subtracts the very shift that separates them, and the first component is the
  direction the differences *vary* most along; on our joy pairs it separated only 50-57 % of the training pairs
  (`mean` 97-100 %, `pca` 91-100 %). It is here for parity with repeng.

The sign is chosen so that + means "positive": for the PCA methods as repeng does (the direction along which
most pairs' positive text projects above its negative one); a mean difference already points that way. All
methods are deterministic (exact SVD, no sampling); the seed is recorded and seeds torch for any stochastic op a
model has.

Pairs files: JSONL with one {"positive": str, "negative": str} per line, or one JSON object in repeng's
template form {"template": "... {persona} ...", "positive": [personas], "negative": [personas],
"suffixes": [str, ...]}: one pair per suffix and per (positive, negative) persona pair, each text the template
filled with the persona, followed by the suffix. Texts are used verbatim (apply a chat template yourself).
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steerserve.steering.control_vectors import ControlVector

METHODS = ("mean", "pca", "pca-centred")


class DataError(ValueError):
    """A pairs file or option that cannot be used; the message names the file and line or the option."""


@dataclass(frozen=True)
class Pair:
    positive: str
    negative: str


@dataclass(frozen=True)
class TrainResult:
    vector: ControlVector
    report: dict[str, Any]


def read_pairs(path: str | Path) -> list[Pair]:
    """The pairs of a JSONL file, or of one JSON object in template form (see the module docstring)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, dict) and "template" in whole:
        pairs = template_pairs(whole, str(path))
    else:
        pairs = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                pairs.append(_pair(line, f"{path}:{number}"))
    if len(pairs) < 2:
        raise DataError(f"{path}: at least 2 pairs are needed, found {len(pairs)}")
    return pairs


def _pair(line: str, where: str) -> Pair:
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise DataError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(row, dict) or set(row) != {"positive", "negative"}:
        raise DataError(f'{where}: expected {{"positive": str, "negative": str}}')
    if not all(isinstance(row[k], str) and row[k] for k in ("positive", "negative")):
        raise DataError(f"{where}: positive and negative must be non-empty strings")
    return Pair(row["positive"], row["negative"])


def template_pairs(spec: dict[str, Any], where: str = "template") -> list[Pair]:
    """repeng's dataset form: for each suffix, for each (positive, negative) persona pair in order."""
    template, positive, negative = spec.get("template"), spec.get("positive"), spec.get("negative")
    suffixes = spec.get("suffixes", [""])
    if not isinstance(template, str) or "{persona}" not in template:
        raise DataError(f"{where}: 'template' must be a string containing {{persona}}")
    for key, value in (("positive", positive), ("negative", negative), ("suffixes", suffixes)):
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise DataError(f"{where}: {key!r} must be a non-empty list of strings")
    if len(positive) != len(negative):
        raise DataError(f"{where}: 'positive' and 'negative' must list as many personas")
    unknown = sorted(set(spec) - {"template", "positive", "negative", "suffixes"})
    if unknown:
        raise DataError(f"{where}: unknown key {unknown[0]!r}")
    return [Pair(template.replace("{persona}", p) + suffix, template.replace("{persona}", n) + suffix)
            for suffix in suffixes for p, n in zip(positive, negative, strict=True)]


def parse_layers(text: str | None, num_layers: int, allow_zero: bool) -> list[int]:
    """Layers from "all", "8-20", "8,9,10" or a mix ("4,8-12"); default and "all": every layer the output can
    hold (1..n-1 for GGUF, which cannot hold layer 0; 0..n-1 otherwise)."""
    first = 0 if allow_zero else 1
    if text is None or text.strip() == "all":
        return list(range(first, num_layers))
    layers: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            layers.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise DataError(f"--layers {text!r}: use 'all', a range like 8-20, or a list like 8,9,10") from None
    bad = sorted(layer for layer in layers if not first <= layer < num_layers)
    if bad:
        zero = " (layer 0 cannot be written to GGUF: llama.cpp refuses direction.0)" if bad[0] == 0 and first else ""
        raise DataError(f"--layers: layer {bad[0]} is outside {first}..{num_layers - 1}{zero}")
    if not layers:
        raise DataError("--layers names no layer")
    return sorted(layers)


def decoder_layers(model) -> Sequence[Any]:
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return inner.layers
    if hasattr(model, "transformer") and hasattr(model.transformer, "h"):
        return model.transformer.h
    raise DataError(f"cannot find the decoder layers of {type(model).__name__}")


def last_token_states(model, tokenizer, texts: Sequence[str], layers: Sequence[int], batch_size: int = 16,
                      progress: bool = False) -> dict[int, np.ndarray]:
    """{layer: (len(texts), hidden) float32}: the residual stream at the output of each decoder layer, at each
    text's last token (right-padded batches, so positions are those of the text alone)."""
    import torch
    from tqdm import tqdm

    modules = decoder_layers(model)
    captured: dict[int, Any] = {}

    def capture(layer: int):
        def hook(_module, _args, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [modules[layer].register_forward_hook(capture(layer)) for layer in layers]
    states: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
        with torch.inference_mode():
            for batch in tqdm(batches, desc="reading hidden states", unit="batch", disable=not progress,
                              file=sys.stderr):
                encoded = tokenizer(list(batch), return_tensors="pt", padding=True)
                model(**encoded)
                last = encoded["attention_mask"].sum(dim=1) - 1
                rows = torch.arange(len(batch))
                for layer in layers:
                    states[layer].append(captured[layer][rows, last].float().cpu().numpy())
    finally:
        tokenizer.padding_side = old_side
        for handle in handles:
            handle.remove()
    return {layer: np.concatenate(parts).astype(np.float32) for layer, parts in states.items()}


def mean_difference(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """CAA: the mean of the paired differences (n, hidden) -> (hidden,)."""
    return (positive.astype(np.float64) - negative.astype(np.float64)).mean(axis=0).astype(np.float32)


def pca_direction(positive: np.ndarray, negative: np.ndarray, centre: bool = False) -> np.ndarray:
    """The unit first principal direction of the paired differences (centred first if `centre`: repeng's
    pca_diff), signed so that more pairs project positive-above-negative than the other way round (ties keep the
    SVD's sign)."""
    diffs = positive.astype(np.float64) - negative.astype(np.float64)
    if centre:
        diffs = diffs - diffs.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(diffs, full_matrices=False)
    direction = vt[0] / np.linalg.norm(vt[0])
    above = float(np.mean(positive @ direction > negative @ direction))
    below = float(np.mean(positive @ direction < negative @ direction))
    return (-direction if below > above else direction).astype(np.float32)


def train_vector(model_path: str | Path, pairs: Sequence[Pair], method: str, layers: Sequence[int] | str | None,
                 *, allow_layer_zero: bool = False, seed: int = 0, batch_size: int = 16,
                 progress: bool = False) -> TrainResult:
    """Train one vector on `pairs` (see the module docstring); the report says how well each layer's direction
    separates the pairs it was trained on."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if method not in METHODS:
        raise DataError(f"--method must be one of {', '.join(METHODS)}")
    started = time.monotonic()
    torch.manual_seed(seed)
    np.random.seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    num_layers = len(decoder_layers(model))
    if layers is None or isinstance(layers, str):
        layers = parse_layers(layers, num_layers, allow_layer_zero)
    texts = [text for pair in pairs for text in (pair.positive, pair.negative)]
    states = last_token_states(model, tokenizer, texts, layers, batch_size, progress)
    directions, per_layer = {}, {}
    for layer in layers:
        positive, negative = states[layer][0::2], states[layer][1::2]
        direction = mean_difference(positive, negative) if method == "mean" else \
            pca_direction(positive, negative, centre=method == "pca-centred")
        directions[layer] = direction
        unit = direction / max(float(np.linalg.norm(direction)), 1e-30)
        gaps = positive @ unit - negative @ unit
        per_layer[str(layer)] = {"norm": float(np.linalg.norm(direction)),
                                 "separation": float(np.mean(gaps > 0)), "mean_gap": float(np.mean(gaps)),
                                 "state_norm": float(np.linalg.norm(states[layer], axis=1).mean())}
    vector = ControlVector.of(directions, getattr(model.config, "model_type", "") or "")
    report = {"model": str(model_path), "model_type": vector.model_hint, "method": method, "layers": list(layers),
              "pairs": len(pairs), "seed": seed, "hidden_size": vector.hidden_size, "num_layers": num_layers,
              "digest": vector.digest(), "seconds": round(time.monotonic() - started, 2), "per_layer": per_layer}
    return TrainResult(vector, report)
