"""Perplexity of SmolLM2 by context length under each attention mode (softmax, reweight, lssa, lssar at two
powers), applied per request to every layer through steerserve's engine path. An evaluation, not a test.

    python -m benchmarks.attention_modes_ppl [--lengths 512 1024 2048 4096] [--powers 3 15]

The text is the GNU GPL v3, the GFDL 1.3 and the Apache 2.0 licence as the operating system ships them
(/usr/share/common-licenses), read at run time: long, plain English prose that every Debian machine has offline.
For each length L the first L tokens are scored with vLLM's prompt logprobs (fp32, in-process, our plugin), and
we report the mean negative log-likelihood over all L positions and over the last quarter (the positions that
see the longest context). SmolLM2 was trained with softmax attention: the other modes are bolted on, which
the paper's own ablation predicts will hurt (docs/methods/attention-modes.md). Writes JSON and a PNG to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

RESULTS = Path(__file__).parent / "results"
TEXTS = [Path("/usr/share/common-licenses") / name for name in ("GPL-3", "GFDL-1.3", "Apache-2.0")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--powers", type=float, nargs="+", default=[3.0, 15.0])
    args = ap.parse_args()

    from vllm import SamplingParams

    from steerserve.server.engine.builder import llm_facts, open_steering_llm
    from steerserve.server.models.store import fetch_smollm2
    from steerserve.steering.plan import AttentionPlan, Plan

    path = fetch_smollm2()
    longest = max(args.lengths)
    # The prompt plus one generated token must fit the model's window (8192 for SmolLM2): an L = 8192 run scores
    # the first 8191 tokens.
    max_len = min(longest + 1, 8192)
    llm = open_steering_llm(path, dtype="float32", enforce_eager=True, max_model_len=max_len, max_num_seqs=1,
                            kv_cache_memory_bytes=1 << 30, seed=0, enable_prefix_caching=False)
    tok = llm.get_tokenizer()
    layers = llm_facts(llm, path).num_layers
    text = "\n\n".join(p.read_text() for p in TEXTS if p.is_file())
    ids = tok.encode(text, add_special_tokens=False)
    if len(ids) < longest:
        raise SystemExit(f"only {len(ids)} tokens of text; lower --lengths")
    modes = [("softmax", None), *[("reweight", p) for p in args.powers], ("lssa", None),
             *[("lssar", p) for p in args.powers]]

    def nll(mode: str, power: float | None, length: int) -> tuple[float, float]:
        length = min(length, max_len - 1)
        plan = None if mode == "softmax" else Plan(f"{mode}{power}", attention=AttentionPlan(
            mode=mode, power=power or 15.0, mode_layers=tuple(range(layers))))
        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, extra_args=plan.to_extra_args() if plan else None)
        out = llm.generate([{"prompt_token_ids": ids[:length]}], sp, use_tqdm=False)[0]
        lps = [-entry[t].logprob for t, entry in zip(ids[1:length], out.prompt_logprobs[1:], strict=True)]
        return sum(lps) / len(lps), sum(lps[-length // 4:]) / (length // 4)

    rows = []
    for mode, power in modes:
        for length in args.lengths:
            start = time.perf_counter()
            mean, tail = nll(mode, power, length)
            rows.append({"mode": mode, "power": power, "length": length, "nll": mean, "nll_last_quarter": tail,
                         "ppl": math.exp(mean), "seconds": time.perf_counter() - start})
            print(f"{mode:8s} p={power or '-':>4}  L={length:5d}  nll {mean:.3f}  last quarter {tail:.3f}  "
                  f"ppl {math.exp(mean):9.2f}  ({rows[-1]['seconds']:.0f} s)", flush=True)
    RESULTS.mkdir(exist_ok=True)
    report = {"conditions": {"model": "SmolLM2-135M-Instruct (trained with softmax)", "dtype": "float32",
                             "text": [str(p) for p in TEXTS], "text_tokens": len(ids), "layers": "all",
                             "engine": "vLLM-CPU offline + steerserve attention modes (CPU path)",
                             "machine": platform.processor() or platform.machine(), "cpu_cores": os.cpu_count()},
              "results": rows}
    (RESULTS / "attention_modes_ppl.json").write_text(json.dumps(report, indent=2))
    plot(rows, RESULTS / "attention_modes_ppl.png")


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key in dict.fromkeys((r["mode"], r["power"]) for r in rows):
        mine = [r for r in rows if (r["mode"], r["power"]) == key]
        label = key[0] + (f" p={key[1]:g}" if key[1] else "")
        ax.plot([r["length"] for r in mine], [r["nll"] for r in mine], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("mean NLL (nats / token)")
    ax.set_title("SmolLM2-135M (softmax-trained) under attention modes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
