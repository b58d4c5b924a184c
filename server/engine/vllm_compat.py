"""Every private vLLM internal steerserve's engine side touches, in one place, and the vLLM versions it is tested on.

The other engine modules reach vLLM's private classes, functions and attributes only through this module (the public
API, `vllm.LLM`, `SamplingParams`, `AsyncEngineArgs`, `AsyncLLM`, stays where it is used). Each accessor names the
file inside the vllm package it mirrors, so a vLLM upgrade is checked here, entry by entry, and the version goes
into `TESTED_VLLM_VERSIONS` only once the engine tests pass on it.

The plugin calls `check_vllm_version()` before it patches anything: on a vLLM not in the list it refuses with
`UntestedVllmError`, unless `STEERSERVE_ALLOW_UNTESTED_VLLM=1` is set, which only logs a warning. vLLM imports are
lazy (inside the accessors), so importing this module is cheap and safe while vLLM loads its plugins.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

log = logging.getLogger("steerserve.vllm_compat")

TESTED_VLLM_VERSIONS: tuple[str, ...] = ("0.32.0",)  # vLLM releases the engine hooks are tested on
ALLOW_UNTESTED_ENV = "STEERSERVE_ALLOW_UNTESTED_VLLM"  # env: "1" patches an untested vLLM anyway, with a warning
# vllm/envs.py: VLLM_USE_V2_MODEL_RUNNER; "0" keeps the V1 model runner, whose logits-processor API we implement.
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


class UntestedVllmError(RuntimeError):
    """The installed vLLM is not one the engine hooks are tested on, and the override is not set."""


# ---- the version check ----

def is_tested_vllm(version: str) -> bool:
    """Whether `version` is a tested release; a local build tag (`0.32.0+cpu`) does not change the release."""
    return version.split("+", 1)[0] in TESTED_VLLM_VERSIONS


def installed_vllm_version() -> str:
    """vllm/version.py: `__version__`, as `vllm` exports it."""
    import vllm

    return str(vllm.__version__)


def check_vllm_version(version: str | None = None, env: Mapping[str, str] | None = None) -> bool:
    """Refuse to patch an untested vLLM. True: `version` (default: the installed one) is tested. False: it is not,
    and `env` (default: os.environ) sets the override, so a warning is logged. Otherwise `UntestedVllmError`,
    whose message names the version, the tested ones and the override."""
    version = installed_vllm_version() if version is None else version
    if is_tested_vllm(version):
        return True
    tested = ", ".join(TESTED_VLLM_VERSIONS)
    env = os.environ if env is None else env
    if env.get(ALLOW_UNTESTED_ENV) == "1":
        log.warning("steerserve: vLLM %s is untested (tested: %s); patching its internals anyway because %s=1",
                    version, tested, ALLOW_UNTESTED_ENV)
        return False
    raise UntestedVllmError(
        f"steerserve's steering hooks patch private vLLM internals and are tested on vLLM {tested} only; this is "
        f"vLLM {version}, so they refuse to install. Install a tested vLLM, or set {ALLOW_UNTESTED_ENV}=1 to "
        f"patch it anyway at your own risk.")


# ---- the model runner (server/engine/forward_hook.py) ----

def model_runner_class() -> type:
    """vllm/v1/worker/gpu_model_runner.py: `GPUModelRunner` (its `_model_forward(self, input_ids, positions, ...)`
    runs after the step's inputs are prepared; CPU's runner subclasses it)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return GPUModelRunner


MODEL_FORWARD = "_model_forward"  # vllm/v1/worker/gpu_model_runner.py: GPUModelRunner._model_forward


def step_row_starts(runner) -> list[int]:
    """vllm/v1/worker/gpu_model_runner.py: `runner.query_start_loc.np` and `runner.input_batch.num_reqs` (from
    vllm/v1/worker/gpu_input_batch.py): row r's tokens are [starts[r], starts[r + 1]) of the step's tokens."""
    return runner.query_start_loc.np[: runner.input_batch.num_reqs + 1].tolist()


