"""IAPT vs LoRA when one backbone serves many tenants: Punica's "distinct" regime (request i uses adapter i mod N),
N = 8 and 64, same server, same run, same seeded prompts and output lengths (closed loop, streaming, ignore_eos).

The IAPT abstract claims it is more efficient than LoRA in this setting. The adapters are random (speed does not
depend on what they learned) and of similar size: LoRA rank 4 on every linear layer of SmolLM2 (q, k, v, o, gate,
up, down: 1.22 M parameters) and IAPT with bottleneck 32 (1.13 M). Base and adapter phases are interleaved in
one run (base, then for each N: LoRA, IAPT, base; --rounds repeats the whole sequence), and each adapter phase is
reported against the mean of the base phases just before and after it, so that a shared machine's load, which
drifts over minutes, hits a phase and its reference alike; each phase records the 1-minute load average it ended
under. Both kinds share the pool's residency limit (--max-cpu-loras), so N = 64 makes both reload. Writes
benchmarks/results/iapt_vs_lora.{json,png}.

    python -m benchmarks.iapt_vs_lora            # ~10 minutes on 2 cores
    python -m benchmarks.iapt_vs_lora --quick    # smoke run
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
from pathlib import Path

import httpx

from .adapters import add_traffic_args, assignment, phase, write_adapters
from .common import RESULTS, running_server


def write_iapt(model: Path, out: Path, n: int, bottleneck: int, seed: int = 0) -> list[Path]:
    """n random IAPT adapters for `model` (steering/iapt.py), with soft tokens of a realistic size."""
    import torch

    from steerserve.steering.iapt import WEIGHTS_FILE, IaptConfig, IaptModel

    config = json.loads((model / "config.json").read_text())
    paths = []
    for i in range(n):
        path = out / f"iapt{i}"
        paths.append(path)
        if (path / WEIGHTS_FILE).is_file():
            continue
        iapt = IaptModel(IaptConfig(str(model), config["hidden_size"], config["num_hidden_layers"], bottleneck))
        iapt.reset_parameters(torch.Generator().manual_seed(seed * 1000 + i))
        iapt.save(path)
    return paths


def run(a: argparse.Namespace) -> dict:
    lora = write_adapters(a.model, a.out_dir / "lora", max(a.n), a.rank)
    iapt = write_iapt(a.model, a.out_dir / "iapt", max(a.n), a.bottleneck)
    flags = ["--enable-lora", "--max-loras", str(a.max_loras), "--max-cpu-loras", str(a.max_cpu_loras),
             "--max-lora-rank", str(next(r for r in (8, 16, 32, 64) if r >= a.rank)), "--data-dir", str(a.out_dir / "data")]
    results = []
    with running_server("steerserve", a, {**os.environ}, RESULTS / f"{a.name}.log", flags) as (base, startup, cmd):
        model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
        sizes = {}
        for kind, paths in (("lora", lora), ("iapt", iapt)):
            for i, path in enumerate(paths):
                r = httpx.put(f"{base}/v1/adapters/{kind}{i}", json={"path": str(path), "kind": kind}, timeout=60)
                r.raise_for_status()
            sizes[kind] = r.json().get("parameters")
        warm = argparse.Namespace(**{**vars(a), "requests": a.warmup})
        asyncio.run(phase(base, model, warm, [None] * a.warmup, "warm-up", ""))
        for kind in ("lora", "iapt"):  # one request of each kind: first-use costs out of the phases
            asyncio.run(phase(base, model, argparse.Namespace(**{**vars(a), "requests": 1}), [0], f"warm {kind}",
                              kind))
        plan = [("base", 0, "")]
        for _ in range(a.rounds):
            for n in a.n:
                plan += [("lora", n, "lora"), ("iapt", n, "iapt"), ("base", 0, "")]
        for label, n, kind in plan:
            adapters = assignment("distinct" if n else "base", n, a.requests, a.seed)
            s = asyncio.run(phase(base, model, a, adapters, f"{label} N={n}", kind))
            results.append({"kind": label, "registered": n, **s, "loadavg_1m": os.getloadavg()[0]})
        with_reference(results)
    return {"server": {"command": cmd, "startup_s": startup}, "parameters": sizes, "phases": results}


def with_reference(phases: list[dict]) -> None:
    """Set each phase's `base_reference` (the mean throughput of the nearest base phase before it and after it)
    and `x_base` (its throughput over that reference); a base phase is its own reference."""
    bases = [i for i, p in enumerate(phases) if p["kind"] == "base"]
    for i, p in enumerate(phases):
        near = [phases[j]["output_token_throughput"] for j in (max((j for j in bases if j <= i), default=None),
                                                               min((j for j in bases if j >= i), default=None))
                if j is not None]
        p["base_reference"] = sum(near) / len(near)
        p["x_base"] = p["output_token_throughput"] / p["base_reference"]


def summary(ph: list[dict]) -> dict:
    """Per kind and N: the mean `x_base` over rounds (and its range), the mean load average."""
    out = {}
    for kind, n in sorted({(p["kind"], p["registered"]) for p in ph if p["kind"] != "base"}):
        xs = [p for p in ph if p["kind"] == kind and p["registered"] == n]
        out[f"{kind} N={n}"] = {"x_base_mean": sum(p["x_base"] for p in xs) / len(xs),
                                "x_base_range": [min(p["x_base"] for p in xs), max(p["x_base"] for p in xs)],
                                "rounds": len(xs), "loadavg_1m_mean": sum(p["loadavg_1m"] for p in xs) / len(xs)}
    return out


def report(out: dict) -> None:
    ph = out["phases"]
    print(f"\n{'kind':<6}{'N':>4}{'tok/s':>8}{'x base':>8}{'ttft p50/p90 ms':>18}{'itl p50/p90 ms':>17}"
          f"{'e2e p50 s':>10}{'loads':>7}{'err':>5}{'load1m':>8}")
    for p in ph:
        print(f"{p['kind']:<6}{p['registered']:>4}{p['output_token_throughput']:>8.1f}{p['x_base']:>8.2f}"
              f"{_p(p['ttft_s'], 1000, 0):>18}{_p(p['itl_s'], 1000, 1):>17}{p['e2e_s']['p50']:>10.2f}"
              f"{p['loads']:>7.0f}{p['errors']:>5}{p['loadavg_1m']:>8.1f}")
    for key, s in out["summary"].items():
        print(f"{key}: {s['x_base_mean']:.2f}x base (rounds {s['rounds']}, range {s['x_base_range'][0]:.2f}-"
              f"{s['x_base_range'][1]:.2f}, load {s['loadavg_1m_mean']:.1f})")
    for n in sorted({p["registered"] for p in ph if p["registered"]}):
        lo, ia = (next(p for p in ph if p["kind"] == k and p["registered"] == n) for k in ("lora", "iapt"))
        print(f"N={n}: IAPT / LoRA throughput {ia['output_token_throughput'] / lo['output_token_throughput']:.2f}x, "
              f"ITL p50 {ia['itl_s']['p50'] / lo['itl_s']['p50']:.2f}x, TTFT p50 "
              f"{ia['ttft_s']['p50'] / lo['ttft_s']['p50']:.2f}x")


def _p(d: dict, scale: float, digits: int) -> str:
    return "/".join(f"{(d[q] or 0) * scale:.{digits}f}" for q in ("p50", "p90"))


def plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ph = out["phases"]
    labels = [f"{p['kind']}\nN={p['registered']}" for p in ph]
    colors = [{"base": "C7", "lora": "C0", "iapt": "C2"}[p["kind"]] for p in ph]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, (title, values) in zip(axes, [
            ("output tokens / s", [p["output_token_throughput"] for p in ph]),
            ("x base (mean of the neighbouring base phases)", [p["x_base"] for p in ph]),
            ("inter-token latency p50 (ms)", [(p["itl_s"]["p50"] or 0) * 1000 for p in ph]),
            ("time to first token p50 (ms)", [(p["ttft_s"]["p50"] or 0) * 1000 for p in ph])], strict=True):
        ax.bar(range(len(ph)), values, color=colors)
        ax.set_xticks(range(len(ph)), labels, fontsize=8)
        ax.set(title=title)
        ax.grid(alpha=0.3, axis="y")
    axes[1].axhline(0.8, color="C3", ls="--", lw=1, label="goal 0.8x")
    axes[1].legend(fontsize=8)
    fig.suptitle("IAPT vs LoRA, distinct adapter per request (SmolLM2 fp32, CPU, one server)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64], help="adapters")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (every linear layer)")
    p.add_argument("--bottleneck", type=int, default=32, help="IAPT bottleneck m")
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--max-cpu-loras", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1, help="repeat the LoRA/IAPT/base sequence")
    add_traffic_args(p)
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/steerserve-bench-iapt"))
    p.add_argument("--name", default="iapt_vs_lora")
    p.add_argument("--quick", action="store_true", help="smoke run: N=8, 8 requests, 8 tokens")
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.requests, a.min_tokens, a.max_tokens, a.warmup = [8], 8, 8, 8, 2
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = run(a)
    out["summary"] = summary(out["phases"])
    out["conditions"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.iapt_vs_lora", *sys.argv[1:]]), "cpu_cores": os.cpu_count(),
        "load_average_at_end": os.getloadavg(), "model": str(a.model), "dtype": a.dtype,
        "max_num_seqs": a.max_num_seqs, "max_loras": a.max_loras, "max_cpu_loras": a.max_cpu_loras,
        "lora_rank": a.rank, "iapt_bottleneck": a.bottleneck, "concurrency": a.concurrency, "requests": a.requests,
        "output_tokens": [a.min_tokens, a.max_tokens], "seed": a.seed, "regime": "distinct", "stream": True,
        "rounds": a.rounds}
    (RESULTS / f"{a.name}.json").write_text(json.dumps(out, indent=1))
    plot(out, RESULTS / f"{a.name}.png")
    report(out)
    print(f"\nresults: {RESULTS / f'{a.name}.json'}, {RESULTS / f'{a.name}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
