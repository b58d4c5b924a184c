"""The engine wrapper: one vLLM AsyncLLM, the served model's facts, and request submission by token ids."""
from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

from steerserve.steering.methods import METHODS, Method, Probe
from steerserve.steering.model import ModelFacts
from steerserve.steering.plan import Plan

from ..settings import Settings
from . import faults, tp, vllm_compat
from . import iapt_hook as iapt
from .router_hook import STATS_DIR

log = logging.getLogger("steerserve.engine")


class EngineDied(RuntimeError):
    """The engine died while the server was starting: the process must exit, not serve."""


@dataclass(frozen=True)
class ModelInfo:
    """What the HTTP layer needs to know about the served model."""

    name: str
    path: Path
    max_model_len: int
    vocab_size: int


class Engine:
    """Owns the AsyncLLM. Prompts arrive already tokenized, so the server controls exactly what the model sees."""

    def __init__(self, settings: Settings, model_path: Path, logits_processor: type | None = None):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from . import plugin
        from .processor import SteeringLogitsProcessor

        # Enables our vLLM plugin in this process and the engine processes it spawns; the plugin is loaded by
        # vLLM itself, but call it here too so the env it sets is in place before the config is built.
        plugin.enable()
        # Workers publish per-request routed-expert counts (steering_stats) as files here; inherited by them.
        if not os.environ.get(STATS_DIR):
            shm = Path("/dev/shm")
            os.environ[STATS_DIR] = tempfile.mkdtemp(prefix="steerserve-stats-", dir=shm if shm.is_dir() else None)
        if settings.enable_lora:  # IAPT adapters each worker keeps loaded, like vLLM's LoRA host cache
            os.environ[iapt.CACHE_ENV] = str(lora_args(settings)["max_cpu_loras"])
        if settings.tensor_parallel_size > 1:  # vLLM-CPU binds each rank's threads to its own cores
            tp.bind_cpus(settings.tensor_parallel_size)
        name = settings.served_model_name or model_path.name
        args = AsyncEngineArgs(
            model=str(model_path),
            served_model_name=name,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            kv_cache_memory_bytes=int(settings.kv_cache_gib * 2**30),
            enable_prefix_caching=settings.enable_prefix_caching,
            enforce_eager=settings.enforce_eager,
            tensor_parallel_size=settings.tensor_parallel_size,
            seed=settings.seed,
            disable_log_stats=True,
            logits_processors=[logits_processor or SteeringLogitsProcessor],
            # logprobs of the distribution actually sampled from, i.e. with logits steering applied
            logprobs_mode="processed_logprobs",
            **lora_args(settings),
        )
        log.info("starting vLLM on %s (dtype=%s, max_model_len=%d)", model_path, settings.dtype, settings.max_model_len)
        self.llm = AsyncLLM.from_engine_args(args)
        self.tokenizer = self.llm.get_tokenizer()
        config = self.llm.model_config
        self.info = ModelInfo(
            name=name, path=model_path, max_model_len=config.max_model_len, vocab_size=config.get_vocab_size()
        )
        # Adapters: the engine's LoRA limits, or None when this engine serves the base model only.
        self.lora = lora_args(settings) or None
        # A model trained with another attention function (docs/methods/attention-modes.md) gets it on every request, as the
        # first steering source; a request can still override it (that, like any per-request mode, is
        # reported as experimental).
        self.model_steering = ({"attention": {"mode": {"kind": settings.attention_mode,
                                                       "power": settings.attention_mode_power}}}
                               if settings.attention_mode != "softmax" else None)
        self._facts = model_facts(self.tokenizer, config, model_path)
        if not self.lora:
            self._switch_off("iapt", "adapters are off")

    @property
    def facts(self) -> ModelFacts:
        """The served model's facts, with every method the engine switched off since start-up (a hook fault,
        server/engine/faults.py) marked unsupported: from then on its requests get a 400 instead of being served
        unsteered."""
        found = {family: f"it was switched off after an engine fault: {reason}"
                 for family, reason in faults.reported().items() if family not in self._facts.unsupported}
        return replace(self._facts, unsupported={**self._facts.unsupported, **found}) if found else self._facts

    @facts.setter
    def facts(self, value: ModelFacts) -> None:
        self._facts = value

    @property
    def iapt_unsupported(self) -> str | None:
        """Why IAPT adapters cannot be served here (None: they can); set by the start-up self-test, or a fault."""
        return self.facts.unsupported.get("iapt")

    def _switch_off(self, family: str, reason: str) -> None:
        self._facts = replace(self._facts, unsupported={**self._facts.unsupported, family: reason})

    def generate(self, prompt_ids: list[int], params, request_id: str, *, prompt_text: str | None = None,
                 cache_salt: str | None = None, lora_request=None) -> AsyncIterator:
        """RequestOutputs for one request. Closing or cancelling the iterator aborts it in the engine."""
        prompt = vllm_compat.tokens_prompt(prompt_ids, prompt=prompt_text, cache_salt=cache_salt)
        return self.llm.generate(prompt, params, request_id, lora_request=lora_request)

    async def verify_steering(self) -> None:
        """Fail closed: prove on real requests that the worker-side hooks fire. Without the logits hook the server
        refuses to serve. Every other method's probe runs guarded (`_guarded`): if it fails or does not move the
        output, that method is switched off with its reason (its requests get a 400 that says why) and everything
        else is served. If the engine itself dies, `EngineDied` is raised: the server must not stay up."""
        from vllm.sampling_params import SamplingParams

        faults.clear()

        async def first_token(prompt: list[int], plan: Plan | None = None) -> tuple[int, float]:
            params = SamplingParams(max_tokens=1, temperature=0, logprobs=0,
                                    extra_args=plan.to_extra_args() if plan else None,
                                    skip_reading_prefix_cache=not reads_prefix_cache(plan))
            async for out in self.generate(prompt, params, f"steerserve-selftest-{uuid.uuid4().hex}"):
                c = out.outputs[0]
            return c.token_ids[0], c.logprobs[0][c.token_ids[0]].logprob

        hf = self.llm.model_config.hf_text_config
        for method in METHODS:
            if method.self_test is None or method.family in self.facts.unsupported or not method.available(self.facts):
                continue
            probe = Probe(self.facts, hf.hidden_size, first_token)
            if method.required:
                await self._required(method, probe)
            elif reason := await self._guarded(method.family, lambda m=method, p=probe: m.self_test(p)):
                self._switch_off(method.family, reason)
        log.info("steering self-test passed: worker hooks are active")

    async def _required(self, method: Method, probe: Probe) -> None:
        """A method the server cannot serve without (logits): its probe must pass, or the server refuses to
        serve at all."""
        try:
            moved = await method.self_test(probe)
        except Exception as exc:
            self._raise_if_dead(exc)
            raise
        if not moved:
            raise RuntimeError("steering hooks are not active in this vLLM model runner; refusing to serve")

    async def _guarded(self, method: str, moves) -> str | None:
        """Run one method's start-up probe (`moves()`: whether steering changed the output). Returns why the
        method must be switched off, or None if it works. Re-raises only if the engine died."""
        try:
            moved, error = await moves(), None
        except Exception as exc:  # noqa: BLE001 - any failure of the probe means: not available
            self._raise_if_dead(exc)
            moved, error = False, f"{type(exc).__name__}: {exc}"
        fault = faults.reported().get(method)
        if moved and fault is None:
            return None
        reason = f"its start-up self-test {'failed: ' + (fault or error) if fault or error else 'was not steered'}"
        log.warning("%s steering is OFF: %s", method, reason)
        return reason

    def _raise_if_dead(self, exc: Exception) -> None:
        if isinstance(exc, vllm_compat.engine_dead_error()) or self.llm.errored:
            raise EngineDied(f"the engine died during the start-up self-test: {type(exc).__name__}: {exc}") from exc

    def dead(self) -> str | None:
        """Why the engine can no longer serve (its core process died, or it failed), or None while it runs. Cheap:
        vLLM's own monitor thread notices the engine core process exit and sets the flag this reads."""
        return "the engine stopped (its core process died or failed)" if self.llm.errored else None

    def num_unfinished_requests(self) -> int:
        return self.llm.get_num_unfinished_requests()

    async def check_health(self) -> None:
        await self.llm.check_health()

    def shutdown(self) -> None:
        self.llm.shutdown()


