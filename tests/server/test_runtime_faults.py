"""Faults while serving, on a real server over real HTTP (a tiny Llama keeps each start to seconds): one request's
engine-side fault fails that request only; one tenant's flood is bounded and another tenant is served meanwhile;
a SIGKILLed engine core makes the server answer 503 and exit non-zero. The tests share one server and run in file
order; the last kills its engine."""
from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import Server, auth
from tests.server.conftest import stored_copy
from tests.server.test_fail_closed import injected
from tests.tiny_models import build_tiny_iapt, build_tiny_llama

# The worker reads a row's IAPT adapter from disk on every admission, as it does after its LRU dropped it: so an
# adapter whose files broke after its first use reaches the engine step (the server's own pre-load check sees
# a cold adapter only once).
UNCACHED_IAPT = """
def patch(module):
    from pathlib import Path

    def load(part, device):
        return module.IaptModel.load(Path(part.path), device)

    module.load = load
"""

PER_TENANT = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def srv(tiny, api_keys, tmp_path_factory) -> Server:
    state = tmp_path_factory.mktemp("faults")
    root = state / "root"
    (root / "alice").mkdir(parents=True)
    for name, seed in (("broken", 1), ("good", 2)):
        build_tiny_iapt(root / "alice" / name, tiny, seed=seed)
    server = Server(["--model", str(tiny), "--dtype", "float32", "--max-model-len", "256", "--kv-cache-gib", "0.1",
                     "--max-num-seqs", "4", "--enable-lora", "--max-lora-rank", "8", "--api-keys", api_keys["file"],
                     "--adapter-root", str(root), "--data-dir", str(state / "data"),
                     "--max-requests-per-tenant", str(PER_TENANT)],
                    state / "server.log", env=injected(state, "steerserve.server.engine.iapt_hook", UNCACHED_IAPT))
    server.adapter_root = root
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def completion(model: str, **extra) -> dict:
    return {"model": model, "prompt": "hello world", "max_tokens": 6, "temperature": 0, **extra}


def test_a_broken_adapter_fails_its_own_request_and_no_other(srv, tiny, api_keys):
    """IAPT adapter files that break after registration: the request for it is stopped with an error naming it
    (never served unsteered), the other tenants' requests in the same steps are served exactly as before, the
    engine stays ready and IAPT stays on for every other adapter."""
    alice, bob = auth(api_keys["alice"]), auth(api_keys["bob"])
    for name in ("broken", "good"):
        r = httpx.put(f"{srv.url}/v1/adapters/{name}", headers=alice, timeout=60,
                      json={"path": str(srv.adapter_root / "alice" / name), "kind": "iapt"})
        assert r.status_code == 200, r.text
    plain = completion(tiny.name)
    steered = completion(tiny.name, steering={"logits": {"bias": {"7": 5.0}}})
    good = completion(f"{tiny.name}:good")

    def text(r: httpx.Response) -> str:
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    before = {name: text(httpx.post(f"{srv.url}/v1/completions", headers=who, json=body, timeout=60))
              for name, who, body in (("plain", bob, plain), ("steered", bob, steered), ("good", alice, good))}
    assert text(httpx.post(f"{srv.url}/v1/completions", headers=alice, json=completion(f"{tiny.name}:broken"),
                           timeout=60))  # it serves while its files are intact

    # Truncated on disk: the server's stored copy (registering by path copied the files into its store).
    weights = stored_copy(srv.adapter_root.parent / "data", srv.adapter_root / "alice" / "broken",
                          "iapt_model.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            jobs = [c.post("/v1/completions", headers=alice, json=completion(f"{tiny.name}:broken")),
                    c.post("/v1/completions", headers=alice, json=completion(f"{tiny.name}:broken", stream=True)),
                    c.post("/v1/completions", headers=bob, json=plain),
                    c.post("/v1/completions", headers=bob, json=steered),
                    c.post("/v1/completions", headers=alice, json=good)]
            return await asyncio.gather(*jobs)

    broken, broken_stream, *others = asyncio.run(together())
    for r in (broken, broken_stream):
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error["code"] == "steering_fault" and error["param"] == "model"
        assert "iapt" in error["message"] and "cmpl-" in error["message"], error
    assert [text(r) for r in others] == [before["plain"], before["steered"], before["good"]]
    assert httpx.get(f"{srv.url}/ready", timeout=10).status_code == 200
    assert text(httpx.post(f"{srv.url}/v1/completions", headers=alice, json=good, timeout=60)) == before["good"]


