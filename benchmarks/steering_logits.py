"""Engine throughput with 0 % vs 100 % of rows carrying logits rules, at several batch sizes (one run).

    python -m benchmarks.steering_logits [--batch-sizes 1 8 32] [--tokens 64] [--repeats 3]

Offline vLLM (in-process, like the server's engine) on the embedded SmolLM2, fp32, greedy, `ignore_eos` so
every row decodes exactly `--tokens` tokens. Steered rows carry the `hewitt2024` preset (bias on 15 tokens,
EOS ramp, diversity penalty), compiled by the same code the server uses. Writes JSON and a PNG.
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
PROMPTS = ["Explain how rainbows form.", "Write a short poem about the sea.", "What is a prime number?",
           "Give three tips for learning to cook.", "Describe the water cycle.", "Why is the sky blue?",
           "Summarise the plot of a fairy tale.", "How do bees make honey?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    from steerserve.server.engine.builder import llm_facts
    from steerserve.server.engine.processor import SteeringLogitsProcessor
    from steerserve.server.models.store import fetch_smollm2
    from steerserve.steering import spec as S

    path = fetch_smollm2()
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=max(args.batch_sizes),
              kv_cache_memory_bytes=1 << 30, logits_processors=[SteeringLogitsProcessor], seed=0)
    tok = llm.get_tokenizer()
    facts = llm_facts(llm, path)
    plan = S.compile_spec(S.merge([S.parse({"logits": {"rules": {"preset": "hewitt2024"}}}, "bench")]), facts)

    def run(batch: int, steered: bool) -> float:
        prompts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False,
                                           add_generation_prompt=True) for i in range(batch)]
        sp = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True,
                            extra_args=plan.to_extra_args() if steered else None)
        start = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert sum(len(o.outputs[0].token_ids) for o in outs) == batch * args.tokens
        return batch * args.tokens / elapsed

    run(2, True)  # warm-up
    rows = []
    for batch in args.batch_sizes:
        # interleave plain and steered runs so drift on a shared machine hits both alike; keep the best of each
        pairs = [_pair(run, batch, k) for k in range(args.repeats)]
        plain, steered = max(p for p, _ in pairs), max(s for _, s in pairs)
        rows.append({"batch": batch, "plain_tok_s": plain, "steered_tok_s": steered, "ratio": steered / plain})
        print(f"batch {batch:3d}: plain {plain:8.1f} tok/s   100% rules {steered:8.1f} tok/s   "
              f"ratio {steered / plain:.3f}", flush=True)

    RESULTS.mkdir(exist_ok=True)
    report = {"conditions": {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "tokens_per_row": args.tokens,
                             "repeats": args.repeats, "statistic": "best of repeats", "cpu_cores": os.cpu_count(),
                             "machine": platform.processor() or platform.machine(), "engine": "vLLM offline, in-process",
                             "steering": "logits.rules preset hewitt2024 on every steered row"},
              "results": rows}
    (RESULTS / "steering_logits.json").write_text(json.dumps(report, indent=2))
    plot(rows, RESULTS / "steering_logits.png")
    print("ratios (100% steered / unsteered): " + ", ".join(f"B={r['batch']}: {r['ratio']:.3f}" for r in rows))


def _pair(run, batch: int, k: int) -> tuple[float, float]:
    """(plain, steered) throughput; the order alternates (ABBA) so neither always runs second."""
    if k % 2:
        steered = run(batch, True)
        return run(batch, False), steered
    return run(batch, False), run(batch, True)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    b = [r["batch"] for r in rows]
    ax.plot(b, [r["plain_tok_s"] for r in rows], "o-", label="0% steered")
    ax.plot(b, [r["steered_tok_s"] for r in rows], "s-", label="100% logits rules")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (rows)")
    ax.set_ylabel("output tokens / s")
    ax.set_title("Logits rules overhead, SmolLM2 fp32, 2-core CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
