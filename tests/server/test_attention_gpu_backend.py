"""The experimental GPU attention backend, as far as it can be checked without a GPU.

- Selection: vLLM's own CUDA platform selector, under a faked SM 9.0 device, picks FLASH_ATTN for bf16/fp16 and
  TRITON_ATTN for fp32, and our subclasses once `attention_glue.register` ran (only on a CUDA platform: faked here by
  its argument); `unregister` restores vLLM's. The subclasses derive from vLLM's own impls and declare no CUDA-graph
  support.
- The glue: `attention_glue.steer_rows` on CPU tensors in the GPU backends' cache layout ([num_blocks, Hkv,
  block_size, 2 * D], split by `vllm_compat.gpu_kv_views`), with row groups built by the CPU backend's
  `AttentionRows` from per-row bias tables, checked against the independent float64 paged-attention reference of
  tests/kernels; unsteered rows' output is never written. Run with the torch path and with the Triton kernel under
  the interpreter (what runs on a GPU).
- The subclass's forward around vLLM's kernel (stubbed): steered rows overwritten, unsteered rows left to vLLM, and
  a layer it cannot handle switches attention steering off with the reason (fail closed).
About 5 s of test time (importing vLLM's GPU backend modules takes longer on a loaded machine).
"""
from __future__ import annotations

import math
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch

from steerserve.kernels import dispatch
from steerserve.server.engine import attention_glue, vllm_compat
from steerserve.server.engine.attention_backend import AttentionRows, RowSteer
from tests.kernels.interpreter import load_kernels
from tests.kernels.test_attention_kernels import reference_attention

kernels = load_kernels()
HQ, HKV, D, BS, LAYERS = 4, 2, 32, 16, 2


@pytest.fixture
def cuda_platform(monkeypatch):
    """vLLM's CUDA platform module, importable here: its compiled ops module is stubbed (it only registers ops) and
    the device capability faked to SM 9.0 (H100/H200). Removed from sys.modules afterwards."""
    monkeypatch.setitem(sys.modules, "vllm._C_stable_libtorch", ModuleType("vllm._C_stable_libtorch"))
    had = "vllm.platforms.cuda" in sys.modules
    from vllm.platforms import cuda
    from vllm.platforms.interface import DeviceCapability

    monkeypatch.setattr(cuda.CudaPlatform, "get_device_capability",
                        classmethod(lambda cls, device_id=0: DeviceCapability(9, 0)))
    yield cuda
    if not had:
        sys.modules.pop("vllm.platforms.cuda", None)


@pytest.mark.parametrize("dtype, backend", [(torch.bfloat16, "FLASH_ATTN"), (torch.float16, "FLASH_ATTN"),
                                            (torch.float32, "TRITON_ATTN")])
def test_vllms_cuda_selector_picks_our_subclass(cuda_platform, dtype, backend):
    from vllm.v1.attention.selector import AttentionSelectorConfig

    config = AttentionSelectorConfig(head_size=64, dtype=dtype, kv_cache_dtype="auto", block_size=None)
    plain = cuda_platform.CudaPlatform.get_attn_backend_cls(None, config)
    assert plain.rsplit(".", 1)[1] == vllm_compat.gpu_attention_classes(backend)[0].__name__
    try:
        attention_glue.register(is_cuda=True)
        assert cuda_platform.CudaPlatform.get_attn_backend_cls(None, config) == attention_glue.GPU_BACKEND_PATHS[backend]
    finally:
        attention_glue.unregister()
    assert cuda_platform.CudaPlatform.get_attn_backend_cls(None, config) == plain


