"""Adapter-affinity routing across replicas: how many adapter loads a Zipf workload costs, and the throughput,
with Ray Serve's model multiplexing keyed by the adapter (what `--replicas` does) vs without it.

Machine-independent by construction: the replicas are simulated (no engine), behind the real router and Ray
Serve's real routing. Each simulated replica keeps, like the engine's adapter pool, an LRU of `--resident`
adapters; a request for an adapter it does not hold costs one load (`--load-ms` of sleep) and every request
`--service-ms` of sleep, at most `--slots` at a time per replica. Routing modes, on the same seeded requests
(benchmarks.adapters.assignment("skewed"): adapter k with probability ~ 1/k^alpha, alpha 1.5):

    affinity       the router with multiplexing (Ray Serve prefers replicas holding the adapter)
    default        the router without it (Ray Serve's default: the less loaded of two random replicas)
    round-robin    request i to replica i mod N, the same simulated replicas driven in this process

The load count depends on routing decisions only (and on which requests overlap, hence a little on timing);
throughput follows the cost model. `--keys fingerprint` runs the same with steering fingerprints as the key
and the replica's prefix cache as the LRU (a miss costs a prefill of the shared prefix, `--load-ms`), to ask
whether prefix-cache affinity would help.

    python -m benchmarks.replica_affinity            # ~2 minutes: writes results/replica_affinity.json/.png
    python -m benchmarks.replica_affinity --quick    # smoke run
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import socket
import sys
import time
from pathlib import Path

import httpx

from .adapters import assignment
from .common import RESULTS

BASE = "smollm2-135m-instruct"


class SimulatedReplica:
    """The cost model of one replica: an LRU of `resident` keys (a miss: one load of `load_s`), `slots` requests
    served at once, each taking `service_s`."""

    def __init__(self, resident: int, load_s: float, service_s: float, slots: int):
        self.lru: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.resident, self.load_s, self.service_s = resident, load_s, service_s
        self.slots = asyncio.Semaphore(slots)
        self.loads = 0
        self.loading: dict[str, asyncio.Future] = {}

    async def serve(self, key: str) -> None:
        async with self.slots:
            if key in self.lru:
                self.lru.move_to_end(key)
            elif key in self.loading:
                await self.loading[key]
            else:
                self.loads += 1
                done = self.loading[key] = asyncio.get_running_loop().create_future()
                await asyncio.sleep(self.load_s)
                self.lru[key] = None
                while len(self.lru) > self.resident:
                    self.lru.popitem(last=False)
                del self.loading[key]
                done.set_result(None)
            await asyncio.sleep(self.service_s)


def ray_replica_class():
    """The simulated replica as a Ray Serve deployment with the engine replica's interface (forward, resident)."""
    from ray import serve

    from steerserve.server.replicas.forwarding import ResponseStart

    class SimulatedEngineReplica:
        def __init__(self, resident: int, load_s: float, service_s: float, slots: int):
            self.sim = SimulatedReplica(resident, load_s, service_s, slots)
            self.id = serve.get_replica_context().replica_id.unique_id

        @serve.multiplexed(max_num_models_per_replica=64)
        async def resident(self, key: str) -> str:
            return key

        async def forward(self, request):
            if key := serve.get_multiplexed_model_id():
                await self.resident(key)
            await self.sim.serve(json.loads(request.body)["model"])
            yield ResponseStart(200, [(b"content-type", b"application/json")])
            yield json.dumps({"replica": self.id, "loads": self.sim.loads}).encode()

    return SimulatedEngineReplica


async def drive(send, keys: list[str], concurrency: int) -> float:
    """Closed loop: `concurrency` workers send the requests in order; returns the seconds it took."""
    queue = list(reversed(keys))

    async def worker() -> None:
        while queue:
            await send(queue.pop())

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - began


def run_round_robin(keys: list[str], a: argparse.Namespace) -> dict:
    async def go() -> dict:
        replicas = [SimulatedReplica(a.resident, a.load_ms / 1e3, a.service_ms / 1e3, a.slots)
                    for _ in range(a.replicas)]
        counter = iter(range(len(keys)))

        async def send(key: str) -> None:
            await replicas[next(counter) % a.replicas].serve(key)

        seconds = await drive(send, keys, a.concurrency)
        return {"loads": sum(r.loads for r in replicas), "seconds": seconds,
                "requests_per_s": len(keys) / seconds, "loads_per_replica": [r.loads for r in replicas],
                "note": "driven in this process: no HTTP or Ray hop, so its throughput is an upper bound"}
    return asyncio.run(go())


