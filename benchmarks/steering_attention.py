"""Engine throughput with attention steering (sink scaling and span steering) on every layer and head: 0 %, 50 %
and 100 % of rows steered, K = 1, 8, 32 distinct steering configs in flight, prompts of 128 and 1,024 tokens
(one run, one engine, all cases side by side).

    python -m benchmarks.steering_attention [--batch 32] [--tokens 64] [--repeats 2] [--prompt-tokens 128 1024]
        [--methods sink span] [--fractions 0.5 1.0] [--configs 1 8 32] [--name steering_attention]

Offline vLLM (in-process, like the server's engine) with steerserve's plugin on the embedded SmolLM2, fp32, greedy,
`ignore_eos`, so every row decodes exactly `--tokens` tokens; throughput is output tokens over the whole
`generate` call (prefill included). Every prompt is exactly `--prompt-tokens` tokens (filler text, then a chat
prompt). Steered rows carry `{"sink": {"gamma": g}}` with K distinct gammas spread over [0.5, 2], or
`{"spans": [{"target": {"start": 0, "end": P/2}, "alpha": a}]}` with K distinct alphas in [0.3, 0.95], on all
30 layers x 9 heads. Within a round each prompt length runs its unsteered baseline before every method's block of
cases, and rounds rotate the order, so drift on a shared machine hits steered and unsteered alike; each case keeps
its best round and is divided by the best unsteered run of its prompt length. Writes JSON and a PNG to
benchmarks/results/ (with the load average seen during the run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from .common import PROMPTS, RESULTS

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

FILLER = "The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the meadow. "


def steering(method: str, k: int, prompt_tokens: int) -> dict:
    """The k-th (of 32) distinct attention spec of `method`."""
    if method == "sink":
        return {"sink": {"gamma": 0.5 * 4 ** (k / 31)}}  # 32 distinct values in [0.5, 2]
    return {"spans": [{"target": {"start": 0, "end": prompt_tokens // 2}, "alpha": 0.3 + 0.65 * k / 31}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--methods", nargs="+", default=["sink", "span"], choices=["sink", "span"])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--configs", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--name", default="steering_attention", help="results file stem")
    args = ap.parse_args()

    from vllm import SamplingParams

    from steerserve.server.engine.builder import llm_facts, open_steering_llm
    from steerserve.server.models.store import fetch_smollm2
    from steerserve.steering import spec as S

    path = fetch_smollm2()
    longest = max(args.prompt_tokens) + args.tokens
    llm = open_steering_llm(path, dtype="float32", enforce_eager=True, max_model_len=max(2048, longest),
                            max_num_seqs=args.batch, kv_cache_memory_bytes=2 << 30, seed=0)
    tok = llm.get_tokenizer()
    facts = llm_facts(llm, path)
    filler = tok.encode(FILLER * (1 + max(args.prompt_tokens) // 10), add_special_tokens=False)

    def prompt_ids(i: int, n: int) -> list[int]:
        body = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                                  tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)
        return filler[: n - len(body)] + body

    prompts = {n: [prompt_ids(i, n) for i in range(args.batch)] for n in args.prompt_tokens}
    plans = {(m, n): [S.compile_spec(S.merge([S.parse({"attention": steering(m, k, n)}, "bench")]), facts)
                      for k in range(32)] for m in args.methods for n in args.prompt_tokens}

    def run(n: int, method: str | None, fraction: float, k: int) -> float:
        steered = round(fraction * args.batch) if method else 0
        config = [(i * 31 // max(k - 1, 1)) % 32 if k > 1 else 0 for i in range(args.batch)]
        params = [SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True,
                                 extra_args=plans[(method, n)][config[i]].to_extra_args() if i < steered else None)
                  for i in range(args.batch)]
        # Steered rows use a salt, as the server does, so they never reuse another config's prefix blocks; the
        # round number keeps every run from reusing an earlier run's blocks.
        inputs = [{"prompt_token_ids": ids, "cache_salt": f"r{run.count}-{i}"} for i, ids in enumerate(prompts[n])]
        run.count += 1
        start = time.perf_counter()
        outs = llm.generate(inputs, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert sum(len(o.outputs[0].token_ids) for o in outs) == args.batch * args.tokens
        return args.batch * args.tokens / elapsed

    run.count = 0
    blocks = [(n, m) for n in args.prompt_tokens for m in args.methods]  # each block: baseline, then its cases
    cases = {b: [(f, k) for f in args.fractions for k in args.configs] for b in blocks}
    run(min(args.prompt_tokens), args.methods[0], 1.0, 2)  # warm-up
    best: dict[tuple, float] = {}
    loads = []
    for r in range(args.repeats):
        order = blocks[r % len(blocks):] + blocks[: r % len(blocks)]
        for n, m in (order if r % 2 == 0 else order[::-1]):
            mine = cases[(n, m)] if r % 2 == 0 else cases[(n, m)][::-1]
            for key in [(n, None, 0.0, 0)] + [(n, m, f, k) for f, k in mine]:
                best[key] = max(best.get(key, 0.0), run(*key))
                loads.append(os.getloadavg()[0])
                print(f"round {r}: {key} {best[key]:.1f} tok/s (load {loads[-1]:.1f})", flush=True)
    rows = []
    for n in args.prompt_tokens:
        base = best[(n, None, 0.0, 0)]
        rows.append({"prompt_tokens": n, "method": "none", "steered_fraction": 0.0, "distinct_configs": 0,
                     "tok_s": base, "ratio": 1.0})
        for m in args.methods:
            for f, k in cases[(n, m)]:
                tok_s = best[(n, m, f, k)]
                rows.append({"prompt_tokens": n, "method": m, "steered_fraction": f, "distinct_configs": k,
                             "tok_s": tok_s, "ratio": tok_s / base})
    for row in rows:
        print(f"P={row['prompt_tokens']:5d} {row['method']:5s} {row['steered_fraction']:4.0%} steered, "
              f"K={row['distinct_configs']:2d}: {row['tok_s']:8.1f} tok/s  ratio {row['ratio']:.3f}")
    RESULTS.mkdir(exist_ok=True)
    report = {"conditions": {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "batch": args.batch,
                             "tokens_per_row": args.tokens, "prompt_tokens": args.prompt_tokens,
                             "repeats": args.repeats, "statistic": "best of rotated rounds",
                             "load_average": {"min": min(loads), "mean": sum(loads) / len(loads), "max": max(loads)},
                             "cpu_cores": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                             "engine": "vLLM-CPU offline, in-process, steerserve plugin",
                             "steering": "attention.sink gamma in [0.5, 2] / attention.spans alpha in [0.3, 0.95] "
                                         "on all 30 layers x 9 heads"},
              "results": rows}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    plot(rows, RESULTS / f"{args.name}.png")


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["prompt_tokens"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6.5 * len(lengths), 4.2), squeeze=False)
    for ax, n in zip(axes[0], lengths, strict=True):
        mine = [r for r in rows if r["prompt_tokens"] == n]
        labels = ["none" if r["method"] == "none" else
                  f"{r['method']}\n{r['steered_fraction']:.0%} K={r['distinct_configs']}" for r in mine]
        colors = ["#888" if r["method"] == "none" else "#3a7" if r["method"] == "sink" else "#37a" for r in mine]
        bars = ax.bar(range(len(mine)), [r["ratio"] for r in mine], color=colors)
        ax.set_xticks(range(len(mine)), labels, fontsize=7)
        for bar, r in zip(bars, mine, strict=True):
            ax.annotate(f"{r['ratio']:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7)
        ax.axhline(0.90, color="#3a7", ls="--", lw=0.8)
        ax.axhline(0.85, color="#37a", ls=":", lw=0.8)
        ax.set_ylabel("throughput / unsteered")
        ax.set_title(f"{n}-token prompts (unsteered {mine[0]['tok_s']:.0f} tok/s)")
    fig.suptitle("Attention steering, SmolLM2 fp32, vLLM-CPU: throughput relative to unsteered")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
