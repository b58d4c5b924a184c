"""A replica killed mid-traffic (SIGKILL of its process and its engine's): the streams it was serving end at
once with an SSE error event (no hang), new requests are answered by the living replica (or, in the moment
before Ray Serve's router learns of the death, a clean 503 `replica_unavailable`), and Ray Serve starts a
replacement. Runs after test_replicas_api.py on the same session deployment; ~30 s beyond its start-up."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import psutil

from tests.conftest import auth

MODEL = "smollm2-135m-instruct"
REPLICA = "x-steerserve-replica"
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story about owls."}],
        "temperature": 0, "max_tokens": 80, "ignore_eos": True, "stream": True}


def stream_one(url: str, key: str, out: dict, started: threading.Event) -> None:
    began = time.monotonic()
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=LONG, headers=auth(key), timeout=120) as r:
            out["replica"], out["status"] = r.headers.get(REPLICA), r.status_code
            out["events"] = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out["events"].append(line[6:])
                    if len(out["events"]) == 3:
                        started.set()
    except httpx.HTTPError as exc:
        out["transport_error"] = repr(exc)
    finally:
        out["seconds"] = time.monotonic() - began
        started.set()


def test_a_killed_replica_fails_its_streams_cleanly_and_is_replaced(replicas, api_keys):
    from ray import serve

    key = api_keys["bob"]
    runs = [({}, threading.Event()) for _ in range(4)]
    threads = [threading.Thread(target=stream_one, args=(replicas.url, key, out, ev), daemon=True)
               for out, ev in runs]
    for t in threads:
        t.start()
    for _, ev in runs:
        assert ev.wait(120)
    by_replica = {out["replica"] for out, _ in runs}
    victim = next(iter(sorted(by_replica)))
    board = replicas.board()
    assert victim in board and len(board) == 2
    process = psutil.Process(board[victim]["pid"])
    engine_processes = process.children(recursive=True)
    killed_at = time.monotonic()
    os.kill(process.pid, signal.SIGKILL)
    for child in engine_processes:  # the whole replica dies, as when its machine or pod goes
        child.kill()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a stream hung after its replica was killed"
    for out, _ in runs:
        assert out["status"] == 200
        if out["replica"] == victim:  # ended with an error event in OpenAI's shape, never [DONE]
            assert "[DONE]" not in out["events"] and "transport_error" not in out, out
            assert json.loads(out["events"][-1])["error"]["code"] == "replica_unavailable"
            assert out["seconds"] < 60
        else:
            assert out["events"][-1] == "[DONE]"
    survivors, statuses = set(), []
    while time.monotonic() - killed_at < 60 and statuses[-3:] != [200] * 3:
        r = httpx.post(f"{replicas.url}/v1/chat/completions", headers=auth(key), timeout=60,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        statuses.append(r.status_code)
        if r.status_code == 200:
            survivors.add(r.headers[REPLICA])
        else:
            assert r.status_code == 503 and r.json()["error"]["code"] == "replica_unavailable", r.text
    assert statuses[-3:] == [200] * 3 and victim not in survivors
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # Ray Serve replaces the dead replica (its engine then loads)
        states = serve.status().applications["steerserve"].deployments["SteerServeReplica"].replica_states
        if sum(states.values()) == 2 and states.get("RUNNING", 0) <= 1:
            break
        time.sleep(1)
    assert sum(states.values()) == 2 and states.get("STARTING", 0) + states.get("PENDING_ALLOCATION", 0) >= 1, states
