"""Engine throughput with 0 % vs 100 % of rows carrying control vectors (K = 1, 8, 32 distinct vectors, each on
all 30 decoder layers of SmolLM2), one run, side by side.

    python -m benchmarks.steering_vectors [--batch 32] [--tokens 64] [--repeats 3] [--compiled]
    python -m benchmarks.steering_vectors --hook-only     # the hook's own per-step CPU time, no engine

Offline vLLM (in-process, like the server's engine) on the embedded SmolLM2, fp32, greedy, `ignore_eos` so every
row decodes exactly `--tokens` tokens, the chat prompts of benchmarks/steering_logits.py. Steered rows add a
random unit direction times 4 at every layer (vector k: seed k), as store vectors resolved into the spec and
compiled by the server's code; with K vectors, row i carries vector i mod K. Workloads run interleaved (ABBA),
repeated, best kept. Two throughputs per run: wall-clock, and per second of this process's CPU time (the engine
runs in-process on one thread, so CPU time is the work done, whatever else loads the machine; the ratios are
taken on it). `--compiled` builds the engine without `enforce_eager`. Writes
benchmarks/results/steering_vectors.json and .png (steering_vectors_compiled.* with `--compiled`).
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
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; without it vLLM-CPU wants most of the memory

RESULTS = Path(__file__).parent / "results"
PROMPTS = ["Explain how rainbows form.", "Write a short poem about the sea.", "What is a prime number?",
           "Give three tips for learning to cook.", "Describe the water cycle.", "Why is the sky blue?",
           "Summarise the plot of a fairy tale.", "How do bees make honey?"]
KS = (1, 8, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compiled", action="store_true", help="torch.compile (no enforce_eager)")
    ap.add_argument("--hook-only", action="store_true", help="time the layer hook's work alone and exit")
    args = ap.parse_args()
    if args.hook_only:
        print(f"hook work per decode step ({args.batch} tokens, 30 layers, hidden 576, one thread): "
              f"{hook_cost(args.batch) * 1e3:.3f} ms CPU")
        return

    import numpy as np
    from vllm import SamplingParams

    from steerserve.server.engine import vectors_hook
    from steerserve.server.engine.builder import llm_facts, open_steering_llm
    from steerserve.server.models.store import fetch_smollm2
    from steerserve.steering import spec as S
    from steerserve.steering.control_vectors import ControlVector
    from steerserve.steering.vectors import VectorItem, resolved

    path = fetch_smollm2()
    llm = open_steering_llm(path, dtype="float32", enforce_eager=not args.compiled, max_model_len=1024,
                            max_num_seqs=args.batch, num_gpu_blocks_override=96, seed=0)  # 96 x 128 tokens
    tok = llm.get_tokenizer()
    facts = llm_facts(llm, path)
    hidden, layers = facts.extra["vectors"]["hidden_size"], facts.num_layers

    def plan(k: int):
        rng = np.random.default_rng(k)
        vector = ControlVector.of({layer: rng.standard_normal(hidden) for layer in range(layers)})
        item = resolved(VectorItem(name=f"bench-{k}", scale=4.0, normalize=True), vector)
        spec = S.merge([S.parse({"vectors": [{"name": f"bench-{k}"}]}, "bench")]).model_copy(
            update={"vectors": [item]})
        return S.compile_spec(spec, facts).to_extra_args()

    configs = {"unsteered": [None], **{f"K={k}": [plan(i) for i in range(k)] for k in KS}}
    prompts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False,
                                       add_generation_prompt=True) for i in range(args.batch)]

    def run(name: str) -> tuple[float, float]:
        """(output tokens per wall-clock second, per CPU second of this process)."""
        extra = configs[name]
        params = [SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True,
                                 extra_args=extra[i % len(extra)]) for i in range(args.batch)]
        start, cpu = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert sum(len(o.outputs[0].token_ids) for o in outs) == args.batch * args.tokens
        return args.batch * args.tokens / elapsed, args.batch * args.tokens / cpu

    calls = vectors_hook.LAYER_CALLS[0]
    run(f"K={KS[-1]}")  # warm-up
    steered = vectors_hook.LAYER_CALLS[0] > calls
    best = {name: 0.0 for name in configs}
    best_cpu = {name: 0.0 for name in configs}
    for rep in range(args.repeats):
        order = list(configs) if rep % 2 == 0 else list(reversed(configs))  # ABBA-style alternation
        for name in order:
            wall, cpu = run(name)
            best[name], best_cpu[name] = max(best[name], wall), max(best_cpu[name], cpu)
            print(f"repeat {rep}: {name:10s} {wall:8.1f} tok/s wall, {cpu:8.1f} tok/cpu-s", flush=True)
    rows = [{"workload": n, "tok_s": best[n], "tok_per_cpu_s": best_cpu[n],
             "ratio": best_cpu[n] / best_cpu["unsteered"], "ratio_wall": best[n] / best["unsteered"]}
            for n in configs]
    for r in rows:
        print(f"{r['workload']:10s} {r['tok_s']:8.1f} tok/s wall  {r['tok_per_cpu_s']:8.1f} tok/cpu-s  "
              f"ratio {r['ratio']:.3f} (wall {r['ratio_wall']:.3f})")
    print(f"the vector hooks ran in the engine: {steered}")

    RESULTS.mkdir(exist_ok=True)
    mode = "torch.compile (no enforce_eager)" if args.compiled else "enforce_eager"
    report = {"conditions": {"model": "SmolLM2-135M-Instruct (30 layers, hidden 576)", "dtype": "float32",
                             "batch": args.batch, "tokens_per_row": args.tokens, "repeats": args.repeats,
                             "statistic": "best of repeats; ratio on CPU-time throughput",
                             "cpu_cores": os.cpu_count(),
                             "load_average_at_end": os.getloadavg(),
                             "machine": platform.processor() or platform.machine(),
                             "engine": f"vLLM offline, in-process, {mode}",
                             "vector_hooks_ran": steered,
                             "steering": "every steered row: one vector added (unit direction x 4) at all 30 layers "
                                         "to every token; K = distinct vectors over the batch"},
              "results": rows}
    stem = "steering_vectors" + ("_compiled" if args.compiled else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2))
    plot(rows, RESULTS / f"{stem}.png", mode)


def hook_cost(tokens: int, layers: int = 30, hidden: int = 576, steps: int = 2000) -> float:
    """CPU seconds of `vectors_hook.steer` (a gather and an add from a 33-slot table) over all layers, per step."""
    import torch

    from steerserve.server.engine.vectors_hook import steer

    torch.set_num_threads(1)
    table = torch.randn(layers, 33, hidden)
    index = torch.randint(1, 33, (tokens,))
    output = (torch.randn(tokens, hidden), torch.randn(tokens, hidden))
    for _ in range(100):
        for layer in range(layers):
            steer(output, index, [(None, table[layer])])
    start = time.process_time()
    for _ in range(steps):
        for layer in range(layers):
            steer(output, index, [(None, table[layer])])
    return (time.process_time() - start) / steps


def plot(rows: list[dict], out: Path, mode: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.bar([r["workload"] for r in rows], [r["tok_per_cpu_s"] for r in rows],
           color=["grey", "tab:blue", "tab:green", "tab:orange"][: len(rows)])
    for i, r in enumerate(rows):
        ax.text(i, r["tok_per_cpu_s"], f"{r['ratio']:.2f}x", ha="center", va="bottom")
    ax.set_ylabel("output tokens / CPU second")
    ax.set_title(f"Control vectors on all 30 layers, SmolLM2 fp32, {mode}, 2-core CPU", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
