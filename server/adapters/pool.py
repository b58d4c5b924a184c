"""The adapter pool: registered adapters -> engine requests, lazy loading, in-flight accounting and its metrics.

Residency is vLLM's: its LRU worker manager keeps up to `max_cpu_loras` adapters in host memory and `max_loras` of
them in the batch's slots, and its scheduler never puts more than `max_loras` adapters in one step (a request for
an adapter that has no slot waits in the queue, it does not fail). An adapter in the running batch is always the
most recently used, so vLLM's LRU never evicts it while its requests run.

What the pool adds: a cold adapter is loaded with `AsyncLLM.add_lora` before its request is submitted (a failing
load is then a clear error for that request, not an exception inside an engine step), timed, and counted; the
engine's resident set is re-read after each load, so an adapter that disappeared from it since the last read
counts as one eviction. An adapter evicted and reloaded by vLLM on its own between two of our reads (possible
when more adapters are wanted at once than `max_cpu_loras`) is not seen: loads and evictions are lower bounds.
A deleted or replaced adapter leaves the engine, and its uploaded files the disk, once its last request is done.

IAPT adapters (server/engine/iapt_hook.py) need no engine slot: each worker loads them on first use into its own LRU of
`max_cpu_loras` adapters, keyed by registration. The pool keeps the same LRU here, so residency, loads and
evictions read the same for both kinds; a cold IAPT adapter is loaded once here first (in a thread), so that
broken files fail this request cleanly instead of inside an engine step.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from steerserve.server.adapters.registry import Adapter, AdapterStore
from steerserve.server.http.errors import APIError, BadRequest
from steerserve.steering.iapt import IaptModel

log = logging.getLogger("steerserve.pool")


class AdapterLoadFailed(APIError):
    status = 500

    def __init__(self, adapter: Adapter, exc: BaseException):
        super().__init__(f"adapter '{adapter.name}' failed to load: {exc}", param="model", code="adapter_load_failed")


@dataclass
class _State:
    adapter: Adapter
    in_flight: int = 0  # requests submitted and not finished
    started: int = 0    # of those, requests that produced output (running, not waiting)
    retired: bool = False


@dataclass
class Lease:
    """One request's use of an adapter: `lora_request` for the engine; `started()` once output flows; `release()`
    exactly once when the request is done."""

    pool: AdapterPool
    state: _State
    lora_request: object
    _started: bool = field(default=False)
    _released: bool = field(default=False)

    @property
    def adapter(self) -> Adapter:
        return self.state.adapter

    def started(self) -> None:
        if not self._started and not self._released:
            self._started = True
            self.state.started += 1

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.state.in_flight -= 1
        self.state.started -= self._started
        self.pool._maybe_retire(self.state)


class AdapterPool:
    def __init__(self, engine, store: AdapterStore, metrics, max_loras: int, max_cpu_loras: int):
        self.engine, self.store, self.metrics, self.max_loras = engine, store, metrics, max_loras
        self.max_cpu_loras = max_cpu_loras
        self._states: dict[int, _State] = {}
        self._resident: set[int] = set()  # LoRA adapters in the engine (vLLM's LRU, re-read after each load)
        self._iapt: OrderedDict[int, None] = OrderedDict()  # IAPT adapters in the workers' LRU, oldest first
        self._loading: dict[int, asyncio.Future] = {}
        self._load_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        metrics.bind_pool(self)

    # --- what the metrics read ---------------------------------------------------------------------------------
    def loaded(self) -> int:
        return len(self._resident) + len(self._iapt)

    def active(self) -> int:
        return sum(1 for s in self._states.values() if s.in_flight)

    # Adapter names as clients write them after "<base>:" (the gateway matches them against requested models).
    def running_names(self) -> list[str]:
        return sorted({s.adapter.name for s in self._states.values() if s.started})

    def waiting_names(self) -> list[str]:
        return sorted({s.adapter.name for s in self._states.values() if s.in_flight > s.started})

    def status(self, adapter: Adapter) -> dict:
        state = self._states.get(adapter.id)
        return {"loaded": adapter.id in self._resident or adapter.id in self._iapt,
                "in_flight": state.in_flight if state else 0}

    # --- requests ----------------------------------------------------------------------------------------------
    async def acquire(self, adapter: Adapter, tenant: str) -> Lease:
        """A lease on `adapter` for one request, after loading it into the engine if it is cold."""
        from vllm.lora.request import LoRARequest

        adapter = self.store.localised(adapter)  # the engine reads this machine's copy
        if adapter.kind not in ("lora", "iapt"):
            raise BadRequest(f"adapter kind {adapter.kind!r} cannot be served yet", param="model")
        if adapter.kind == "iapt" and self.engine.iapt_unsupported:
            raise BadRequest(f"IAPT adapters cannot be served by this engine: {self.engine.iapt_unsupported}",
                             param="model", code="adapter_unsupported")
        state = self._states.setdefault(adapter.id, _State(adapter))
        state.in_flight += 1  # counted before the load, so a concurrent delete waits for this request too
        request = LoRARequest(adapter.engine_name, adapter.id, str(adapter.path)) if adapter.kind == "lora" else None
        try:
            if adapter.id in self._iapt:
                self._iapt.move_to_end(adapter.id)
            elif adapter.id not in self._resident:
                await self._load(adapter, request)
        except BaseException:
            state.in_flight -= 1
            self._maybe_retire(state)
            raise
        self.metrics.count_adapter_request(adapter.name, adapter.scope, tenant)
        return Lease(self, state, request)

    async def _load(self, adapter: Adapter, request) -> None:
        pending = self._loading.get(adapter.id)
        if pending is None:  # the first request for a cold adapter loads it; the others wait on the same load
            pending = self._loading[adapter.id] = asyncio.ensure_future(self._add(adapter, request))
            pending.add_done_callback(lambda _: self._loading.pop(adapter.id, None))
        await asyncio.shield(pending)

    async def _add(self, adapter: Adapter, request) -> None:
        async with self._load_lock:  # one load at a time: the engine loads between steps anyway
            # Fetched into this machine's cache if need be and checked against the recorded sha256s first: a
            # missing or corrupt artifact fails this request (400/503), it never reaches the engine.
            await asyncio.to_thread(self.store.materialise, adapter)
            start = time.perf_counter()
            try:
                if request is None:
                    await asyncio.to_thread(IaptModel.load, adapter.path)
                else:
                    await self.engine.llm.add_lora(request)
            except Exception as exc:
                log.warning("adapter %s failed to load: %s", adapter.engine_name, exc)
                raise AdapterLoadFailed(adapter, exc) from None
            self.metrics.adapter_load_seconds.observe(time.perf_counter() - start)
            self.metrics.adapter_loads.inc()
            if request is None:
                self._iapt[adapter.id] = None
                while len(self._iapt) > self.max_cpu_loras:
                    self._iapt.popitem(last=False)
                    self.metrics.adapter_evictions.inc()
            else:
                await self._refresh()

    async def _refresh(self) -> None:
        # A fresh read of the engine's resident set (engine steps may have run since the load, loading and
        # evicting adapters for queued requests).
        now = set(await self.engine.llm.list_loras())
        evicted = self._resident - now
        if evicted:
            self.metrics.adapter_evictions.inc(len(evicted))
        self._resident = now

    # --- registry changes --------------------------------------------------------------------------------------
    def retire(self, adapter: Adapter) -> None:
        """`adapter` was deleted or replaced: drop it from the engine and its files once no request uses it."""
        state = self._states.setdefault(adapter.id, _State(adapter))
        state.retired = True
        self._maybe_retire(state)

    def _maybe_retire(self, state: _State) -> None:
        if not state.retired or state.in_flight:
            return
        self._states.pop(state.adapter.id, None)
        task = asyncio.ensure_future(self._drop(state.adapter))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drop(self, adapter: Adapter) -> None:
        self._iapt.pop(adapter.id, None)
        if self.store.get(adapter.tenant, adapter.name) is None:  # deleted, not replaced: its series go too
            self.metrics.forget_adapter(adapter.name, adapter.scope, adapter.tenant)
        try:
            if adapter.id in self._resident:
                await self.engine.llm.remove_lora(adapter.id)
                self._resident.discard(adapter.id)
        except Exception:  # the engine forgets it on its own (LRU); the files still go
            log.exception("could not remove adapter %s from the engine", adapter.engine_name)
        self.store.remove_files(adapter)