def runner_config(runner):
    """vllm/v1/worker/gpu_model_runner.py: `GPUModelRunner.vllm_config`, the engine's `VllmConfig`."""
    return runner.vllm_config


def runner_model(runner):
    """vllm/v1/worker/gpu_model_runner.py: `GPUModelRunner.get_model()`, the loaded torch model."""
    return runner.get_model()


# ---- tensor parallelism (server/engine/tp.py) ----

def tensor_parallel_rank() -> tuple[int, int]:
    """vllm/distributed/parallel_state.py: `get_tensor_model_parallel_rank()` and `..._world_size()` of this
    worker process; (0, 1) where no model-parallel group exists (outside an engine's workers)."""
    from vllm.distributed import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


# ---- the MoE router (server/engine/router_hook.py) ----

def router_class() -> type:
    """vllm/model_executor/layers/fused_moe/router/base_router.py: `BaseRouter`, the base of every MoE router;
    `_select_experts(self, hidden_states, router_logits, topk_indices_dtype=None, **kwargs)` returns
    (weights, ids)."""
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    return BaseRouter


SELECT_EXPERTS = "_select_experts"  # vllm/model_executor/layers/fused_moe/router/base_router.py


def forward_context_layers() -> dict:
    """vllm/forward_context.py: `get_forward_context().no_compile_layers`, layer name -> module of this forward."""
    from vllm.forward_context import get_forward_context

    return get_forward_context().no_compile_layers


def layer_index(layer_name: str) -> int:
    """vllm/model_executor/models/utils.py: `extract_layer_index` (the decoder layer of a module's prefix)."""
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


# ---- attention (server/engine/attention_backend.py) ----

def cpu_attention_classes() -> tuple[type, type]:
    """vllm/v1/attention/backends/cpu_attn.py: `CPUAttentionBackend` and `CPUAttentionBackendImpl` (its
    `forward(layer, query, key, value, kv_cache, attn_metadata, output, ...)`, `attn_type`, `head_size`,
    `num_heads`, `scale`, `sliding_window`, `logits_soft_cap`, `kv_cache_dtype`, `is_fp8_kv_cache`,
    `alibi_slopes`; the metadata's `query_start_loc`, `seq_lens`, `block_table`)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

    return CPUAttentionBackend, CPUAttentionBackendImpl


def current_vllm_config():
    """vllm/config/vllm.py: `get_current_vllm_config()`, the config of the engine being built."""
    from vllm.config import get_current_vllm_config

    return get_current_vllm_config()


def cpu_cache_writer(isa: str) -> Callable:
    """vllm/_custom_ops.py: `cpu_attn_reshape_and_cache`, the CPU kernel's KV cache writer for instruction set
    `isa`, as `write(key, value, key_cache, value_cache, slots)`."""
    from vllm import _custom_ops as ops

    def write(k, v, kc, vc, slots):
        ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")

    return write


def override_cpu_attention(backend_path: str | None) -> None:
    """vllm/v1/attention/backends/registry.py: `register_backend(AttentionBackendEnum.CPU_ATTN, path)`, or with
    None, dropping the entry from `_ATTN_OVERRIDES`; then vllm/v1/attention/selector.py:
    `_cached_get_attn_backend.cache_clear()`, since an engine built earlier in this process cached its choice."""
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES, AttentionBackendEnum, register_backend
    from vllm.v1.attention.selector import _cached_get_attn_backend

    if backend_path is None:
        _ATTN_OVERRIDES.pop(AttentionBackendEnum.CPU_ATTN, None)
    else:
        register_backend(AttentionBackendEnum.CPU_ATTN, backend_path)
    _cached_get_attn_backend.cache_clear()


def cpu_attention_override() -> str | None:
    """vllm/v1/attention/backends/registry.py: `_ATTN_OVERRIDES[CPU_ATTN]`, the class path registered, if any."""
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES, AttentionBackendEnum

    return _ATTN_OVERRIDES.get(AttentionBackendEnum.CPU_ATTN)


def cpu_attention_sub_batch(md, impl, isa: str, dtype, rows, query_start_loc, max_query_len: int):
    """vllm/v1/attention/backends/cpu_attn.py: the step's `CPUAttentionMetadata` restricted to `rows` (a long
    tensor of the step's row indices, in order) whose tokens now start at `query_start_loc` (int32, rows + 1), with
    the scheduler metadata `CPUAttentionMetadataBuilder.build` computes (vllm/_custom_ops.py:
    `cpu_attn_get_scheduler_metadata`, KV split as `envs.VLLM_CPU_ATTN_SPLIT_KV`) rebuilt for those rows, so
    `CPUAttentionBackendImpl.forward` computes only them. `impl` gives the heads, head size, window and KV dtype; `dtype` is the model's (the query's)."""
    import dataclasses

    from vllm import _custom_ops as ops
    from vllm import envs

    seq_lens = md.seq_lens.index_select(0, rows)
    schedule = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(rows), num_heads=impl.num_heads, num_kv_heads=impl.num_kv_heads, head_dim=impl.head_size,
        seq_lens=seq_lens, dtype=dtype, query_start_loc=query_start_loc, causal=md.causal,
        sliding_window_size=impl.sliding_window, isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        dynamic_causal=md.dynamic_causal, kv_cache_dtype=impl.kv_cache_dtype)
    return dataclasses.replace(
        md, num_actual_tokens=int(query_start_loc[-1]), max_query_len=max_query_len, query_start_loc=query_start_loc,
        max_seq_len=int(seq_lens.max()), seq_lens=seq_lens, block_table=md.block_table.index_select(0, rows),
        scheduler_metadata=schedule)


# ---- decoder layers (server/engine/iapt_hook.py) ----

def decoder_layers(model) -> list | None:
    """The decoder layers of a vLLM model, `model.model.layers` (the layout of vllm/model_executor/models/llama.py
    and its kin), whose `forward(positions, hidden_states, residual)` keeps the residual stream as
    `hidden_states + residual`; None if the model has no such list."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else None


