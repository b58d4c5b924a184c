"""Single-adapter LoRA overhead in the engine, without HTTP: offline vLLM on SmolLM2 fp32 with LoRA enabled, one batch
of greedy requests decoded with no adapter, with one adapter on our ops (server/engine/lora_ops_patch.py), and with one adapter on
vLLM-CPU's stock torch ops; phases in ABBA-style rotation, best of --repeats each, so that other work on a shared
machine slows all of them alike.

    python -m benchmarks.lora_overhead --repeats 3
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from .adapters import write_adapters  # noqa: E402
from .common import MODEL_DIR, PROMPTS, RESULTS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--model", default=str(MODEL_DIR))
    a = p.parse_args(argv)

    from pathlib import Path

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from steerserve.server.engine import lora_ops_patch

    adapter = write_adapters(Path(a.model), Path("/tmp/steerserve-bench-adapters/adapter-files"), 1, a.rank)[0]
    llm = LLM(model=a.model, dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=a.batch,
              kv_cache_memory_bytes=2**30, enable_lora=True, max_loras=2, max_lora_rank=a.rank, seed=0,
              enable_prefix_caching=False)
    prompts = PROMPTS[: a.batch]
    params = SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True)
    lora = LoRARequest("a0", 1, str(adapter))

    def run(phase: str) -> float:
        (lora_ops_patch.remove if phase == "adapter, vLLM stock ops" else lora_ops_patch.apply)()
        start = time.perf_counter()
        llm.generate(prompts, params, lora_request=None if phase == "base" else lora, use_tqdm=False)
        return a.batch * a.tokens / (time.perf_counter() - start)

    phases = ["base", "adapter, our ops", "adapter, vLLM stock ops"]
    run("adapter, our ops")  # warm-up, and the adapter's load
    results: dict[str, list[float]] = {ph: [] for ph in phases}
    for r in range(a.repeats):
        for ph in phases if r % 2 == 0 else phases[::-1]:
            results[ph].append(run(ph))
            print(f"{ph:<26} {results[ph][-1]:7.1f} tok/s  (load {os.getloadavg()[0]:.1f})", flush=True)
    lora_ops_patch.apply()
    best = {ph: max(v) for ph, v in results.items()}
    out = {"conditions": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          "command": " ".join(["python -m benchmarks.lora_overhead", *sys.argv[1:]]),
                          "model": a.model, "dtype": "float32", "batch": a.batch, "tokens": a.tokens,
                          "rank": a.rank, "targets": "q,k,v,o,gate,up,down", "repeats": a.repeats,
                          "cpu_cores": os.cpu_count(), "loadavg_1m_end": os.getloadavg()[0]},
           "tok_s": results, "best_tok_s": best,
           "ratio_over_base": {ph: best[ph] / best["base"] for ph in phases}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lora_overhead.json").write_text(json.dumps(out, indent=1))
    for ph in phases:
        print(f"{ph:<26} best {best[ph]:7.1f} tok/s  {best[ph] / best['base']:.2f}x base")
    return 0


if __name__ == "__main__":
    sys.exit(main())
