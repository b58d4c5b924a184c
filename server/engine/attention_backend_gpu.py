"""EXPERIMENTAL, never run on a GPU: attention steering inside vLLM's GPU attention backends.

vLLM 0.32 picks FLASH_ATTN for non-MLA models on SM 8.x/9.x GPUs in fp16/bf16 and TRITON_ATTN where FlashAttention
cannot run (fp32 among others); `attention_glue.register` overrides both entries on CUDA platforms with the thin
subclasses below. Each runs vLLM's own kernel for the whole batch, then overwrites the steered rows' output with their
exact biased attention from the Triton kernel (`attention_glue.steer_rows` -> `kernels.dispatch`), reading the same
paged cache, like the CPU backend does with its torch path. The rows come from the same `AttentionRows` the steering
processor publishes, so the engine's start-up self-test (an extreme sink gain must change the output, else attention
steering is turned off) covers this backend too. A failure never raises in the engine step: attention steering is
switched off and the fault reported.

Their metadata builders declare no CUDA-graph support, so vLLM runs full-graph modes as PIECEWISE (attention eager
every step: the steered rows are chosen on the host per step). What cannot be tested without a GPU is said in
docs/internals.md; benchmarks/gpu_attention.py times the kernels on a GPU.
"""
from __future__ import annotations

from . import attention_glue, vllm_compat
from . import state as engine_state


def _steering_impl(base: type) -> type:
    class SteeringGPUImpl(base):
        """vLLM's GPU attention, plus the exact recomputation of attention-steered rows (Triton)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._config = vllm_compat.current_vllm_config()
            self._rows = None
            self._layer: int | None = None

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
            output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
            if self._rows is None and (state := engine_state.of(self._config)) is not None:
                self._rows = state.rows["attention"]
            rows = self._rows
            if attn_metadata is None or rows is None or not rows.rows or rows.off or self.attn_type != "decoder":
                return output
            try:
                if self._layer is None:
                    self._layer = vllm_compat.layer_index(layer.layer_name)
                attention_glue.check_supported(str(self.kv_cache_dtype), self.alibi_slopes,
                                               getattr(self, "sinks", None))
                if kwargs.get("output_scale") is not None or (args and args[0] is not None):
                    raise RuntimeError("attention steering cannot write a quantized (fused output scale) output")
                key_cache, value_cache = vllm_compat.gpu_kv_views(kv_cache, self.head_size)
                attention_glue.steer_rows(
                    query, key_cache, value_cache, attn_metadata.block_table, rows.groups(attn_metadata),
                    self._layer, output, scale=self.scale, sliding_window=attention_glue.window_of(self.sliding_window),
                    softcap=float(self.logits_soft_cap or 0.0))
            except Exception as exc:  # noqa: BLE001 - never kill the engine: switch the method off, report why
                rows.switch_off(f"{type(exc).__name__}: {exc}")
            return output

    SteeringGPUImpl.__name__ = SteeringGPUImpl.__qualname__ = f"Steering{base.__name__}"
    return SteeringGPUImpl


def _steering_backend(name: str) -> tuple[type, type, type]:
    backend, impl, builder = vllm_compat.gpu_attention_classes(name)
    steering_impl = _steering_impl(impl)
    steering_builder = type(f"Steering{builder.__name__}", (builder,),
                            {"_cudagraph_support": vllm_compat.no_cudagraph_support(), "__module__": __name__})
    steering_impl.__module__ = __name__
    steering_backend = type(f"Steering{backend.__name__}", (backend,), {
        "get_impl_cls": staticmethod(lambda: steering_impl),
        "get_builder_cls": staticmethod(lambda: steering_builder),
        "__module__": __name__,
    })
    return steering_backend, steering_impl, steering_builder


# The paths in attention_glue.GPU_BACKEND_PATHS.
SteeringFlashAttentionBackend, SteeringFlashAttentionImpl, SteeringFlashAttentionMetadataBuilder = \
    _steering_backend("FLASH_ATTN")
SteeringTritonAttentionBackend, SteeringTritonAttentionImpl, SteeringTritonAttentionMetadataBuilder = \
    _steering_backend("TRITON_ATTN")
