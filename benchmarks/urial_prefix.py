"""URIAL's fixed prefix in vLLM's prefix cache: time to first token with a warm prefix vs a cold one.

One steerserve server (SmolLM2 fp32, prefix caching on, its own temporary data dir). For each prefix size, the
prefix is registered once as itself (warm: every request repeats it) and once per cold request with a unique
first line (cold: nothing of it can be cached, since a block's hash chains over everything before it). Requests
are streaming URIAL chats, one at a time (concurrency 1), cold and warm alternating, each with a question of its
own; TTFT is measured at the client to the first token chunk. The usage's cached_tokens shows the cache at work.
Writes benchmarks/results/urial_prefix.json and .png and prints a table.

    python -m benchmarks.urial_prefix             # ~3 minutes on 2 cores
    python -m benchmarks.urial_prefix --quick     # smoke run
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from steerserve.steering import urial

from .common import MODEL_DIR, PROMPTS, RESULTS, describe, free_port, server_command, stop, wait_ready


def prefixes() -> dict[str, str]:
    """The prefix sizes measured: the built-in default (3 examples) and a long one (default + help's examples)."""
    default = urial.BUILTIN_PREFIXES["default"]
    long = default + "".join(urial.split_examples(urial.BUILTIN_PREFIXES["help"])[1])
    return {"default": default, "long": long}


async def ttft(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    start = time.perf_counter()
    first, usage = None, None
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            choices = data.get("choices") or []
            if first is None and choices and "role" not in choices[0].get("delta", {}):
                first = time.perf_counter() - start
            usage = data.get("usage") or usage
    return {"ttft": first, "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}


async def bench(base: str, model: str, a: argparse.Namespace) -> dict:
    out: dict = {}
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        questions = iter(PROMPTS * 4)
        for size, text in prefixes().items():
            r = await client.put(f"/v1/steering/urial/prefixes/bench-{size}", content=text)
            r.raise_for_status()

            def body(variant: str) -> dict:
                return {"model": model, "messages": [{"role": "user", "content": next(questions)}],
                        "max_tokens": a.max_tokens, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True},
                        "steering": {"prompt": {"urial": {"variant": variant}}}}

            await ttft(client, "/v1/chat/completions", body(f"bench-{size}"))  # warms the prefix up
            runs: dict[str, list[dict]] = {"cold": [], "warm": []}
            for i in range(a.requests):
                cold = f"bench-{size}-cold-{i}"
                nonce = f"# Instruction\n\nSession {uuid.uuid4().hex}.\n"  # the first tokens differ: no block shared
                (await client.put(f"/v1/steering/urial/prefixes/{cold}",
                                  content=nonce + text.removeprefix("# Instruction\n"))).raise_for_status()
                for kind in (("cold", "warm") if i % 2 == 0 else ("warm", "cold")):
                    variant = cold if kind == "cold" else f"bench-{size}"
                    runs[kind].append(await ttft(client, "/v1/chat/completions", body(variant)))
            out[size] = {kind: {"ttft_s": describe([r["ttft"] for r in rs]),
                                "prompt_tokens": describe([r["prompt_tokens"] for r in rs]),
                                "cached_tokens": describe([r["cached_tokens"] for r in rs]), "runs": rs}
                         for kind, rs in runs.items()}
            out[size]["speedup_p50"] = out[size]["cold"]["ttft_s"]["p50"] / out[size]["warm"]["ttft_s"]["p50"]
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = list(results)
    for j, kind in enumerate(("cold", "warm")):
        ax.bar([i + 0.4 * j for i in range(len(sizes))], [results[s][kind]["ttft_s"]["p50"] * 1000 for s in sizes],
               width=0.4, label=f"{kind} prefix")
    ax.set_xticks([i + 0.2 for i in range(len(sizes))],
                  [f"{s} ({results[s]['warm']['prompt_tokens']['p50']:.0f} tok)" for s in sizes])
    ax.set(ylabel="TTFT p50 (ms)", title="URIAL prefix: cold vs warm prefix cache (SmolLM2, CPU)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=MODEL_DIR)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--requests", type=int, default=12, help="cold and warm requests each, per prefix size")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--name", default="urial_prefix")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 requests each")
    a = p.parse_args(argv)
    if a.quick:
        a.requests = 3
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="steerserve-bench-") as data:
        port = free_port()
        cmd, ready = server_command("steerserve", a.model, port, a)
        cmd += ["--data-dir", data]
        log = Path(data) / "server.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(proc, f"http://127.0.0.1:{port}{ready}", a.startup_timeout, log)
            results = asyncio.run(bench(f"http://127.0.0.1:{port}", a.model.name, a))
        finally:
            stop(proc)
    conditions = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU",
                  "load_average": os.getloadavg(), "model": a.model.name, "dtype": a.dtype,
                  "max_model_len": a.max_model_len, "kv_cache_gib": a.kv_cache_gib, "requests": a.requests,
                  "max_tokens": a.max_tokens, "concurrency": 1, "command": cmd}
    json_path, png_path = RESULTS / f"{a.name}.json", RESULTS / f"{a.name}.png"
    json_path.write_text(json.dumps({"conditions": conditions, "results": results}, indent=2))
    plot(results, png_path)
    print(f"\n{'prefix':<9}{'prompt tok':>11}{'cold TTFT p50 ms':>18}{'warm TTFT p50 ms':>18}{'cached (warm)':>15}"
          f"{'speed-up':>10}")
    for size, r in results.items():
        print(f"{size:<9}{r['warm']['prompt_tokens']['p50']:>11.0f}{r['cold']['ttft_s']['p50'] * 1000:>18.0f}"
              f"{r['warm']['ttft_s']['p50'] * 1000:>18.0f}{r['warm']['cached_tokens']['p50']:>15.0f}"
              f"{r['speedup_p50']:>10.2f}")
    print(f"\nresults: {json_path}, {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
