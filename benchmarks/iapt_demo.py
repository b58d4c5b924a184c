"""The "ahoy" demo as a LoRA and as an IAPT adapter, trained on the same examples (server/adapters/demos.py): the share
of greedy answers to the held-out questions (`HELD_OUT`, in neither training set) that open with "Ahoy", for the
base model, the LoRA and the IAPT adapter, with parameter counts and training times. HF transformers, fp32, 24 new
tokens; both demos are built first if they are not in the cache. Two IAPT variants are trained here on the same
examples and budget (not saved): m = 21 (about the LoRA's parameter count) and m = 32 with shared projections.

    OMP_NUM_THREADS=1 python -m benchmarks.iapt_demo [--out benchmarks/results/iapt_demo.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

from .common import RESULTS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="base model dir (default: the cached SmolLM2)")
    p.add_argument("--out", type=Path, default=RESULTS / "iapt_demo.json")
    a = p.parse_args(argv)

    import torch
    from peft import PeftModel
    from safetensors import safe_open

    from steerserve.server.adapters.demos import (
        DEMOS,
        HELD_OUT,
        build_demo,
        build_iapt_demo,
        greeting_examples,
        greeting_rate,
    )
    from steerserve.server.models.store import resolve_model
    from steerserve.server.settings import Settings
    from steerserve.server.training.iapt import greedy_answer, load_base, model_shape, train
    from steerserve.steering.iapt import IaptConfig, IaptModel

    model_path = resolve_model(a.model, Settings.load().cache)
    out_dir = Settings.load().cache / "adapters"
    built = {}
    for name, build in (("ahoy", build_demo), ("ahoy-iapt", build_iapt_demo)):
        start = time.perf_counter()
        path = build(model_path, out_dir, name)
        built[name] = {"path": str(path), "built_now_seconds": round(time.perf_counter() - start, 1)}
    lora_dir, iapt_dir = Path(built["ahoy"]["path"]), Path(built["ahoy-iapt"]["path"])
    with safe_open(str(lora_dir / "adapter_model.safetensors"), "pt") as f:
        lora_params = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())
    training = json.loads((iapt_dir / "training.json").read_text())

    model, tok = load_base(model_path)
    iapt = IaptModel.load(iapt_dir)
    answers: dict[str, list[str]] = {}
    start = time.perf_counter()
    answers["base"] = [greedy_answer(model, tok, q) for q in HELD_OUT]
    answers["iapt"] = [greedy_answer(model, tok, q, iapt) for q in HELD_OUT]
    variants = {}
    examples = greeting_examples(model, tok, DEMOS["ahoy"])
    recipe = training["recipe"]
    for label, bottleneck, shared in (("iapt_m21", 21, False), ("iapt_m32_shared", 32, True)):
        config = IaptConfig(str(model_path), *model_shape(model), bottleneck=bottleneck, shared=shared)
        result = train(model, examples, config, steps=recipe["steps"], lr=recipe["lr"], seed=recipe["seed"],
                       pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        answers[label] = [greedy_answer(model, tok, q, result.iapt) for q in HELD_OUT]
        variants[label] = {"bottleneck": bottleneck, "shared": shared, "parameters": result.iapt.num_parameters(),
                           "train_seconds": round(result.seconds, 1),
                           "loss_first_last5": [result.losses[0], sum(result.losses[-5:]) / 5]}
    lora = PeftModel.from_pretrained(model, lora_dir).eval()  # changes `model` in place: last
    answers["lora"] = [greedy_answer(lora, tok, q) for q in HELD_OUT]
    greeting = DEMOS["ahoy"]
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "machine": platform.processor()
        or platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(), "model": str(model_path), "held_out_questions": len(HELD_OUT),
        "rate": {k: greeting_rate(v, greeting) for k, v in answers.items()},
        "parameters": {"lora": lora_params, "iapt": iapt.num_parameters()},
        "iapt_recipe": training["recipe"], "iapt_train_seconds": round(training["train_seconds"], 1),
        "iapt_base_answers_seconds": round(training["base_answers_seconds"], 1),
        "iapt_loss_first_last5": [training["losses"][0], sum(training["losses"][-5:]) / 5],
        "iapt_train_torch_threads": training.get("torch_threads"), "built": built, "iapt_variants": variants,
        "eval_seconds": round(time.perf_counter() - start, 1),
        "answers": {q: {k: v[i] for k, v in answers.items()} for i, q in enumerate(HELD_OUT)},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("rate", "parameters", "iapt_train_seconds", "iapt_variants")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
