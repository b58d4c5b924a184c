"""Steered vs unsteered engine throughput under tensor parallelism (default TP=2: two CPU ranks, one core each).

    python -m benchmarks.steering_tp [--tp 2] [--batch 16] [--tokens 32] [--repeats 3]

Offline vLLM with the steering hooks (server/engine/builder.py) on a random fp32 Llama that divides over the ranks
(8 query heads over 4 KV heads of 64, hidden 512, 4 layers, built by tests/tiny_models.py into the model cache),
greedy, `ignore_eos`, so every row decodes exactly `--tokens` tokens. Workloads, each with every row steered: a
sink gain on every head (attention recomputation on each rank for its heads), a control vector on every layer
(the replicated residual stream), a logits bias; and none. Interleaved, repeated, best kept; wall-clock tokens/s
(the ranks run in their own processes, so this process's CPU time does not measure the work). Small and noisy on a
shared machine: the ratios are what counts. Writes benchmarks/results/steering_tp<N>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

RESULTS = Path(__file__).parent / "results"
MODEL = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64)
PROMPT = ("You may convey a work based on the Program, or the modifications to produce it, in the form of source "
          "code under the terms of section 4, provided that you also meet all of these conditions: ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import numpy as np
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from steerserve.server.engine.builder import steering_llm
    from steerserve.steering import spec as S
    from steerserve.steering.model import ModelFacts
    from steerserve.steering.plan import LogitsPlan, Plan
    from tests.tiny_models import build_tiny_llama

    path = build_tiny_llama(Path.home() / ".cache" / "steerserve" / "bench" / "tp-llama", seed=0, **MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    facts = ModelFacts(tok, 2048, (1,), num_layers=MODEL["num_hidden_layers"],
                       num_heads=MODEL["num_attention_heads"], num_kv_heads=MODEL["num_key_value_heads"],
                       extra={"vectors": {"hidden_size": MODEL["hidden_size"]}})
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(MODEL["hidden_size"])
    direction = (4 * direction / np.linalg.norm(direction)).tolist()
    specs = {"attention sink": {"attention": {"sink": {"gamma": 0.5}}},
             "control vector": {"vectors": [{"data": {str(la): direction
                                                       for la in range(MODEL["num_hidden_layers"])}}]}}
    plans: dict[str, Plan | None] = {"unsteered": None}
    plans.update({name: S.compile_spec(S.merge([S.parse(spec, "steering")]), facts) for name, spec in specs.items()})
    plans["logits bias"] = Plan("bench", LogitsPlan(bias_ids=(5, 300), bias_values=(2.0, -2.0)))
    ids = tok(PROMPT).input_ids

    with steering_llm(path, dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=args.batch,
                      kv_cache_memory_bytes=256 * 2**20, tensor_parallel_size=args.tp, seed=0) as llm:
        def run(name: str) -> float:
            plan = plans[name]
            params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True,
                                    extra_args=plan.to_extra_args() if plan else None)
            # a fresh salt per run: every run prefills, as the first request of a prompt would
            prompts = [{"prompt_token_ids": ids, "cache_salt": f"{name}-{time.monotonic_ns()}-{i}"}
                       for i in range(args.batch)]
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            return args.batch * args.tokens / (time.perf_counter() - start)

        run("unsteered")  # warm-up
        best = dict.fromkeys(plans, 0.0)
        for repeat in range(args.repeats):
            for name in (list(plans) if repeat % 2 == 0 else list(reversed(plans))):
                best[name] = max(best[name], run(name))
    rows = [{"workload": n, "tok_s": round(best[n], 1), "ratio": round(best[n] / best["unsteered"], 3)}
            for n in plans]
    for r in rows:
        print(f"TP={args.tp} {r['workload']:15s} {r['tok_s']:8.1f} tok/s  ratio {r['ratio']:.3f}")
    RESULTS.mkdir(exist_ok=True)
    report = {"tp": args.tp, "batch": args.batch, "tokens": args.tokens, "repeats": args.repeats, "model": MODEL,
              "cpus": len(os.sched_getaffinity(0)), "machine": platform.machine(), "rows": rows}
    (RESULTS / f"steering_tp{args.tp}.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
