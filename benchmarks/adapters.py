"""Adapter pool benchmark: LoRA traffic under Punica's adapter-popularity regimes, against the base model.

One steerserve server with LoRA on (open mode, on 127.0.0.1) and, for reference, one without; N random rank-r
LoRA adapters on every linear layer of the model (written directly as PEFT files, so 64 of them take a second),
registered through the API. Every phase replays the same seeded prompts and output lengths (closed loop,
streaming, `ignore_eos`); phases differ only in which adapter each request names:

    base            no adapter (on the LoRA server, and on a server without LoRA: the cost of enabling it)
    identical       every request the same adapter (Punica "Identical"; the single-adapter case)
    distinct        request i uses adapter i mod N, so the requests in flight use different adapters
                    (Punica "Distinct")
    uniform         each request draws one of N adapters uniformly at random (seeded)
    skewed          each request draws adapter k with probability ~ 1 / k^alpha (Zipf, alpha 1.5)

with N = 1, 8, 64 registered and --max-loras / --max-cpu-loras below the working set, so adapters are evicted
and reloaded while requests run. Reports token throughput, TTFT / ITL / end-to-end percentiles, errors, and the
pool's loads and evictions per phase (from /metrics); writes benchmarks/results/adapters.json and .png.

    python -m benchmarks.adapters            # ~10 minutes on 2 cores
    python -m benchmarks.adapters --quick    # smoke run
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import sys
import time
from pathlib import Path

import httpx

from .common import MODEL_DIR, RESULTS, fmt, one_request, running_server, summarize
from .load import draw_requests

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapters(model: Path, out: Path, n: int, rank: int, seed: int = 0) -> list[Path]:
    """n random LoRA adapters for `model` on every linear layer of TARGETS (PEFT file layout)."""
    import torch
    from safetensors.torch import save_file

    from steerserve.server.adapters.registry import ServedModel

    shapes = ServedModel.from_checkpoint(model, model.name, rank).linear_shapes
    modules = sorted(m for m in shapes if m.rsplit(".", 1)[-1] in TARGETS)
    paths = []
    for i in range(n):
        path = out / f"a{i}"
        paths.append(path)
        if (path / "adapter_model.safetensors").is_file():
            continue
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        tensors = {}
        for m in modules:
            out_f, in_f = shapes[m]
            tensors[f"base_model.model.{m}.lora_A.weight"] = 0.02 * torch.randn(rank, in_f, generator=gen)
            tensors[f"base_model.model.{m}.lora_B.weight"] = 0.02 * torch.randn(out_f, rank, generator=gen)
        path.mkdir(parents=True, exist_ok=True)
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS), "bias": "none",
            "lora_dropout": 0.0, "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model)}))
        save_file(tensors, str(path / "adapter_model.safetensors"))
    return paths


def assignment(regime: str, n: int, count: int, seed: int, alpha: float = 1.5) -> list[int | None]:
    """The adapter index of each of `count` requests under `regime` with n adapters (None: the base model)."""
    rng = random.Random(seed)
    if regime == "base":
        return [None] * count
    if regime == "identical":
        return [0] * count
    if regime == "distinct":
        return [i % n for i in range(count)]
    if regime == "uniform":
        return [rng.randrange(n) for _ in range(count)]
    if regime == "skewed":
        weights = [1 / (k + 1) ** alpha for k in range(n)]
        return rng.choices(range(n), weights, k=count)
    raise ValueError(regime)


def scrape(base: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith("steerserve_adapter") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def phase(base: str, model: str, a: argparse.Namespace, adapters: list[int | None], label: str,
                prefix: str = "a") -> dict:
    """One closed-loop run; request i names adapter `<prefix><adapters[i]>` (None: the base model)."""
    reqs = draw_requests(a.requests, a.seed, a.min_tokens, a.max_tokens)
    url, records, todo = f"{base}/v1/chat/completions", [], iter(enumerate(reqs))

    async def worker(client: httpx.AsyncClient) -> None:
        for i, req in todo:
            name = model if adapters[i] is None else f"{model}:{prefix}{adapters[i]}"
            body = {"model": name, "messages": [{"role": "user", "content": req.prompt}],
                    "max_tokens": req.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            records.append(await one_request(client, url, body))

    before = scrape(base)
    async with httpx.AsyncClient(timeout=httpx.Timeout(a.timeout), limits=httpx.Limits(max_connections=None)) as c:
        start = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(a.concurrency)))
        duration = time.perf_counter() - start
    after = scrape(base)
    summary = summarize(records, duration)
    summary["distinct_adapters"] = len({x for x in adapters if x is not None})
    for key in ("steerserve_adapter_loads_total", "steerserve_adapter_evictions_total"):
        summary[key.removeprefix("steerserve_adapter_").removesuffix("_total")] = after.get(key, 0) - before.get(key, 0)
    print(f"{label:<28} {summary['output_token_throughput']:7.1f} tok/s  ttft p50 {fmt(summary['ttft_s'], 1000, 0)} "
          f"ms  itl p50 {fmt(summary['itl_s'], 1000, 1)} ms  loads {summary['loads']:.0f} evictions "
          f"{summary['evictions']:.0f}  errors {summary['errors']}/{summary['requests']}  "
          f"(load {os.getloadavg()[0]:.1f})", flush=True)
    return summary


def phases(a: argparse.Namespace) -> list[tuple[str, int]]:
    """(regime, adapters registered) in run order: base and identical first and again last (ABBA), so that drift
    from other work on the machine hits both alike; the report keeps the better round of each."""
    out = [("base", 0), ("identical", 1)]
    for n in a.n:
        if n > 1:
            out += [(r, n) for r in a.regimes]
    return out + [("identical", 1), ("base", 0)]


def run(a: argparse.Namespace) -> dict:
    results, servers = [], {}
    adapter_dir = a.out_dir / "adapter-files"
    paths = write_adapters(a.model, adapter_dir, max(a.n), a.rank)
    lora_flags = ["--enable-lora", "--max-loras", str(a.max_loras), "--max-cpu-loras", str(a.max_cpu_loras),
                  "--max-lora-rank", str(a.rank), "--data-dir", str(a.out_dir / "data")]
    env = {**os.environ}
    for label, extra in (("lora", lora_flags), ("no-lora", [])):
        if label == "no-lora" and a.skip_no_lora:
            continue
        print(f"[{label}] starting", flush=True)
        with running_server("steerserve", a, env, RESULTS / f"{a.name}-{label}.log", extra) as (base, startup, cmd):
            servers[label] = {"command": cmd, "startup_s": startup}
            model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
            warm = draw_requests(a.warmup, a.seed + 1, a.min_tokens, a.max_tokens)
            asyncio.run(phase(base, model, argparse.Namespace(**{**vars(a), "requests": len(warm)}),
                              [None] * len(warm), f"[{label}] warm-up"))
            for regime, n in (phases(a) if label == "lora" else [("base", 0)]):
                if label == "lora":
                    for i in range(n):  # registered once; re-registering is a no-op replace
                        r = httpx.put(f"{base}/v1/adapters/a{i}", json={"path": str(paths[i])}, timeout=60)
                        r.raise_for_status()
                if regime == "identical":  # steady state: the adapter's cold load is not part of this phase
                    asyncio.run(phase(base, model, argparse.Namespace(**{**vars(a), "requests": 1}), [0],
                                      f"[{label}] load a0"))
                adapters = assignment(regime, n, a.requests, a.seed)
                s = asyncio.run(phase(base, model, a, adapters, f"[{label}] {regime} N={n}"))
                results.append({"server": label, "regime": regime, "registered": n, **s})
    return {"servers": servers, "phases": results}


def report(out: dict) -> None:
    ph = out["phases"]
    base = max((p for p in ph if p["server"] == "lora" and p["regime"] == "base"),
               key=lambda p: p["output_token_throughput"])
    print(f"\n{'server':<9}{'regime':<11}{'N':>4}{'used':>6}{'tok/s':>8}{'x base':>8}{'ttft p50/p90 ms':>18}"
          f"{'itl p50/p90 ms':>17}{'loads':>7}{'evict':>7}{'err':>6}")
    for p in ph:
        print(f"{p['server']:<9}{p['regime']:<11}{p['registered']:>4}{p['distinct_adapters']:>6}"
              f"{p['output_token_throughput']:>8.1f}{p['output_token_throughput'] / base['output_token_throughput']:>8.2f}"
              f"{'/'.join(fmt(p['ttft_s'], 1000, 0).split('/')[:2]):>18}"
              f"{'/'.join(fmt(p['itl_s'], 1000, 1).split('/')[:2]):>17}{p['loads']:>7.0f}{p['evictions']:>7.0f}"
              f"{p['errors']:>6}")


def plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ph = out["phases"]
    fig, (tput, itl) = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [f"{p['server']}\n{p['regime']} N={p['registered']}" for p in ph]
    tput.bar(range(len(ph)), [p["output_token_throughput"] for p in ph],
             color=["C7" if p["regime"] == "base" else "C0" for p in ph])
    tput.set_xticks(range(len(ph)), labels, fontsize=7, rotation=45, ha="right")
    tput.set(ylabel="output tokens / s", title="throughput by adapter regime")
    itl.bar(range(len(ph)), [(p["itl_s"]["p50"] or 0) * 1000 for p in ph],
            color=["C7" if p["regime"] == "base" else "C1" for p in ph])
    itl.set_xticks(range(len(ph)), labels, fontsize=7, rotation=45, ha="right")
    itl.set(ylabel="ms", title="inter-token latency p50")
    for ax in (tput, itl):
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("steerserve adapter pool benchmark (CPU, Punica popularity regimes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_traffic_args(p: argparse.ArgumentParser) -> None:
    """The closed-loop traffic and server options the adapter benchmarks share."""
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, default=MODEL_DIR)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--startup-timeout", type=float, default=600)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64],
                   help="adapters registered")
    p.add_argument("--regimes", type=lambda s: s.split(","), default=["distinct", "uniform", "skewed"])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument("--max-cpu-loras", type=int, default=6)
    add_traffic_args(p)
    p.add_argument("--skip-no-lora", action="store_true", help="no second server without LoRA")
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/steerserve-bench-adapters"))
    p.add_argument("--name", default="adapters")
    p.add_argument("--quick", action="store_true", help="smoke run: N=1,8, 8 requests, 8 tokens")
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.requests, a.min_tokens, a.max_tokens, a.warmup, a.regimes = [1, 8], 8, 8, 8, 2, ["distinct"]
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = run(a)
    out["conditions"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.adapters", *sys.argv[1:]]), "cpu_cores": os.cpu_count(),
        "model": str(a.model), "dtype": a.dtype, "max_num_seqs": a.max_num_seqs, "max_loras": a.max_loras,
        "max_cpu_loras": a.max_cpu_loras, "rank": a.rank, "targets": TARGETS, "concurrency": a.concurrency,
        "requests": a.requests, "output_tokens": [a.min_tokens, a.max_tokens], "seed": a.seed,
        "zipf_alpha": 1.5, "ignore_eos": True, "temperature": 0, "stream": True}
    (RESULTS / f"{a.name}.json").write_text(json.dumps(out, indent=1))
    plot(out, RESULTS / f"{a.name}.png")
    report(out)
    print(f"\nresults: {RESULTS / f'{a.name}.json'}, {RESULTS / f'{a.name}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