def test_a_flooding_tenant_is_bounded_and_another_tenant_is_served(srv, tiny, api_keys):
    """alice floods with 50 long requests against a per-tenant bound of 8: some of hers get 429 with
    Retry-After; bob's one request is admitted and completes while she floods."""
    long = completion(tiny.name, max_tokens=200, ignore_eos=True)
    statuses: list[int] = []

    async def flood() -> tuple[httpx.Response, float, float]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            stop = asyncio.Event()

            async def alice_worker() -> None:
                while not stop.is_set():
                    r = await c.post("/v1/completions", headers=auth(api_keys["alice"]), json=long)
                    statuses.append(r.status_code)
                    if r.status_code == 429:
                        assert r.json()["error"]["code"] == "rate_limit_exceeded" and int(r.headers["retry-after"]) >= 1
                        await asyncio.sleep(0.2)

            workers = [asyncio.ensure_future(alice_worker()) for _ in range(50)]
            while 429 not in statuses:
                await asyncio.sleep(0.01)
            start = time.monotonic()
            bobs = await c.post("/v1/completions", headers=auth(api_keys["bob"]), json=long)
            took = time.monotonic() - start
            refused_meanwhile = statuses.count(429)
            stop.set()
            await asyncio.gather(*workers)
            return bobs, took, refused_meanwhile

    bobs, took, refused = asyncio.run(flood())
    assert bobs.status_code == 200, bobs.text
    assert len(bobs.json()["choices"][0]["text"]) > 0
    assert refused > 0 and statuses.count(200) >= PER_TENANT
    print(f"bob served in {took:.2f} s during the flood; alice: {statuses.count(200)} served, "
          f"{statuses.count(429)} refused with 429")


def test_a_deleted_adapters_metric_series_go(srv, tiny, api_keys):
    """`steerserve_adapter_requests_total` has a series per adapter served; deleting the adapter removes them."""
    alice, ops = auth(api_keys["alice"]), auth(api_keys["ops"])
    series = 'steerserve_adapter_requests_total{adapter="good",scope="tenant",tenant="alice"}'
    assert httpx.post(f"{srv.url}/v1/completions", headers=alice, json=completion(f"{tiny.name}:good"),
                      timeout=60).status_code == 200
    assert series in httpx.get(f"{srv.url}/metrics", headers=ops, timeout=10).text
    assert httpx.delete(f"{srv.url}/v1/adapters/good", headers=alice, timeout=10).status_code == 200
    deadline = time.monotonic() + 10
    while series in httpx.get(f"{srv.url}/metrics", headers=ops, timeout=10).text:  # dropped once idle
        assert time.monotonic() < deadline, "the deleted adapter's series stayed"
        time.sleep(0.1)


def engine_core(server: Server) -> psutil.Process:
    children = psutil.Process(server.proc.pid).children(recursive=True)
    named = [p for p in children if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()]
    assert named, [(p.pid, p.name(), p.cmdline()) for p in children]
    return named[0]


def test_an_engine_killed_at_runtime_makes_the_server_answer_503_and_exit(srv, tiny, api_keys):
    """SIGKILL of the engine core while a request runs: that request and new ones get 503 `engine_unavailable`
    (never a 400 blaming the client), /health and /ready 503, and the process exits non-zero soon after."""
    headers = auth(api_keys["bob"])

    async def kill_during_requests() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            running = [asyncio.ensure_future(c.post("/v1/completions", headers=headers, json=completion(
                tiny.name, max_tokens=240, ignore_eos=True))) for _ in range(PER_TENANT)]  # more than one batch
            await asyncio.sleep(0.3)
            engine_core(srv).send_signal(signal.SIGKILL)
            return await asyncio.gather(*running)

    killed_at = time.monotonic()
    in_flight = asyncio.run(kill_during_requests())
    cut = [r for r in in_flight if r.status_code != 200]  # those that had not finished before the kill
    assert cut and all(r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable" for r in cut), \
        [r.text for r in cut]
    seen: dict[str, int] = {}
    while len(seen) < 3 and time.monotonic() - killed_at < 10:
        for name, call in (("health", lambda: httpx.get(f"{srv.url}/health", timeout=5)),
                           ("ready", lambda: httpx.get(f"{srv.url}/ready", timeout=5)),
                           ("request", lambda: httpx.post(f"{srv.url}/v1/completions", headers=headers,
                                                          json=completion(tiny.name), timeout=5))):
            r = call()
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "engine_unavailable", (name, r.text)
                seen[name] = r.status_code
    assert seen == {"health": 503, "ready": 503, "request": 503}
    code = srv.proc.wait(timeout=30)
    print(f"server exited {code} {time.monotonic() - killed_at:.1f} s after the kill")
    assert code != 0