# ---- LoRA (server/engine/lora_ops_patch.py) ----

def torch_lora_op_modules() -> tuple:
    """vllm/lora/ops/torch_ops/lora_ops.py (`bgmv_shrink`, `bgmv_expand`, `bgmv_expand_slice` and `sgmv_*`,
    which look the bgmv ops up at call time), and the namespaces that import them by name: vllm/lora/ops/torch_ops/__init__.py and
    vllm/lora/punica_wrapper/punica_cpu.py. The stock module first. ImportError if this vLLM has none."""
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    return (lora_ops, torch_ops, punica_cpu)


# ---- the logits processor (server/engine/processor.py) ----

def logits_processor_api() -> tuple[type, type, type]:
    """vllm/v1/sample/logits_processor/interface.py: `BatchUpdate`, `LogitsProcessor` (`__init__(vllm_config,
    device, is_pin_memory)`, `validate_params`, `update_state`, `apply`, `is_argmax_invariant`) and
    `MoveDirectionality`, as vllm/v1/sample/logits_processor/__init__.py exports them (V1 model runner only)."""
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

    return BatchUpdate, LogitsProcessor, MoveDirectionality


# ---- engines (server/engine/async_engine.py, server/engine/builder.py) ----

def llm_model_config(llm):
    """vllm/entrypoints/llm.py: `LLM.llm_engine.model_config`, the `ModelConfig` of an offline engine."""
    return llm.llm_engine.model_config


def tokens_prompt(prompt_ids: list[int], *, prompt: str | None = None, cache_salt: str | None = None):
    """vllm/inputs/engine.py: `tokens_input`, a prompt given as token ids (with its text and cache salt)."""
    from vllm.inputs.engine import tokens_input

    return tokens_input(prompt_ids, prompt=prompt, cache_salt=cache_salt)


def engine_dead_error() -> type:
    """vllm/v1/engine/exceptions.py: `EngineDeadError`, raised by requests once the engine core has died."""
    from vllm.v1.engine.exceptions import EngineDeadError

    return EngineDeadError


# ---- the GPU attention backends (server/engine/attention_backend_gpu.py, attention_glue.py; experimental) ----

