"""ZeroTuning calibration (docs/tools.md): head profiling, head selection and gamma search on a labelled task.

Scoring: an item's answer distribution is the model's next-token distribution after the prompt, restricted to
the first tokens of the task's choices (vLLM `allowed_token_ids`, greedy, one token, fp32), renormalised over
them. So every answer is a valid label: the format-validity part of ZeroTuning's gains (docs/tools.md) is
taken out, and what remains is the ranking of the labels. All items of one steering config go to the engine
in one `generate` call, through our steering plugin, exactly as the server would run them.

Procedure (ours where the paper leaves gaps; everything on the calibration half only):
1. baseline: no steering.
2. head profiling: for each query head index h, gamma = each probe (2 and 0.5) on head h in every layer
   (the demo's `exploring_mode=1`). h is *up-effective* if the probe > 1 beats the baseline and the probe < 1,
   *down-effective* if the probe < 1 beats the baseline and the probe > 1 (by the mode's criterion).
3. selection: the type with more heads (a tie: the type whose best probe scores higher); no effective head
   at all: every head, both directions.
4. gamma search: each gamma of the grid on that side of 1 (0.25..0.8 or 1.25..4), on the selected heads in all
   layers; the best by the criterion, if it beats the baseline, else gamma = 1 (the profile steers nothing).
Criteria: supervised = accuracy, ties broken by the lower mean negative log-likelihood of the gold label;
unsupervised = the lower mean entropy of the answer distribution (labels unused).
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from . import spec as S
from .model import ModelFacts
from .tasks import Task, choice_token_ids, render

PROBES = (2.0, 0.5)
GRID_UP = (1.25, 1.5, 2.0, 3.0, 4.0)
GRID_DOWN = (0.25, 0.4, 0.6, 0.8)
MODES = ("supervised", "unsupervised")


@dataclass(frozen=True)
class Metrics:
    accuracy: float
    nll: float  # mean -log p(gold label), over the choices
    entropy: float  # mean entropy (nats) of the answer distribution over the choices
    n: int

    def key(self, mode: str) -> tuple[float, ...]:
        """Larger is better."""
        return (self.accuracy, -self.nll) if mode == "supervised" else (-self.entropy,)


def metrics(probs: Sequence[Sequence[float]], labels: Sequence[int]) -> Metrics:
    """Accuracy (argmax; ties go to the first choice), gold NLL and answer entropy of per-item distributions."""
    n = len(labels)
    acc = sum(max(range(len(p)), key=p.__getitem__) == y for p, y in zip(probs, labels, strict=True)) / n
    nll = sum(-math.log(max(p[y], 1e-300)) for p, y in zip(probs, labels, strict=True)) / n
    ent = sum(-sum(q * math.log(q) for q in p if q > 0) for p in probs) / n
    return Metrics(acc, nll, ent, n)


def sink_spec(gamma: float, heads: Sequence[int] | None = None) -> dict[str, Any] | None:
    """The steering spec of a sink config (None for gamma == 1: no steering)."""
    if gamma == 1.0:
        return None
    sink: dict[str, Any] = {"gamma": gamma}
    if heads is not None:
        sink["heads"] = sorted(heads)
    return {"attention": {"sink": sink}}


class Scorer:
    """Answer distributions of a task's items under steering configs, from `llm`: an in-process vLLM engine with
    our steering plugin, opened by the caller (the server's `calibration_engine.open_engine`). Results are cached
    per (task, split, spec)."""

    def __init__(self, llm, facts: ModelFacts):
        self.llm, self.facts = llm, facts
        self.tokenizer = facts.tokenizer
        self._cache: dict[str, list[list[float]]] = {}
        self.engine_seconds = 0.0
        self.calls = 0

    def probs(self, task: Task, split: str, spec: dict[str, Any] | None) -> list[list[float]]:
        items = task.split(split)
        if not items:
            raise ValueError(f"task {task.name!r} has no {split} items")
        prompts = [render(self.tokenizer, task, it) for it in items]
        choices = choice_token_ids(self.tokenizer, task)
        key = S.digest([prompts, choices, spec])
        if key not in self._cache:
            self._cache[key] = self._run(prompts, choices, spec)
        return self._cache[key]

    def metrics(self, task: Task, split: str, spec: dict[str, Any] | None) -> Metrics:
        labels = [task.choices.index(it.label) for it in task.split(split)]
        return metrics(self.probs(task, split, spec), labels)

    def _run(self, prompts: list[list[int]], ids: list[int], spec: dict[str, Any] | None) -> list[list[float]]:
        import vllm

        plan = S.compile_spec(S.merge([S.parse(spec, "profile")]), self.facts) if spec else None
        params = vllm.SamplingParams(temperature=0, max_tokens=1, logprobs=len(ids), allowed_token_ids=ids,
                                     extra_args=plan.to_extra_args() if plan else None)
        t0 = time.monotonic()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        self.engine_seconds += time.monotonic() - t0
        self.calls += 1
        rows = []
        for out in outs:
            lp = out.outputs[0].logprobs[0]
            missing = [i for i in ids if i not in lp]
            if missing:
                raise RuntimeError(f"the engine returned no logprob for choice token(s) {missing}")
            raw = [math.exp(lp[i].logprob) for i in ids]
            total = sum(raw)
            rows.append([r / total for r in raw])
        return rows


@dataclass
class Calibration:
    task: str
    mode: str
    gamma: float
    heads: list[int]
    head_type: str  # "up", "down" or "all" (no effective head found)
    baseline: Metrics
    best: Metrics
    probes: dict[str, dict[str, Metrics]]  # head -> probe gamma -> metrics
    grid: dict[str, Metrics]  # gamma -> metrics, on the selected heads
    effective: dict[str, list[int]] = field(default_factory=dict)  # "up"/"down" -> heads
    seconds: float = 0.0

    def profile(self) -> dict[str, Any]:
        """The steering profile (a steering spec): the chosen gamma on the chosen heads in every layer."""
        return {"attention": {"sink": {"gamma": self.gamma, "heads": self.heads}}}

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"profile": self.profile()}


def calibrate(scorer: Scorer, task: Task, mode: str, probes: Sequence[float] = PROBES,
              grid_up: Sequence[float] = GRID_UP, grid_down: Sequence[float] = GRID_DOWN,
              progress: Callable[[str], object] | None = None) -> Calibration:
    """ZeroTuning on `task`'s calibration half (see the module docstring for the procedure)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    t0 = time.monotonic()
    H = scorer.facts.num_heads
    split = "calibration"

    def run(spec: dict[str, Any] | None) -> Metrics:
        if progress:
            progress(json.dumps(spec, separators=(",", ":")) if spec else "baseline")
        return scorer.metrics(task, split, spec)

    base = run(None)
    probe_up, probe_down = max(probes), min(probes)
    if not probe_down < 1.0 < probe_up:
        raise ValueError("probes need one gamma below 1 and one above")
    table = {str(h): {str(g): run(sink_spec(g, [h])) for g in (probe_up, probe_down)} for h in range(H)}
    effective: dict[str, list[int]] = {"up": [], "down": []}
    best_probe = {"up": base.key(mode), "down": base.key(mode)}
    for h in range(H):
        up, down = table[str(h)][str(probe_up)].key(mode), table[str(h)][str(probe_down)].key(mode)
        if up > base.key(mode) and up > down:
            effective["up"].append(h)
            best_probe["up"] = max(best_probe["up"], up)
        elif down > base.key(mode) and down > up:
            effective["down"].append(h)
            best_probe["down"] = max(best_probe["down"], down)
    n_up, n_down = len(effective["up"]), len(effective["down"])
    if n_up == n_down == 0:
        head_type, heads, gammas = "all", list(range(H)), [*grid_down, *grid_up]
    elif n_up > n_down or (n_up == n_down and best_probe["up"] >= best_probe["down"]):
        head_type, heads, gammas = "up", effective["up"], list(grid_up)
    else:
        head_type, heads, gammas = "down", effective["down"], list(grid_down)
    grid = {str(g): run(sink_spec(g, heads)) for g in gammas}
    gamma, best = 1.0, base
    for g in gammas:
        if grid[str(g)].key(mode) > best.key(mode):
            gamma, best = g, grid[str(g)]
    return Calibration(task.name, mode, gamma, heads, head_type, base, best, table, grid, effective,
                       time.monotonic() - t0)


def evaluate(scorer: Scorer, task: Task, profile: dict[str, Any] | None, split: str = "heldout") -> Metrics:
    """Metrics of `task`'s `split` items under a steering profile (None: unsteered)."""
    return scorer.metrics(task, split, profile)
