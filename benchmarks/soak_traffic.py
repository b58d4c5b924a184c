"""The soak run's traffic: request kinds, each one request that returns a record of what happened.

Kinds (and what counts as served as expected, "ok"):

    plain          chat, greedy, unsteered, not streamed: 200, and the text equal to the unloaded run's
    completions    /v1/completions, greedy, unsteered: 200, and the text equal to the unloaded run's
    stream         chat, greedy, unsteered, streamed: 200, a complete stream, the text equal to `plain`'s
    steered        chat with one steering method (every method the served model supports, in turn): 200 and
                   X-Steering-Applied naming the method
    adapter-lora   chat on the tenant's own uploaded LoRA adapter: 200 and X-Adapter-Applied naming it
    adapter-iapt   the same with the tenant's IAPT adapter
    disconnect     the client goes away: a stream closed after its first token, or a non-streamed request
                   abandoned after `DISCONNECT_AFTER_S`
    bad            bad input, one case in turn (BAD_CORE, plus BAD_LIMITS with --bad-input all): a 4xx in
                   OpenAI's error shape

Every record: kind, detail (method, adapter or case), tenant, t_start/t_end (seconds on the supervisor's clock),
status (HTTP status, or None when no response came), outcome, error, text (greedy kinds), ttft (streams).
Outcomes: "ok", "mismatch" (greedy text differs from the unloaded run), "5xx", "unexpected_status",
"accepted_bad_input" (a bad input answered 2xx), "bad_error_shape", "stream_error", "connection_error".
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

GREEDY_PROMPTS = ["What is the capital of France?", "Name three colours.", "How are clouds formed?",
                  "Write a haiku about autumn."]
GREEDY_MAX_TOKENS = 16
DISCONNECT_AFTER_S = 0.5

# One spec per steering method, for SmolLM2-sized models (with `method_specs`, which adds the control vectors);
# the soak's set-up keeps the ones the served model takes.
METHOD_SPECS = {
    "logits.bias": {"logits": {"bias": {" Paris": 2.0, " the": -1.0}}},
    "logits.rules": {"logits": {"rules": {"preset": "hewitt2024"}}},
    "attention.sink": {"attention": {"sink": {"gamma": 0.4, "heads": [1, 4, 7]}}},
    "attention.spans": {"attention": {"spans": [{"target": "user", "alpha": 0.9}]}},
    "attention.mode": {"attention": {"mode": {"kind": "lssar", "power": 15}}},
    "experts": {"experts": {"off": ["0.0"]}},
    "prompt.urial": {"prompt": {"urial": {"variant": "help"}}},
    "prompt.conjugate": {"prompt": {"conjugate": {"language": "leetspeak"}}},
}


def method_specs(model_dir) -> dict[str, dict]:
    """METHOD_SPECS plus the control vectors, whose inline directions need the model's hidden size: a seeded
    random direction at the middle layer, added (unit length, scale 4) or ablated."""
    import random
    from pathlib import Path

    config = json.loads((Path(model_dir) / "config.json").read_text())
    rng = random.Random(0)
    data = {str(config["num_hidden_layers"] // 2): [round(rng.gauss(0, 1), 4) for _ in range(config["hidden_size"])]}
    return {**METHOD_SPECS, "vectors.add": {"vectors": [{"data": data, "scale": 4.0, "normalize": True}]},
            "vectors.ablate": {"vectors": [{"data": data, "mode": "ablate"}]}}


def _chat(model: str, content: str, max_tokens: int = GREEDY_MAX_TOKENS, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens, **extra}


@dataclass(frozen=True)
class BadCase:
    """One bad input: the body (bytes, or a dict sent as JSON), extra headers, the route."""

    name: str
    body: Callable[[str, Ctx], bytes | dict]
    headers: dict = field(default_factory=dict)
    path: str = "/v1/chat/completions"
    auth: bool = True


def _raw(text: str) -> Callable[[str, object], bytes]:
    return lambda model, ctx: text.encode()


BAD_CORE = [
    BadCase("malformed_json", _raw('{"model": "m", "messages": [')),
    BadCase("wrong_type", lambda m, c: {**_chat(m, "Hi"), "max_tokens": "ten"}),
    BadCase("unknown_field", lambda m, c: {**_chat(m, "Hi"), "frobnicate": 1}),
    BadCase("negative_max_tokens", lambda m, c: _chat(m, "Hi", max_tokens=-5)),
    BadCase("bad_temperature", lambda m, c: {**_chat(m, "Hi"), "temperature": -1}),
    BadCase("empty_messages", lambda m, c: {"model": m, "messages": [], "max_tokens": 4}),
    BadCase("bad_role", lambda m, c: {"model": m, "messages": [{"role": "wizard", "content": "Hi"}]}),
    BadCase("unknown_model", lambda m, c: _chat("no-such-model", "Hi")),
    BadCase("bad_steering", lambda m, c: _chat(m, "Hi", steering={"logits": {"bias": {"x": "big"}}})),
    BadCase("unknown_steering_method", lambda m, c: _chat(m, "Hi", steering={"logits": {"frob": {}}})),
    BadCase("bad_steering_header", lambda m, c: _chat(m, "Hi"), headers={"X-Steering": "{not json"}),
    BadCase("over_context", lambda m, c: _chat(m, "word " * 3000)),
    BadCase("wrong_key", lambda m, c: _chat(m, "Hi"), headers={"Authorization": "Bearer sk-steer-wrong"},
            auth=False),
    BadCase("other_tenants_adapter", lambda m, c: _chat(f"{m}:{c.foreign_adapter}", "Hi")),
    BadCase("prompt_method_on_completions", lambda m, c: {"model": m, "prompt": "Hi", "max_tokens": 4,
                                                          "steering": METHOD_SPECS["prompt.urial"]},
            path="/v1/completions"),
]
# The input limits of issue #17: a 500 or a 200 on servers without them.
BAD_LIMITS = [
    BadCase("deep_json", lambda m, c: b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    BadCase("huge_integer", lambda m, c: json.dumps(_chat(m, "Hi")).replace(
        f'"max_tokens": {GREEDY_MAX_TOKENS}', '"max_tokens": ' + "9" * 5000).encode()),
    BadCase("lone_surrogate", lambda m, c: json.dumps(_chat(m, "Hi")).replace('"Hi"', '"\\ud800"').encode()),
    BadCase("json_as_text_plain", lambda m, c: json.dumps(_chat(m, "Hi")).encode(),
            headers={"Content-Type": "text/plain"}),
]


@dataclass
class Ctx:
    """What every request needs: the clock, the model, the tenants' keys and adapters, the baseline texts."""

    url: str
    model: str
    clock: Callable[[], float]
    incarnation: Callable[[], int]
    keys: dict[str, str]  # tenant -> key (the admin's under "ops")
    adapters: dict[str, dict[str, str]]  # tenant -> {"lora": name, "iapt": name}
    methods: list[str]  # steering methods the served model takes
    specs: dict[str, dict]  # method -> the steering spec its requests carry
    bad_cases: list[BadCase]
    baseline: dict[tuple[str, str], str] = field(default_factory=dict)  # (route, prompt) -> greedy text
    refused_methods: dict[str, str] = field(default_factory=dict)  # method -> the server's 400 message
    foreign_adapter: str = ""  # an adapter of a tenant the traffic never acts as
    counters: dict[str, int] = field(default_factory=dict)

    def next(self, kind: str) -> int:
        """The number of earlier requests of `kind`: each kind cycles through its prompts, methods or cases."""
        n = self.counters.get(kind, 0)
        self.counters[kind] = n + 1
        return n