# vllm/platforms/cuda.py `_get_backend_priorities`: for non-MLA models vLLM 0.32 ranks FLASH_ATTN first on SM 8.x/9.x
# (fp16/bf16), then FLASHINFER, then TRITON_ATTN (the one valid for fp32). FLASHINFER (ranked first on SM 10.x) is
# not overridden: there the start-up self-test finds attention steering inactive and turns it off.
GPU_ATTENTION_BACKENDS: tuple[str, ...] = ("FLASH_ATTN", "TRITON_ATTN")


def gpu_attention_classes(name: str) -> tuple[type, type, type]:
    """(backend, impl, metadata builder) of a GPU backend in `GPU_ATTENTION_BACKENDS`:
    vllm/v1/attention/backends/flash_attn.py `FlashAttentionBackend`, `FlashAttentionImpl`,
    `FlashAttentionMetadataBuilder`; vllm/v1/attention/backends/triton_attn.py `TritonAttentionBackend`,
    `TritonAttentionImpl`, `TritonAttentionMetadataBuilder`. Each impl has `forward(layer, query, key, value,
    kv_cache, attn_metadata, output, ...)` writing [tokens, heads, head_size] into `output`, and `attn_type`,
    `num_heads`, `head_size`, `scale`, `sliding_window` ((-1, -1) or (window - 1, 0)), `logits_soft_cap` (0: none),
    `kv_cache_dtype`, `alibi_slopes`, `sinks`; the metadata has `query_start_loc`, `seq_lens`, `block_table`."""
    if name == "FLASH_ATTN":
        from vllm.v1.attention.backends import flash_attn as m

        return m.FlashAttentionBackend, m.FlashAttentionImpl, m.FlashAttentionMetadataBuilder
    if name == "TRITON_ATTN":
        from vllm.v1.attention.backends import triton_attn as m

        return m.TritonAttentionBackend, m.TritonAttentionImpl, m.TritonAttentionMetadataBuilder
    raise ValueError(f"not a GPU attention backend steerserve overrides: {name!r}")


def no_cudagraph_support():
    """vllm/v1/attention/backend.py: `AttentionCGSupport.NEVER`. A builder class attribute `_cudagraph_support`
    with it makes vllm/config/compilation.py `resolve_cudagraph_mode_and_sizes` drop full CUDA graphs to
    PIECEWISE, so attention runs eagerly every step (our host-side row selection must run)."""
    from vllm.v1.attention.backend import AttentionCGSupport

    return AttentionCGSupport.NEVER


def gpu_kv_views(kv_cache, head_size: int):
    """Key and value views [num_blocks, block_size, Hkv, head_size] of a GPU backend's KV cache, as
    FlashAttentionImpl.forward and TritonAttentionImpl.forward take them: `kv_cache` is
    [num_blocks, Hkv, block_size, 2 * head_size], split by `kv_cache.transpose(1, 2).split(head_size, dim=-1)`."""
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key_cache, value_cache


def platform_is_cuda() -> bool:
    """vllm/platforms/__init__.py: `current_platform.is_cuda()`."""
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


def override_gpu_attention(paths: Mapping[str, str] | None) -> None:
    """vllm/v1/attention/backends/registry.py: `register_backend(AttentionBackendEnum[name], path)` for each entry
    (None: drop every `GPU_ATTENTION_BACKENDS` entry from `_ATTN_OVERRIDES`); then vllm/v1/attention/selector.py:
    `_cached_get_attn_backend.cache_clear()`, as `override_cpu_attention`."""
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES, AttentionBackendEnum, register_backend
    from vllm.v1.attention.selector import _cached_get_attn_backend

    if paths is None:
        for name in GPU_ATTENTION_BACKENDS:
            _ATTN_OVERRIDES.pop(AttentionBackendEnum[name], None)
    else:
        for name, path in paths.items():
            register_backend(AttentionBackendEnum[name], path)
    _cached_get_attn_backend.cache_clear()


def attention_backend_class(name: str) -> type:
    """vllm/v1/attention/backends/registry.py: `AttentionBackendEnum[name].get_class()`, the class vLLM's selector
    would load for that backend (our override if one is registered)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum[name].get_class()
