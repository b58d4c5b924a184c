"""Case (d) of benchmarks/gpu_attention.py: the experimental GPU attention backend inside GPU vLLM
(server/engine/attention_backend_gpu.py), on a real model. Needs steerserve installed with vLLM for CUDA
(`pip install -e ".[gpu]"`), so it runs only with `--engine MODEL`; never run yet (no GPU in this workplace).

It records: which attention backend class vLLM built (ours, over FLASH_ATTN or TRITON_ATTN), the CUDA-graph mode
vLLM resolved (full graphs drop to PIECEWISE), whether the start-up self-test's steering (gamma = e^-20 on every head)
changes the greedy output (else attention steering is off on this GPU), whether a fault switched attention steering
off, and generation throughput with 0 %, 50 % and 100 % of rows sink-steered (gamma in [0.5, 2], K = 8 configs).
"""
from __future__ import annotations

import math
import os
import time

CASES = ((0.0, 0), (0.5, 8), (1.0, 1), (1.0, 8))  # (fraction steered, distinct configs)


def engine_case(model: str, dtype: str = "bfloat16", rows: int = 32, tokens: int = 128, repeats: int = 2,
                **engine_kwargs) -> dict:
    """The report of case (d); `engine_kwargs` go to `vllm.LLM` (e.g. enforce_eager=True for a CPU smoke run)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process, as the server's engine: inspectable
    from vllm import SamplingParams

    from steerserve.server.engine import faults
    from steerserve.server.engine.builder import llm_facts, open_steering_llm
    from steerserve.steering import spec as S

    llm = open_steering_llm(model, dtype=dtype, max_model_len=2048, max_num_seqs=rows, gpu_memory_utilization=0.5,
                            seed=0, **engine_kwargs)
    tok, facts = llm.get_tokenizer(), llm_facts(llm, model)
    config = llm.llm_engine.vllm_config
    report = {"model": model, "dtype": dtype, "rows": rows, "tokens": tokens,
              "cudagraph_mode": str(config.compilation_config.cudagraph_mode)}
    try:
        impls = llm.llm_engine.model_executor.driver_worker.worker.model_runner.attn_groups
        report["attention_backends"] = sorted({g.backend.__name__ for groups in impls for g in groups})
    except AttributeError as exc:  # the runner's layout moved: report it, do not guess
        report["attention_backends"] = f"unknown ({exc})"

    def plan(spec: dict):
        return S.compile_spec(S.merge([S.parse({"attention": spec}, "bench")]), facts)

    prompt = tok.encode("The capital of France is a city that", add_special_tokens=True)
    greedy = SamplingParams(temperature=0, max_tokens=16)
    cut = plan({"sink": {"gamma": math.exp(-20)}})  # the start-up self-test's gain
    plain, steered = llm.generate([{"prompt_token_ids": prompt}] * 2,
                                  [greedy, SamplingParams(temperature=0, max_tokens=16,
                                                          extra_args=cut.to_extra_args())], use_tqdm=False)
    report["self_test_moves_output"] = plain.outputs[0].token_ids != steered.outputs[0].token_ids
    report["faults"] = faults.reported()  # {"attention": reason} if steering was switched off

    plans = [plan({"sink": {"gamma": 0.5 * 4 ** (k / 7)}}) for k in range(8)]
    inputs = [tok.encode(f"Write a story about item number {i}.", add_special_tokens=True) for i in range(rows)]

    def run(fraction: float, k: int) -> float:
        steered_rows = round(fraction * rows)
        params = [SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True,
                                 extra_args=plans[i % k].to_extra_args() if i < steered_rows else None)
                  for i in range(rows)]
        batch = [{"prompt_token_ids": ids, **({"cache_salt": f"c{i}"} if i < steered_rows else {})}
                 for i, ids in enumerate(inputs)]
        start = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        return rows * tokens / (time.perf_counter() - start)

    run(1.0, 8)  # warm-up: compiles the Triton kernels
    best = {case: max(run(*case) for _ in range(repeats)) for case in CASES}
    base = best[(0.0, 0)]
    report["throughput"] = [{"steered_fraction": f, "distinct_configs": k, "tok_s": round(best[(f, k)], 1),
                             "ratio": round(best[(f, k)] / base, 3)} for f, k in CASES]
    report["faults_after"] = faults.reported()
    return report