def applies(header: str, method: str) -> bool:
    """Whether X-Steering-Applied (`<fingerprint>; methods=a.b,c.d[; experimental=...]`) names `method` (a
    `family.method` name, or a family such as `experts`, whose methods are named `experts.off` and so on)."""
    names = header.split("methods=")[-1].split(";")[0].split(",") if "methods=" in header else []
    return any(n == method or n.startswith(f"{method}.") for n in names)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def error_shaped(resp: httpx.Response) -> bool:
    """OpenAI's error shape: {"error": {"message": str, "type": str, ...}}."""
    try:
        err = resp.json()["error"]
        return isinstance(err["message"], str) and isinstance(err["type"], str)
    except (ValueError, KeyError, TypeError):
        return False


def classify(status: int | None, *, bad: bool, shaped: bool = True) -> str:
    if status is None:
        return "connection_error"
    if status >= 500:
        return "5xx"
    if bad:
        if 400 <= status < 500:
            return "ok" if shaped else "bad_error_shape"
        return "accepted_bad_input"
    return "ok" if status == 200 else "unexpected_status"


async def plain(client: httpx.AsyncClient, ctx: Ctx, tenant: str, i: int) -> dict:
    prompt = GREEDY_PROMPTS[i % len(GREEDY_PROMPTS)]
    r = await client.post(f"{ctx.url}/v1/chat/completions", json=_chat(ctx.model, prompt), headers=auth(ctx.keys[tenant]))
    rec = {"detail": prompt, "status": r.status_code, "outcome": classify(r.status_code, bad=False)}
    if r.status_code == 200:
        rec["text"] = r.json()["choices"][0]["message"]["content"]
        if rec["text"] != ctx.baseline.get(("chat", prompt)):
            rec["outcome"] = "mismatch"
    else:
        rec["error"] = r.text[:300]
    return rec


