"""ZeroTuning on the shipped classification tasks: calibrate on the calibration half (supervised and unsupervised),
then report held-out accuracy with and without the calibrated profile, per task.

    python -m benchmarks.zerotuning_eval [--model smollm2] [--tasks FILE] [--out benchmarks/results/zerotuning.json]

One in-process vLLM engine (fp32, our steering plugin) serves every config; the two modes share the head-profiling
runs (the same forward passes, scored by two criteria). Writes the full calibration reports and the held-out
numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from tqdm import tqdm

from steerserve.server.models.store import resolve_model
from steerserve.server.tools.calibration_engine import open_engine
from steerserve.steering import calibrate as C
from steerserve.steering import spec as S
from steerserve.steering.tasks import SHIPPED, load_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tasks", type=Path, default=SHIPPED)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/zerotuning.json"))
    args = parser.parse_args()

    t0 = time.monotonic()
    model_path = resolve_model(args.model)
    llm, facts = open_engine(str(model_path))
    startup = time.monotonic() - t0
    scorer = C.Scorer(llm, facts)
    tasks = load_tasks(args.tasks)
    results = []
    for task in tasks.values():
        for mode in C.MODES:
            t1 = time.monotonic()
            with tqdm(desc=f"{task.name} {mode}", unit="config") as bar:
                cal = C.calibrate(scorer, task, mode, progress=lambda _: bar.update())
            profile = cal.profile()
            S.parse(profile, "profile")
            base, steered = C.evaluate(scorer, task, None), C.evaluate(scorer, task, profile)
            row = {"task": task.name, "mode": mode, "gamma": cal.gamma, "head_type": cal.head_type,
                   "heads": cal.heads, "calibration_items": cal.baseline.n, "heldout_items": base.n,
                   "calibration_baseline": cal.baseline.__dict__, "calibration_best": cal.best.__dict__,
                   "heldout_baseline": base.__dict__, "heldout_steered": steered.__dict__,
                   "seconds": round(time.monotonic() - t1, 1), "profile": profile, "report": cal.to_json()}
            results.append(row)
            print(f"{task.name:10s} {mode:12s} gamma={cal.gamma:<5} {cal.head_type:4s} heads={cal.heads} "
                  f"held-out acc {base.accuracy:.3f} -> {steered.accuracy:.3f}  "
                  f"(entropy {base.entropy:.3f} -> {steered.entropy:.3f})  {row['seconds']} s", flush=True)
    out = {"model": str(model_path.name), "dtype": "float32", "task_file": str(args.tasks), "machine":
           f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "engine_startup_s": round(startup, 1),
           "engine_calls": scorer.calls, "engine_seconds": round(scorer.engine_seconds, 1),
           "total_s": round(time.monotonic() - t0, 1), "probes": C.PROBES, "grid_up": C.GRID_UP,
           "grid_down": C.GRID_DOWN, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} ({out['total_s']} s, {scorer.calls} engine calls)")


if __name__ == "__main__":  # vLLM's engine processes re-import the main module
    main()