def test_register_installs_the_subclasses_on_cuda_platforms_only():
    from steerserve.server.engine import attention_backend_gpu as gpu

    plain = {name: vllm_compat.attention_backend_class(name) for name in vllm_compat.GPU_ATTENTION_BACKENDS}
    assert not any(cls.__module__ == gpu.__name__ for cls in plain.values())
    try:
        assert attention_glue.register(is_cuda=False) is False
        assert {n: vllm_compat.attention_backend_class(n) for n in plain} == plain
        assert attention_glue.register(is_cuda=True) is True
        for name, path in attention_glue.GPU_BACKEND_PATHS.items():
            ours = vllm_compat.attention_backend_class(name)
            assert ".".join(ours.full_cls_name()) == path
            base, impl, builder = vllm_compat.gpu_attention_classes(name)
            assert issubclass(ours, base) and ours.get_name() == base.get_name()
            assert issubclass(ours.get_impl_cls(), impl) and ours.get_impl_cls() is not impl
            assert issubclass(ours.get_builder_cls(), builder)
            assert ours.get_builder_cls().get_cudagraph_support(None, None) == vllm_compat.no_cudagraph_support()
    finally:
        attention_glue.unregister()
    assert {n: vllm_compat.attention_backend_class(n) for n in plain} == plain


# (q_len, seq_len, steered) per row: decode rows (steered and not), a steered prefill chunk crossing blocks.
ROWS = [(1, 37, True), (1, 20, False), (1, 50, True), (9, 40, True), (1, 17, True)]


def _step(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q_lens = [ql for ql, _, _ in ROWS]
    blocks_per_row = [math.ceil(sl / BS) for _, sl, _ in ROWS]
    num_blocks = sum(blocks_per_row) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    block_table = torch.zeros(len(ROWS), max(blocks_per_row) + 1, dtype=torch.int32)
    used = 0
    for r, n in enumerate(blocks_per_row):
        block_table[r, :n] = perm[used:used + n]
        used += n
    kv_cache = torch.randn(num_blocks, HKV, BS, 2 * D, generator=gen)  # the GPU backends' cache
    key_cache, value_cache = vllm_compat.gpu_kv_views(kv_cache, D)
    key_cache[block_table[:, 0].long(), 0] *= 3.0  # a strong key 0 (the sink), so gains on it move the output
    md = SimpleNamespace(query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()]),
                         seq_lens=torch.tensor([sl for _, sl, _ in ROWS]), block_table=block_table)
    query = torch.randn(sum(q_lens), HQ, D, generator=gen)
    # Per steered row, per layer: a [heads, keys] bias (sink gains on key 0, a span's ln alpha, random tables).
    steers, key_bias = [], torch.zeros(LAYERS, len(ROWS), HQ, 30)
    for r, (_, _, steered) in enumerate(ROWS):
        if steered:
            biases = [torch.zeros(HQ, 1), torch.randn(HQ, 30, generator=gen)]
            biases[0][:, 0] = torch.tensor([math.log(4.0), math.log(0.25), 0.0, -3.0])
            for layer, b in enumerate(biases):
                key_bias[layer, r, :, : b.shape[1]] = b
            steers.append((r, RowSteer(biases)))
    return query, key_cache, value_cache, md, steers, key_bias


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_steer_rows_in_the_gpu_layout_matches_the_reference(kernel, monkeypatch):
    monkeypatch.setenv(dispatch.KERNEL_ENV, kernel)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    query, key_cache, value_cache, md, steers, key_bias = _step()
    rows = AttentionRows()
    rows.rows = steers
    groups = rows.groups(md)
    assert sorted(len(g.rows) for g in groups) == [1, 3]  # the decode rows in one group, the prefill chunk alone
    qsl, seq_lens = md.query_start_loc.int(), md.seq_lens.int()
    for layer in range(LAYERS):
        sentinel = torch.full((query.shape[0], HQ * D), 1234.5)
        output = sentinel.clone()
        attention_glue.steer_rows(query, key_cache, value_cache, md.block_table, groups, layer, output,
                                  scale=1 / math.sqrt(D))
        ref, _ = reference_attention(query, key_cache, value_cache, md.block_table, qsl, seq_lens, 1 / math.sqrt(D),
                                     key_bias=key_bias[layer])
        plain, _ = reference_attention(query, key_cache, value_cache, md.block_table, qsl, seq_lens, 1 / math.sqrt(D))
        out = output.view(-1, HQ, D)
        for r, (_, _, steered) in enumerate(ROWS):
            tokens = slice(int(qsl[r]), int(qsl[r + 1]))
            if steered:
                torch.testing.assert_close(out[tokens], ref[tokens], atol=1e-5, rtol=0)
                assert (ref[tokens] - plain[tokens]).abs().max() > 1e-2  # the bias moved this row
            else:
                assert torch.equal(output.view(-1, HQ, D)[tokens], sentinel.view(-1, HQ, D)[tokens])


