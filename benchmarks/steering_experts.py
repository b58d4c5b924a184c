"""Engine throughput with 0 % vs 100 % of rows carrying expert masks (K = 1 and K = 32 distinct configs), one run.

    python -m benchmarks.steering_experts [--model random|demo] [--batch 32] [--tokens 64] [--repeats 3]

Offline vLLM (in-process, like the server's engine), fp32, greedy, `ignore_eos` so every row decodes exactly
`--tokens` tokens, on a small random Mixtral (`random`: 8 decoder layers, hidden 384, 8 experts, top-2; built by
tests/tiny_models.py in seconds) or on the SmolLM2 demo MoE (`demo`: 30 layers, hidden 576, 4 experts, top-2;
`steerserve models build smollm2-moe`). Steered rows switch off two experts in every MoE layer (substitute) and
force one other on (natural), drawn per layer from a seed (config k: seed k), compiled by the server's code.
Workloads run interleaved, repeated, best kept. Writes JSON and a PNG under benchmarks/results/
(steering_experts.* for the random model, steering_experts_demo.* for the demo).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

RESULTS = Path(__file__).parent / "results"
MODEL = dict(hidden_size=384, num_hidden_layers=8, intermediate_size=768, num_attention_heads=6,
             num_key_value_heads=2, head_dim=64)
PROMPTS = ["The licence grants you", "You may convey a work", "THERE IS NO WARRANTY", "Preamble: the licenses",
           "This program is free software", "Each contributor grants you"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["random", "demo"], default="random")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from vllm import SamplingParams

    from steerserve.server.engine.builder import llm_facts, open_steering_llm
    from steerserve.server.models.demo_moe import build as build_demo_moe
    from steerserve.steering import spec as S
    from tests.tiny_models import build_tiny_moe

    if args.model == "demo":
        path, label = build_demo_moe(), "SmolLM2 demo MoE (Mixtral, 30 layers, 4 experts top-2)"
    else:
        path = build_tiny_moe(Path(tempfile.gettempdir()) / "steerserve-bench-mixtral", "mixtral", **MODEL)
        label = f"random Mixtral {MODEL}, 8 experts top-2"
    llm = open_steering_llm(path, dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=args.batch,
                            kv_cache_memory_bytes=256 << 20, seed=0)
    facts = llm_facts(llm, path)

    def plan(k: int):
        rng, spec = random.Random(k), {"off": [], "on": []}
        for la in facts.moe_layers:
            off_a, off_b, on = rng.sample(range(facts.num_experts), 3)
            spec["off"] += [f"{la}.{off_a}", f"{la}.{off_b}"]
            spec["on"].append(f"{la}.{on}")
        return S.compile_spec(S.merge([S.parse({"experts": spec}, "bench")]), facts).to_extra_args()

    configs = {"unsteered": [None], "K=1": [plan(0)], "K=32": [plan(k) for k in range(32)]}
    assert len({json.dumps(c, sort_keys=True, default=str) for c in configs["K=32"]}) == 32

    def run(name: str) -> float:
        extra = configs[name]
        params = [SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True,
                                 extra_args=extra[i % len(extra)]) for i in range(args.batch)]
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert sum(len(o.outputs[0].token_ids) for o in outs) == args.batch * args.tokens
        return args.batch * args.tokens / elapsed

    run("K=32")  # warm-up
    best = {name: 0.0 for name in configs}
    for rep in range(args.repeats):
        order = list(configs) if rep % 2 == 0 else list(reversed(configs))  # ABBA-style alternation
        for name in order:
            best[name] = max(best[name], run(name))
            print(f"repeat {rep}: {name:10s} {best[name]:8.1f} tok/s (best so far)", flush=True)
    rows = [{"workload": n, "tok_s": best[n], "ratio": best[n] / best["unsteered"]} for n in configs]
    for r in rows:
        print(f"{r['workload']:10s} {r['tok_s']:8.1f} tok/s  ratio {r['ratio']:.3f}")

    RESULTS.mkdir(exist_ok=True)
    load = os.getloadavg()
    report = {"conditions": {"model": label, "dtype": "float32",
                             "batch": args.batch, "tokens_per_row": args.tokens, "repeats": args.repeats,
                             "statistic": "best of repeats", "cpu_cores": os.cpu_count(),
                             "load_average_at_end": load,
                             "machine": platform.processor() or platform.machine(),
                             "engine": "vLLM offline, in-process, enforce_eager",
                             "steering": f"every steered row: 2 experts off + 1 on in each of the "
                                         f"{len(facts.moe_layers)} MoE layers; K = distinct configs over the batch"},
              "results": rows}
    stem = "steering_experts" + ("_demo" if args.model == "demo" else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2))
    plot(rows, RESULTS / f"{stem}.png", label)


def plot(rows: list[dict], out: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([r["workload"] for r in rows], [r["tok_s"] for r in rows], color=["grey", "tab:blue", "tab:orange"])
    for i, r in enumerate(rows):
        ax.text(i, r["tok_s"], f"{r['ratio']:.2f}x", ha="center", va="bottom")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"Expert steering overhead, {model.split(' (')[0].split(' {')[0]}, fp32, 2-core CPU", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
