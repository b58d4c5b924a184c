"""Per-step cost of the worker's logits steering (`SteeringLogitsProcessor.update_state` + `apply`), without vLLM.

Synthetic logits [B, 49152] (SmolLM2's vocabulary) at B = 1, 8, 32, with no row, every other row, or every row
steered by the Hewitt et al. preset shape (15 token biases, EOS ramp over 250 tokens, diversity 1.5). Each step
is what the engine does: `update_state(None)`, `apply(logits)`, then one new token per row. The engine's
worker runs on one OpenMP thread on this machine, so torch does too here (--threads to change). Also reported:
the one-off cost of admitting B rows (`update_state` with B added). Per-step times are medians over the steps
(p90 too); each case runs --rounds times and keeps the fastest round, since other work on a shared machine only
ever slows a run down.
Writes benchmarks/results/logits_overhead.json and prints a table.

    python -m benchmarks.logits_overhead
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from vllm.v1.sample.logits_processor import BatchUpdate

from steerserve.server.engine.processor import SteeringLogitsProcessor
from steerserve.steering.plan import EosRamp, LogitsPlan, Plan

RESULTS = Path(__file__).parent / "results"
VOCAB = 49152
BATCHES = (1, 8, 32)


def hewitt_like_plan(rng: random.Random) -> Plan:
    ids = tuple(rng.sample(range(VOCAB), 15))
    return Plan("bench", LogitsPlan(bias_ids=ids, bias_values=tuple(rng.uniform(-6, 1) for _ in ids),
                                    eos_ramp=EosRamp((0, 2), 15.0, 250), diversity=1.5))


def run_case(batch: int, steered: str, steps: int, rng: random.Random) -> dict:
    """steered: "none", "all", or "half" (every other row, so the rows are not one slice: the gather path)."""
    config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=max(BATCHES)),
                             model_config=SimpleNamespace(get_vocab_size=lambda: VOCAB))
    proc = SteeringLogitsProcessor(config, torch.device("cpu"), False)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    is_steered = [steered == "all" or (steered == "half" and i % 2 == 1) for i in range(batch)]
    added = [(i, SimpleNamespace(extra_args=hewitt_like_plan(rng).to_extra_args() if is_steered[i] else None),
              None, outputs[i]) for i in range(batch)]
    t0 = time.perf_counter()
    proc.update_state(BatchUpdate(batch, [], added, []))
    admit_s = time.perf_counter() - t0

    logits = torch.randn(batch, VOCAB)
    tokens = [[rng.randrange(VOCAB) for _ in range(batch)] for _ in range(steps)]
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        proc.update_state(None)
        proc.apply(logits)
        times.append(time.perf_counter() - t0)
        for out, token in zip(outputs, tokens[step], strict=True):  # the engine's bookkeeping, not timed
            out.append(token)
    times.sort()
    step_s, p90_s = times[len(times) // 2], times[len(times) * 9 // 10]
    return {"batch": batch, "steered_rows": sum(is_steered), "ms_per_step": step_s * 1e3,
            "p90_ms_per_step": p90_s * 1e3, "steps_per_s": 1 / step_s, "us_per_row_step": step_s * 1e6 / batch,
            "admit_ms": admit_s * 1e3}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="steps per round (the ramp is still rising at 250)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for batch in BATCHES:
        for steered in ("none", "half", "all") if batch > 1 else ("none", "all"):
            rounds = [run_case(batch, steered, args.steps, random.Random(r)) for r in range(args.rounds)]
            rows.append(min(rounds, key=lambda r: r["ms_per_step"]))

    print(f"{'B':>3} {'steered':>8} {'ms/step':>9} {'p90 ms':>9} {'steps/s':>9} {'us/row':>8} {'admit ms':>9}")
    for r in rows:
        print(f"{r['batch']:>3} {r['steered_rows']:>8} {r['ms_per_step']:>9.4f} {r['p90_ms_per_step']:>9.4f} "
              f"{r['steps_per_s']:>9.0f} {r['us_per_row_step']:>8.1f} {r['admit_ms']:>9.3f}")
    conditions = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
        "cpu_model": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                           if ln.startswith("model name")), platform.processor()),
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": args.threads, "vocab": VOCAB, "steps": args.steps, "rounds": args.rounds,
        "statistic": "median step of the fastest round", "plan": "15 biases, EOS ramp (2 ids, max 15, window 250), diversity 1.5",
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "logits_overhead.json"
    out.write_text(json.dumps({"conditions": conditions, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
