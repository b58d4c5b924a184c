"""Crash-safe adapter uploads and the graceful shutdown, on real servers over real HTTP (a tiny Llama): a server
SIGKILLed mid-upload leaves nothing behind after its restart, a stored adapter broken while the server was down is
refused per request (the engine serves on), and SIGTERM lets a streaming request finish, aborts what outlasts
`--shutdown-timeout`, and exits 0. The store's own sweep is checked without a server."""
from __future__ import annotations

import asyncio
import json
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from steerserve.server.adapters import files
from steerserve.server.adapters.registry import AdapterStore
from tests.conftest import Server
from tests.server.conftest import stored_copy
from tests.server.test_fail_closed import injected
from tests.tiny_models import build_tiny_llama, build_tiny_lora

LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")
SHUTDOWN_TIMEOUT = 10
# Engine steps with a logits-steered row take at least 25 ms (injected into the engine process), so a 1000-token
# steered stream outlasts the shutdown timeout however fast the machine, and a 40-token one finishes well within.
SLOW_STEERED_STEPS = """
def patch(module):
    import time

    apply = module.SteeringLogitsProcessor.apply

    def slow(self, logits):
        if self._active:
            time.sleep(0.025)
        return apply(self, logits)

    module.SteeringLogitsProcessor.apply = slow
"""


def test_the_store_sweeps_orphans_and_keeps_what_it_owns(tmp_path):
    """What a crash can leave: a half-written upload (staging), a published directory whose row was never
    committed, the files of a row deleted just before the crash. Reopening the store removes exactly those."""
    store = AdapterStore(tmp_path / "a.db", tmp_path / "files")
    staged = store.upload_dir()
    (staged / "adapter_config.json").write_text("{}")
    kept, _ = files.publish(store.upload_dir(), store.artifacts)
    uncommitted, _ = files.publish(store.upload_dir(), store.artifacts)
    deleted, _ = files.publish(store.upload_dir(), store.artifacts)
    other = store.files_dir / "not-an-upload"
    other.mkdir()
    for path, name in ((kept, "kept"), (deleted, "deleted")):
        store._insert("alice", name, "lora", path, True, {})
    store.delete("alice", "deleted")  # ... and the process died before the files went
    store.close()
    AdapterStore(tmp_path / "a.db", tmp_path / "files").close()
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == sorted([files.STAGING, kept.name, other.name])
    assert not list((tmp_path / "files" / files.STAGING).iterdir())
    assert not uncommitted.exists() and not deleted.exists()