async def completions(client: httpx.AsyncClient, ctx: Ctx, tenant: str, i: int) -> dict:
    prompt = GREEDY_PROMPTS[i % len(GREEDY_PROMPTS)]
    body = {"model": ctx.model, "prompt": prompt, "temperature": 0, "max_tokens": GREEDY_MAX_TOKENS}
    r = await client.post(f"{ctx.url}/v1/completions", json=body, headers=auth(ctx.keys[tenant]))
    rec = {"detail": prompt, "status": r.status_code, "outcome": classify(r.status_code, bad=False)}
    if r.status_code == 200:
        rec["text"] = r.json()["choices"][0]["text"]
        if rec["text"] != ctx.baseline.get(("completions", prompt)):
            rec["outcome"] = "mismatch"
    else:
        rec["error"] = r.text[:300]
    return rec


async def _stream(client: httpx.AsyncClient, ctx: Ctx, tenant: str, body: dict, t0: float,
                  stop_after_first: bool = False) -> dict:
    """One streamed chat: status, text, ttft, whether [DONE] came (or, with `stop_after_first`, the close)."""
    rec: dict = {"status": None, "text": "", "ttft": None, "done": False}
    async with client.stream("POST", f"{ctx.url}/v1/chat/completions", json={**body, "stream": True},
                             headers=auth(ctx.keys[tenant])) as resp:
        rec["status"] = resp.status_code
        if resp.status_code != 200:
            rec["error"] = (await resp.aread()).decode(errors="replace")[:300]
            return rec
        async for line in resp.aiter_lines():
            if line == "data: [DONE]":
                rec["done"] = True
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if "error" in data:
                    rec["error"] = json.dumps(data["error"])[:300]
                for choice in data.get("choices") or []:
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        rec["ttft"] = rec["ttft"] if rec["ttft"] is not None else ctx.clock() - t0
                        rec["text"] += piece
                if stop_after_first and rec["text"]:
                    return rec  # leaving the block closes the connection mid-stream
    return rec


async def stream(client: httpx.AsyncClient, ctx: Ctx, tenant: str, i: int) -> dict:
    prompt = GREEDY_PROMPTS[i % len(GREEDY_PROMPTS)]
    rec = await _stream(client, ctx, tenant, _chat(ctx.model, prompt), ctx.clock())
    rec["detail"] = prompt
    rec["outcome"] = classify(rec["status"], bad=False)
    if rec["outcome"] == "ok":
        if "error" in rec or not rec.pop("done"):
            rec["outcome"] = "stream_error"
        elif rec["text"] != ctx.baseline.get(("chat", prompt)):
            rec["outcome"] = "mismatch"
    rec.pop("done", None)
    return rec


async def steered(client: httpx.AsyncClient, ctx: Ctx, tenant: str, i: int) -> dict:
    method = ctx.methods[i % len(ctx.methods)]
    prompt = GREEDY_PROMPTS[i % len(GREEDY_PROMPTS)]
    r = await client.post(f"{ctx.url}/v1/chat/completions", headers=auth(ctx.keys[tenant]),
                          json=_chat(ctx.model, prompt, steering=ctx.specs[method]))
    rec = {"detail": method, "status": r.status_code, "outcome": classify(r.status_code, bad=False)}
    applied = r.headers.get("x-steering-applied", "")
    if rec["outcome"] == "ok" and not applies(applied, method):
        rec["outcome"], rec["error"] = "unexpected_status", f"not applied: X-Steering-Applied={applied!r}"
    elif r.status_code != 200:
        rec["error"] = r.text[:300]
    return rec


def adapter(kind: str):
    async def run(client: httpx.AsyncClient, ctx: Ctx, tenant: str, i: int) -> dict:
        name = ctx.adapters[tenant][kind]
        prompt = GREEDY_PROMPTS[i % len(GREEDY_PROMPTS)]
        r = await client.post(f"{ctx.url}/v1/chat/completions", json=_chat(f"{ctx.model}:{name}", prompt),
                              headers=auth(ctx.keys[tenant]))
        rec = {"detail": name, "status": r.status_code, "outcome": classify(r.status_code, bad=False)}
        if rec["outcome"] == "ok" and not r.headers.get("x-adapter-applied", "").startswith(f"{name};"):
            rec["outcome"], rec["error"] = "unexpected_status", "X-Adapter-Applied missing"
        elif r.status_code != 200:
            rec["error"] = r.text[:300]
        return rec
    return run


