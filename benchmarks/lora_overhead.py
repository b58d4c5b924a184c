"""LoRA overhead in the engine, without HTTP: offline vLLM on SmolLM2 fp32 with LoRA enabled, one batch of greedy
requests decoded with no adapter, with one adapter for every request, and with N distinct adapters (request i uses
adapter i mod N: Punica's "distinct" regime, every slot of the batch busy), on our ops
(server/engine/lora_ops_patch.py) and on vLLM-CPU's stock torch ops. Phases in ABBA-style rotation, best of
--repeats each, so that other work on a shared machine slows all of them alike; every phase reports the load
average it ran under.

    python -m benchmarks.lora_overhead --repeats 3                      # JSON in benchmarks/results/
    python -m benchmarks.lora_overhead --repeats 1 --profile            # + torch.profiler table, N distinct
    python -m benchmarks.lora_overhead --repeats 0 --profile            # the profile only

`--profile` runs one more, short (--profile-tokens) N-distinct batch under torch.profiler and writes the top operators by self CPU time
(benchmarks/results/lora_overhead_profile.txt): where a step's time goes, before and after a change of the ops.
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

STOCK = ", vLLM stock ops"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--distinct", type=int, default=8, help="N distinct adapters (at most --batch are in a batch)")
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--profile", action="store_true", help="profile one N-distinct batch (torch.profiler)")
    p.add_argument("--profile-tokens", type=int, default=6,
                   help="tokens per request of the profiled batch (the profiler keeps every event in memory)")
    a = p.parse_args(argv)

    from pathlib import Path

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from steerserve.server.engine import lora_ops_patch

    slots = min(a.distinct, a.batch)
    paths = write_adapters(Path(a.model), Path("/tmp/steerserve-bench-adapters/adapter-files"), a.distinct, a.rank)
    llm = LLM(model=a.model, dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=a.batch,
              kv_cache_memory_bytes=2**30, enable_lora=True, max_loras=max(slots, 1), max_lora_rank=a.rank,
              max_cpu_loras=max(a.distinct, 1), seed=0, enable_prefix_caching=False)
    prompts = PROMPTS[: a.batch]
    params = SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True)
    loras = [LoRARequest(f"a{i}", i + 1, str(path)) for i, path in enumerate(paths)]
    one, many = "1 adapter", f"{a.distinct} distinct adapters"
    requests = {"base": None, one: loras[0], many: [loras[i % a.distinct] for i in range(a.batch)]}

    def run(phase: str, sampling=params) -> float:
        (lora_ops_patch.remove if phase.endswith(STOCK) else lora_ops_patch.apply)()
        start = time.perf_counter()
        llm.generate(prompts, sampling, lora_request=requests[phase.removesuffix(STOCK)], use_tqdm=False)
        return a.batch * sampling.max_tokens / (time.perf_counter() - start)

    phases = ["base", one, many, one + STOCK, many + STOCK]
    for ph in (one, many):  # warm-up, and the adapters' loads
        run(ph)
    results: dict[str, list[float]] = {ph: [] for ph in phases}
    loads: dict[str, list[float]] = {ph: [] for ph in phases}
    for r in range(a.repeats):
        for ph in phases if r % 2 == 0 else phases[::-1]:
            results[ph].append(run(ph))
            loads[ph].append(os.getloadavg()[0])
            print(f"{ph:<36} {results[ph][-1]:7.1f} tok/s  (load {loads[ph][-1]:.1f})", flush=True)
    lora_ops_patch.apply()
    best = {ph: max(v) for ph, v in results.items() if v}  # --repeats 0: the profile only
    out = {"conditions": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          "command": " ".join(["python -m benchmarks.lora_overhead", *sys.argv[1:]]),
                          "model": a.model, "dtype": "float32", "batch": a.batch, "tokens": a.tokens,
                          "rank": a.rank, "distinct": a.distinct, "max_loras": slots,
                          "targets": "q,k,v,o,gate,up,down", "repeats": a.repeats, "cpu_cores": os.cpu_count(),
                          "omp_threads": os.environ.get("OMP_NUM_THREADS"), "loadavg_1m_end": os.getloadavg()[0]},
           "tok_s": results, "loadavg_1m": loads, "best_tok_s": best,
           "ratio_over_base": {ph: best[ph] / best["base"] for ph in best}}
    if a.profile:
        short = SamplingParams(temperature=0, max_tokens=a.profile_tokens, ignore_eos=True)
        out["profile"] = {"tokens": a.profile_tokens, **profile(lambda: run(many, short),
                                                                 RESULTS / "lora_overhead_profile.txt")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lora_overhead.json").write_text(json.dumps(out, indent=1))
    for ph in best:
        print(f"{ph:<36} best {best[ph]:7.1f} tok/s  {best[ph] / best['base']:.2f}x base")
    return 0


def profile(fn, path) -> dict:
    """Run fn under torch.profiler (CPU); write the top-25 operators by self CPU time to `path`; return the top
    10 as {name: {self_cpu_ms, calls}} and the total self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    table = prof.key_averages()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table.table(sort_by="self_cpu_time_total", row_limit=25))
    rows = sorted(table, key=lambda e: e.self_cpu_time_total, reverse=True)
    print(table.table(sort_by="self_cpu_time_total", row_limit=12))
    return {"self_cpu_total_ms": sum(e.self_cpu_time_total for e in rows) / 1e3,
            "top": {e.key: {"self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count}
                    for e in rows[:10]}}


if __name__ == "__main__":
    sys.exit(main())
