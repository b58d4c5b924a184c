"""Shared benchmark plumbing: the servers under test (start, readiness, stop), one streamed request, statistics.

Used by `benchmarks.frontend` and `benchmarks.load`. Every server runs in its own process group on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results"
MODEL_DIR = Path.home() / ".cache" / "steerserve" / "models" / "smollm2-135m-instruct"
SUBJECTS = ["the ocean", "a lighthouse", "coffee", "volcanoes", "the moon", "bees", "a city at night", "rain"]
TASKS = ["Write a haiku about {}.", "Give three facts about {}.", "Describe {} to a child.",
         "Write a short story opening about {}.", "List five words that remind you of {}.",
         "Explain why people like {}.", "Write a limerick about {}.", "Summarize what you know about {}."]
PROMPTS = [t.format(s) for t in TASKS for s in SUBJECTS]  # 64 short, varied instructions


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def describe(values: list[float]) -> dict[str, float | None]:
    return {f"p{q}": percentile(values, q) for q in (50, 90, 99)}


def fmt(d: dict, scale: float, digits: int) -> str:
    """'p50/p90/p99' of a `describe` result, scaled (e.g. 1000 for ms)."""
    return "/".join("-" if d[q] is None else f"{d[q] * scale:.{digits}f}" for q in ("p50", "p90", "p99"))


def summarize(records: list[dict], duration: float) -> dict:
    """Throughput and latency percentiles (seconds) of one level's request records."""
    ok = [r for r in records if r["error"] is None]
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": len(records), "errors": len(records) - len(ok), "duration_s": duration,
            "request_throughput": len(ok) / duration, "output_token_throughput": tokens / duration,
            "output_tokens": tokens, "ttft_s": describe([r["ttft"] for r in ok if r["ttft"] is not None]),
            "itl_s": describe([x for r in ok for x in r["itl"]]), "e2e_s": describe([r["e2e"] for r in ok]),
            "error_samples": sorted({r["error"] for r in records if r["error"]})[:5]}


def server_command(kind: str, model: Path, port: int, a: argparse.Namespace) -> tuple[list[str], str]:
    """The command line starting `kind` and the path that answers 200 once it can serve."""
    py = sys.executable
    if kind == "steerserve":
        return [py, "-m", "steerserve.server", "serve", "--model", str(model), "--port", str(port),
                "--max-model-len", str(a.max_model_len), "--dtype", a.dtype, "--max-num-seqs", str(a.max_num_seqs),
                "--kv-cache-gib", str(a.kv_cache_gib), "--enforce-eager", "--enable-prefix-caching",
                "--log-level", "warning"], "/ready"
    return [py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
            model.name, "--host", "127.0.0.1", "--port", str(port), "--dtype", a.dtype, "--max-model-len",
            str(a.max_model_len), "--enforce-eager", "--max-num-seqs", str(a.max_num_seqs), "--kv-cache-memory-bytes",
            str(int(a.kv_cache_gib * 2**30)), "--enable-prefix-caching", "--disable-log-stats",
            "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"], "/health"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (not its children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, timeout: float, log: Path) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's whole process group (engine core included), SIGKILL if it lingers."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def running_server(kind: str, a: argparse.Namespace, env: dict, log: Path,
                   extra: list[str] | tuple[str, ...] = ()) -> Iterator[tuple[str, float, list[str]]]:
    """Start `kind` ("steerserve" or "vllm") with `a`'s engine settings and `extra` flags; yield (base URL,
    start-up seconds, command); stop it however the block ends."""
    port = free_port()
    cmd, ready_path = server_command(kind, a.model, port, a)
    cmd = [*cmd, *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        startup = wait_ready(proc, f"http://127.0.0.1:{port}{ready_path}", a.startup_timeout, log)
        yield f"http://127.0.0.1:{port}", startup, cmd
    finally:
        stop(proc)


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """Stream one chat completion; TTFT is the first token chunk, ITL the gaps between token chunks."""
    rec = {"ttft": None, "itl": [], "tokens": 0, "e2e": None, "error": None}
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now, data = time.perf_counter(), json.loads(line[6:])
                if "error" in data:
                    rec["error"] = str(data["error"])[:200]
                if data.get("usage"):
                    rec["tokens"] = data["usage"]["completion_tokens"]
                choices = data.get("choices") or []
                if not choices or "role" in choices[0].get("delta", {}):
                    continue  # usage chunk or role preamble: no token
                chunks += 1
                if rec["ttft"] is None:
                    rec["ttft"] = now - start
                else:
                    rec["itl"].append(now - last)
                last = now
    except httpx.HTTPError as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"[:200]
    rec["e2e"] = time.perf_counter() - start
    rec["tokens"] = rec["tokens"] or chunks
    return rec