def lora_args(settings: Settings) -> dict:
    """vLLM's LoRA engine arguments from our settings (none when adapters are off)."""
    if not settings.enable_lora:
        return {}
    return {"enable_lora": True, "max_loras": settings.max_loras, "max_lora_rank": settings.max_lora_rank,
            "max_cpu_loras": settings.max_cpu_loras or 4 * settings.max_loras}


def _eos_token_ids(tokenizer, model_path: Path) -> tuple[int, ...]:
    """End-of-sequence ids: the tokenizer's and generation_config.json's (chat models end turns there)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gen_config = model_path / "generation_config.json"
    if gen_config.is_file():
        eos = json.loads(gen_config.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    return tuple(dict.fromkeys(ids))


def reads_prefix_cache(plan: Plan | None) -> bool:
    """False when a part of the plan cannot use cached blocks (an IAPT adapter's pooling needs hidden states)."""
    return plan is None or all(getattr(p, "READS_PREFIX_CACHE", True) for p in plan.parts.values())


def model_facts(tokenizer, model_config, model_path: Path) -> ModelFacts:
    """What steering needs to know about a model vLLM has loaded (the server's engine, calibration, benchmarks):
    the common facts, and each registered method's (`Method.facts`)."""
    hf = model_config.hf_text_config
    extra: dict = {"unsupported": {}}
    for method in METHODS:
        found = method.facts(hf, model_config) if method.facts else {}
        extra["unsupported"] |= found.pop("unsupported", {})
        extra.setdefault("extra", {}).update(found.pop("extra", {}))
        extra |= found
    return ModelFacts(
        tokenizer, model_config.get_vocab_size(), _eos_token_ids(tokenizer, Path(model_path)),
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", hf.num_attention_heads), **extra)
