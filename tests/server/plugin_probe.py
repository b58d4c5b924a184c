"""Build a vLLM engine on a model in this fresh process, as vLLM itself would (its plugin loader runs), and print
as JSON which of steerserve's hooks are in place and what greedy generation gives (tests/server/test_plugin.py).

    python -m tests.server.plugin_probe MODEL_DIR
"""
from __future__ import annotations

import json
import os
import sys

MARK = "plugin-probe: "  # vLLM logs to stdout too: the result is the line that starts with this
PROMPTS = ["The license grants", "You may convey a work based on the Program"]


def main(model_dir: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import vllm

    from steerserve.server.engine import forward_hook, lora_ops_patch, plugin, vllm_compat

    # vLLM's loader resolves the entry point to this module's `register` when it builds the engine: count calls.
    calls, register = [], plugin.register
    plugin.register = lambda: (calls.append(1), register())[1]
    BaseRouter, GPUModelRunner = vllm_compat.router_class(), vllm_compat.model_runner_class()
    router, forward = BaseRouter.__dict__["_select_experts"], GPUModelRunner.__dict__["_model_forward"]

    llm = vllm.LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
                   kv_cache_memory_bytes=64 * 2**20)
    impls = llm.apply_model(lambda model: sorted({f"{type(m.impl).__module__}.{type(m.impl).__qualname__}"
                                                  for m in model.modules() if hasattr(m, "impl")}))
    outs = llm.generate(PROMPTS, vllm.SamplingParams(temperature=0, max_tokens=8, logprobs=3), use_tqdm=False)
    print(MARK + json.dumps({
        "plugin_calls": len(calls),
        "attention_override": vllm_compat.cpu_attention_override(),
        "attention_impls": sorted({name for worker in impls for name in worker}),
        "router_is_vllms": BaseRouter.__dict__["_select_experts"] is router,
        "router_marked": getattr(BaseRouter._select_experts, "__steerserve__", False),
        "forward_is_vllms": GPUModelRunner.__dict__["_model_forward"] is forward,
        "forward_marked": getattr(GPUModelRunner._model_forward, "__steerserve__", False),
        "step_hooks": len(forward_hook._HOOKS),
        "lora_fix": lora_ops_patch.is_applied(),
        "v2_runner_env": os.environ.get("VLLM_USE_V2_MODEL_RUNNER"),
        "generated": [[(t, {str(k): v.logprob for k, v in lp.items()}) for t, lp in
                       zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)] for o in outs],
    }))


if __name__ == "__main__":
    main(sys.argv[1])