async def disconnect(client: httpx.AsyncClient, ctx: Ctx, tenant: str, i: int) -> dict:
    """Alternately: a stream closed after its first token; a non-streamed request abandoned after a moment."""
    body = _chat(ctx.model, GREEDY_PROMPTS[i % len(GREEDY_PROMPTS)], max_tokens=64, ignore_eos=True)
    if i % 2 == 0:
        rec = await _stream(client, ctx, tenant, body, ctx.clock(), stop_after_first=True)
        rec.pop("done")
        rec["detail"] = "stream closed after the first token"
        rec["outcome"] = classify(rec["status"], bad=False)
        return rec
    try:
        r = await client.post(f"{ctx.url}/v1/chat/completions", json=body, headers=auth(ctx.keys[tenant]),
                              timeout=httpx.Timeout(DISCONNECT_AFTER_S, connect=5))
    except httpx.ReadTimeout:
        return {"detail": "abandoned while waiting", "status": None, "outcome": "ok"}
    return {"detail": "abandoned while waiting (finished first)", "status": r.status_code,
            "outcome": classify(r.status_code, bad=False), "error": None if r.status_code == 200 else r.text[:300]}


async def bad(client: httpx.AsyncClient, ctx: Ctx, tenant: str, i: int) -> dict:
    case = ctx.bad_cases[i % len(ctx.bad_cases)]
    body = case.body(ctx.model, ctx)
    headers = {**(auth(ctx.keys[tenant]) if case.auth else {}), **case.headers}
    if isinstance(body, dict):
        r = await client.post(f"{ctx.url}{case.path}", json=body, headers=headers)
    else:
        r = await client.post(f"{ctx.url}{case.path}", content=body,
                              headers={"Content-Type": "application/json", **headers})
    rec = {"detail": case.name, "status": r.status_code,
           "outcome": classify(r.status_code, bad=True, shaped=error_shaped(r))}
    if rec["outcome"] != "ok":
        rec["error"] = r.text[:300]
    return rec


KINDS: dict[str, Callable[[httpx.AsyncClient, Ctx, str, int], Awaitable[dict]]] = {
    "plain": plain, "completions": completions, "stream": stream, "steered": steered,
    "adapter-lora": adapter("lora"), "adapter-iapt": adapter("iapt"), "disconnect": disconnect, "bad": bad}
# Relative frequency of each kind in the mix.
MIX = {"plain": 3, "completions": 1, "stream": 2, "steered": 4, "adapter-lora": 1, "adapter-iapt": 1,
       "disconnect": 1, "bad": 2}


async def one(client: httpx.AsyncClient, ctx: Ctx, kind: str, tenant: str) -> dict:
    """Run one request of `kind` as `tenant`; never raises (a transport error is an outcome)."""
    i = ctx.next(kind)
    start, incarnation = ctx.clock(), ctx.incarnation()
    try:
        rec = await KINDS[kind](client, ctx, tenant, i)
    except httpx.HTTPError as exc:
        rec = {"status": None, "outcome": "connection_error", "error": f"{type(exc).__name__}: {exc}"[:300]}
    except (ValueError, KeyError) as exc:  # an answer we could not read (bad JSON, missing field)
        rec = {"status": None, "outcome": "unexpected_status", "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"kind": kind, "tenant": tenant, "t_start": round(start, 3), "t_end": round(ctx.clock(), 3),
            "incarnation": incarnation, "detail": None, "error": None, **rec}


async def worker(client: httpx.AsyncClient, ctx: Ctx, tenant: str, kinds: list[str], records: list[dict],
                 until: Callable[[], bool], seed: int) -> None:
    """Closed loop for one tenant: the next request when the last one is done, kinds in a seeded shuffle of
    `kinds` repeated (so every kind comes within one round), a pause after anything but the expected answer so
    that a server that is down or starting (503 at once) is not hammered."""
    import random

    rng, todo = random.Random(seed), []
    while not until():
        if not todo:
            todo = rng.sample(kinds, len(kinds))
        rec = await one(client, ctx, todo.pop(), tenant)
        records.append(rec)
        if rec["outcome"] != "ok":
            await asyncio.sleep(1.0)


def mix() -> list[str]:
    return [k for k, w in MIX.items() for _ in range(w)]