def multipart(boundary: str, lora: Path, hold: threading.Event):
    """A multipart upload of `lora`'s files that stops after the first half and waits for `hold`."""
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{n}\"; filename=\"{n}\"\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + (lora / n).read_bytes() + b"\r\n"
                    for n in LORA_FILES) + f"--{boundary}--\r\n".encode()
    yield body[: len(body) // 2]
    hold.wait(60)
    yield body[len(body) // 2:]


@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
    """A server that was SIGKILLed in the middle of an upload and had a stored adapter damaged while it was down,
    then started again on the same data directory. Yields (server, data directory, tiny model)."""
    tmp = tmp_path_factory.mktemp("durable")
    model = build_tiny_llama(tmp / "tiny")
    lora = build_tiny_lora(tmp / "lora", model, rank=4)
    damaged, moved = tmp / "damaged", tmp / "moved"
    shutil.copytree(lora, damaged)
    shutil.copytree(lora, moved)
    for path, tail in ((damaged, "\n"), (moved, " ")):  # configs with bytes of their own, to find their copies by
        (path / "adapter_config.json").write_text((lora / "adapter_config.json").read_text() + tail)
    data = tmp / "data"
    args = ["--model", str(model), "--dtype", "float32", "--max-model-len", "1024", "--kv-cache-gib", "0.1",
            "--max-num-seqs", "4", "--data-dir", str(data), "--enable-lora", "--max-lora-rank", "8",
            "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)]
    first = Server(args, tmp / "first.log").wait_ready()
    try:
        upload = {n: (n, (lora / n).read_bytes()) for n in LORA_FILES}
        assert httpx.put(f"{first.url}/v1/adapters/kept", files=upload, timeout=60).status_code == 200
        for name, path in (("damaged", damaged), ("moved", moved)):
            r = httpx.put(f"{first.url}/v1/adapters/{name}", json={"path": str(path)}, timeout=60)
            assert r.status_code == 200, r.text
        hold = threading.Event()
        boundary = "steerserve-test-boundary"
        killed = threading.Thread(target=lambda: _quietly(lambda: httpx.put(
            f"{first.url}/v1/adapters/killed", content=multipart(boundary, lora, hold), timeout=60,
            headers={"content-type": f"multipart/form-data; boundary={boundary}"})))
        killed.start()
        staging = data / "adapters" / files.STAGING
        deadline = time.monotonic() + 30
        while not (staging.is_dir() and any(staging.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert any(staging.iterdir()), "the upload never started"
        engine = psutil.Process(first.proc.pid).children(recursive=True)
        first.proc.send_signal(signal.SIGKILL)  # in the middle of the upload
        first.proc.wait(30)
        for child in engine:  # a SIGKILLed server cannot take its engine process with it
            child.kill()
        hold.set()
        killed.join(60)
    finally:
        first.stop()
    assert any(staging.iterdir())  # the kill left a partial upload behind
    # While the server was down: the stored copy of `damaged` had one byte flipped (it still parses: only its
    # checksum tells); `moved`'s original directory was broken (its registration stored a copy: no effect).
    weights = stored_copy(data, damaged, "adapter_config.json").parent / "adapter_model.safetensors"
    flipped = bytearray(weights.read_bytes())
    flipped[-1] ^= 1
    weights.write_bytes(bytes(flipped))
    (moved / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    slow = injected(tmp, "steerserve.server.engine.processor", SLOW_STEERED_STEPS)
    second = Server(args, tmp / "second.log", env=slow).wait_ready()
    try:
        yield second, data, model
    finally:
        second.stop()


def _quietly(call) -> None:
    try:
        call()
    except httpx.HTTPError:
        pass


def test_a_restart_sweeps_a_killed_upload_and_refuses_a_broken_adapter(restarted):
    server, data, model = restarted
    uploads = data / "adapters"
    assert not list((uploads / files.STAGING).iterdir())  # the killed upload is gone
    listed = {a["name"]: a for a in httpx.get(f"{server.url}/v1/adapters", timeout=10).json()["data"]}
    assert set(listed) == {"kept", "damaged", "moved"}
    on_disk = {p.name for p in uploads.iterdir()} - {files.STAGING}
    assert len(on_disk) == 3  # exactly the stored adapters' directories: nothing orphaned
    r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                   json={"model": f"{model.name}:damaged", "prompt": "hello", "max_tokens": 3})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "adapter_broken" and error["param"] == "model" and "damaged" in error["message"]
    assert "corrupt" in error["message"] and "sha256" in error["message"], error
    for name in (f"{model.name}:kept", f"{model.name}:moved", model.name):
        r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={"model": name, "prompt": "hello",
                                                                          "max_tokens": 3})
        assert r.status_code == 200, r.text
    assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200


def test_sigterm_lets_a_stream_finish_aborts_the_rest_and_exits_0(restarted):
    """SIGTERM with two streams in flight: new requests and /ready get 503 at once; the short stream finishes
    whole; the one that outlasts --shutdown-timeout is cut; the process exits 0."""
    server, _, model = restarted

    def body(tokens: int) -> dict:
        return {"model": model.name, "prompt": "hello", "max_tokens": tokens, "ignore_eos": True, "stream": True,
                "temperature": 0, "stream_options": {"include_usage": True},
                "steering": {"logits": {"bias": {"7": 0.5}}}}  # slow steps (SLOW_STEERED_STEPS)

    async def stream(c: httpx.AsyncClient, tokens: int, started: asyncio.Event) -> list[str]:
        """The stream's `data:` payloads, until it ends or breaks."""
        lines = []
        try:
            async with c.stream("POST", "/v1/completions", json=body(tokens)) as r:
                async for line in r.aiter_lines():
                    started.set()
                    if line.startswith("data: "):
                        lines.append(line.removeprefix("data: "))
        except httpx.HTTPError:
            pass
        return lines

    async def run() -> tuple[list[str], list[str], list[httpx.Response], float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            events = [asyncio.Event(), asyncio.Event()]
            long = asyncio.ensure_future(stream(c, 1000, events[0]))
            await events[0].wait()
            short = asyncio.ensure_future(stream(c, 40, events[1]))
            await events[1].wait()
            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(0.2)
            refused = [await c.post("/v1/completions", json={"model": model.name, "prompt": "hi", "max_tokens": 2}),
                       await c.get("/ready")]
            return await short, await long, refused, signalled

    short, long, refused, signalled = asyncio.run(run())
    for r in refused:
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    assert short[-1] == "[DONE]" and json.loads(short[-2])["usage"]["completion_tokens"] == 40  # finished whole
    assert long[-1:] != ["[DONE]"]  # cut at the shutdown timeout
    code = server.proc.wait(timeout=SHUTDOWN_TIMEOUT + 30)
    took = time.monotonic() - signalled
    print(f"exit {code} {took:.1f} s after SIGTERM (shutdown timeout {SHUTDOWN_TIMEOUT} s); long stream: "
          f"{len(long)} events")
    assert code == 0
    assert took < SHUTDOWN_TIMEOUT + 15