def run_ray(keys: list[str], a: argparse.Namespace, affinity: bool, port: int) -> dict:
    from ray import serve

    from steerserve.server.replicas.deployment import Router
    from steerserve.server.settings import Settings

    replica = serve.deployment(ray_replica_class()).options(
        name="SimulatedEngineReplica", num_replicas=a.replicas, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=4 * a.concurrency)
    router = serve.deployment(Router).options(name="SteerServeRouter", ray_actor_options={"num_cpus": 0},
                                              max_ongoing_requests=4 * a.concurrency)
    app = router.bind(replica.bind(a.resident, a.load_ms / 1e3, a.service_ms / 1e3, a.slots),
                      Settings().model_dump_json(), affinity)
    serve.run(app, name="affinity-bench", route_prefix="/")
    last: dict[str, int] = {}

    async def go() -> float:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            async def send(key: str) -> None:
                r = await client.post("/v1/chat/completions", json={"model": f"{BASE}:{key}", "messages": []})
                r.raise_for_status()
                body = r.json()
                last[body["replica"]] = max(last.get(body["replica"], 0), body["loads"])

            return await drive(send, keys, a.concurrency)

    seconds = asyncio.run(go())
    serve.delete("affinity-bench")
    # Each replica's final count is the largest it reported (every replica answers many requests).
    return {"loads": sum(last.values()), "seconds": seconds, "requests_per_s": len(keys) / seconds,
            "loads_per_replica": sorted(last.values(), reverse=True)}


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(out["modes"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric, title in ((axes[0], "loads", "adapter loads (fewer is better)"),
                              (axes[1], "requests_per_s", "throughput, requests/s")):
        values = [out["modes"][m][metric] for m in modes]
        labels = [m if m != "round-robin" else "round-robin\n(in process)" for m in modes]
        ax.bar(labels, values, color=["tab:green", "tab:blue", "tab:gray"][: len(modes)])
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.0f}" if metric == "loads" else f"{v:.1f}", ha="center", va="bottom")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    c = out["config"]
    fig.suptitle(f"{c['replicas']} replicas, {c['keys']} {c['key_kind']} keys (Zipf 1.5), {c['requests']} requests, "
                 f"{c['resident']} resident per replica", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--adapters", type=int, default=32, help="distinct keys (adapters or fingerprints)")
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--resident", type=int, default=4, help="keys one replica holds (its --max-cpu-loras)")
    p.add_argument("--slots", type=int, default=8, help="requests one replica serves at once")
    p.add_argument("--load-ms", type=float, default=300.0, help="one adapter load (or prefix prefill)")
    p.add_argument("--service-ms", type=float, default=150.0, help="one request once its adapter is loaded")
    p.add_argument("--keys", choices=("adapter", "fingerprint"), default="adapter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 replicas, 60 requests")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.replicas, a.requests, a.concurrency = 2, 60, 4
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import ray
    from ray import serve

    prefix = "fp" if a.keys == "fingerprint" else "a"
    keys = [f"{prefix}{k}" for k in assignment("skewed", a.adapters, a.requests, a.seed)]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        modes = {"affinity": run_ray(keys, a, True, port), "default": run_ray(keys, a, False, port),
                 "round-robin": run_round_robin(keys, a)}
    finally:
        serve.shutdown()
        ray.shutdown()
    out = {"config": {"replicas": a.replicas, "keys": a.adapters, "key_kind": a.keys, "requests": a.requests,
                      "concurrency": a.concurrency, "resident": a.resident, "slots": a.slots, "load_ms": a.load_ms,
                      "service_ms": a.service_ms, "zipf_alpha": 1.5, "seed": a.seed,
                      "distinct_keys_drawn": len(set(keys))}, "modes": modes}
    stem = a.out or RESULTS / ("replica_affinity" + ("" if a.keys == "adapter" else "_fingerprint")
                                + ("_quick" if a.quick else ""))
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    plot(out, stem.with_suffix(".png"))
    for mode, r in modes.items():
        print(f"{mode:12s} loads {r['loads']:4d}  {r['requests_per_s']:7.1f} req/s  per replica {r['loads_per_replica']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