@pytest.mark.parametrize("backend", ["TRITON_ATTN", "FLASH_ATTN"])
def test_the_gpu_impl_overwrites_steered_rows_and_fails_closed(backend, monkeypatch):
    """The subclass's forward around vLLM's kernel (stubbed: it cannot run here; it writes a sentinel as "native"
    output): it finds its engine's rows, overwrites only the steered rows with the reference, and on a layer it
    cannot handle (an fp8 KV cache) switches attention steering off with the reason, leaving vLLM's output alone."""
    from steerserve.server.engine import attention_backend, attention_backend_gpu, faults
    from steerserve.server.engine import state as engine_state

    monkeypatch.setenv(dispatch.KERNEL_ENV, "torch")
    base_impl = vllm_compat.gpu_attention_classes(backend)[1]
    ours = attention_backend_gpu.SteeringTritonAttentionImpl if backend == "TRITON_ATTN" else \
        attention_backend_gpu.SteeringFlashAttentionImpl

    def native(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        return output.fill_(1234.5)

    monkeypatch.setattr(base_impl, "forward", native)
    query, key_cache, value_cache, md, steers, key_bias = _step()
    kv_cache = torch.cat([key_cache, value_cache], dim=-1).transpose(1, 2).contiguous()  # [nb, Hkv, bs, 2D]
    class Owner:  # the steering processor, whose collection drops the state
        pass

    config, owner = SimpleNamespace(), Owner()
    state = engine_state.create(config, owner, (attention_backend.HOOK,))
    state.rows["attention"].rows = steers

    def impl(kv_cache_dtype: str):
        impl = object.__new__(ours)
        impl.__dict__.update(num_heads=HQ, head_size=D, scale=1 / math.sqrt(D), sliding_window=(-1, -1),
                             logits_soft_cap=0, kv_cache_dtype=kv_cache_dtype, alibi_slopes=None, sinks=None,
                             attn_type="decoder", _config=config, _rows=None, _layer=None)
        return impl

    layer = SimpleNamespace(layer_name="model.layers.1.self_attn.attn")
    output = torch.empty(query.shape[0], HQ * D)
    impl("auto").forward(layer, query, None, None, kv_cache, md, output)
    qsl, seq_lens = md.query_start_loc.int(), md.seq_lens.int()
    ref, _ = reference_attention(query, key_cache, value_cache, md.block_table, qsl, seq_lens, 1 / math.sqrt(D),
                                 key_bias=key_bias[1])
    out = output.view(-1, HQ, D)
    for r, (_, _, steered) in enumerate(ROWS):
        tokens = slice(int(qsl[r]), int(qsl[r + 1]))
        if steered:
            torch.testing.assert_close(out[tokens], ref[tokens], atol=1e-5, rtol=0)
        else:
            assert (out[tokens] == 1234.5).all()
    assert state.rows["attention"].off is None

    faults.clear()
    impl("fp8").forward(layer, query, None, None, kv_cache, md, output)
    assert (output == 1234.5).all()
    assert "fp8" in (state.rows["attention"].off or "") and "fp8" in faults.reported().get("attention", "")
    faults.clear()
