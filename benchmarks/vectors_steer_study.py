"""Does it steer? Control vectors trained with `steerserve vectors train` on SmolLM2-135M-Instruct for one
behaviour (a joyful versus a gloomy tone, benchmarks/data/vectors_joy.json: 68 project-written pairs, 16 held-out
prompts, two project-written lexicons), scored against `scale` for `mean`, `pca` and `pca-centred`. An
evaluation, not a test.

    python -m benchmarks.vectors_steer_study [--layers 8-20] [--scales -8 -4 0 2 4 8 16] [--backend hf|engine]

Per method and scale: the **tone score** of greedy answers (32 tokens) to the held-out prompts, 100 x (joyful
words - gloomy words) / words, averaged over the prompts (positive = joyful); and the **NLL** (nats/token) of the
first 512 tokens of the GPL-3 + GFDL-1.3 + Apache-2.0 licence texts (/usr/share/common-licenses, as in the
attention-modes table) with the vector applied to every token, i.e. how much the steering damages neutral text.
Each direction is scaled to unit length per layer (`normalize: true`), so `scale` is the L2 norm added at each
layer for both methods (the residual stream's own norm at these layers is in the JSON's `state_norm`).

Backends: `engine` runs the steering through steerserve's own engine path (an offline vLLM engine with our plugin
and the `vectors` plan part); `hf` applies the same addition with forward hooks on HF transformers (fp32), the
reference the engine is tested against. Writes benchmarks/results/vectors_steer_study.{json,png} and the plot
again as docs/guides/img/vectors_steer_study.png for the control vectors guide.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).parent / "data" / "vectors_joy.json"
DOC_PLOT = Path(__file__).parent.parent / "docs" / "guides" / "img" / "vectors_steer_study.png"
TEXTS = [Path("/usr/share/common-licenses") / name for name in ("GPL-3", "GFDL-1.3", "Apache-2.0")]
WORD = re.compile(r"[a-z']+")


def tone(text: str, joyful: set[str], gloomy: set[str]) -> float:
    words = WORD.findall(text.lower())
    return 100.0 * (sum(w in joyful for w in words) - sum(w in gloomy for w in words)) / max(len(words), 1)


def pairs_file(tok, data: dict, out: Path) -> Path:
    """The training pairs as the trainer reads them: the chat rendered up to the assistant's turn, plus the
    joyful or the gloomy opening."""
    with out.open("w") as f:
        for question, joyful, gloomy in data["pairs"]:
            head = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
            f.write(json.dumps({"positive": head + joyful, "negative": head + gloomy}) + "\n")
    return out


class HFBackend:
    """HF transformers fp32 with forward hooks adding scale * unit(v_l) at the output of decoder layer l."""

    def __init__(self, path: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.add: dict[int, object] = {}
        for layer, module in enumerate(self.model.model.layers):
            module.register_forward_hook(self._hook(layer))

    def _hook(self, layer: int):
        def hook(_module, _args, output):
            add = self.add.get(layer)
            if add is None:
                return output
            return (output[0] + add, *output[1:]) if isinstance(output, tuple) else output + add
        return hook

    def steer(self, vector, scale: float) -> None:
        self.add = {} if vector is None or scale == 0 else {
            layer: self.torch.tensor(scale * d / max(float((d ** 2).sum()) ** 0.5, 1e-30))
            for layer, d in vector.directions.items()}

    def answers(self, prompts: list[str], max_tokens: int) -> list[str]:
        out = []
        with self.torch.inference_mode():
            for prompt in prompts:
                text = self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                    add_generation_prompt=True)
                ids = self.tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
                gen = self.model.generate(ids, max_new_tokens=max_tokens, do_sample=False,
                                          pad_token_id=self.tok.eos_token_id)
                out.append(self.tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return out

    def nll(self, ids: list[int]) -> float:
        with self.torch.inference_mode():
            logits = self.model(self.torch.tensor([ids])).logits[0, :-1].double()
            lp = self.torch.log_softmax(logits, -1)
            return float(-lp[self.torch.arange(len(ids) - 1), self.torch.tensor(ids[1:])].mean())


class EngineBackend:
    """steerserve's engine path: an offline vLLM engine with our plugin, the vectors as a plan part."""

    def __init__(self, path: Path):
        from steerserve.server.engine.builder import llm_facts, open_steering_llm

        self.llm = open_steering_llm(path, dtype="float32", enforce_eager=True, max_model_len=2048,
                                     max_num_seqs=16, kv_cache_memory_bytes=1 << 28, seed=0,
                                     enable_prefix_caching=False)
        self.tok = self.llm.get_tokenizer()
        self.facts = llm_facts(self.llm, path)
        self.plan = None

    def steer(self, vector, scale: float) -> None:
        from steerserve.steering import spec as steering
        from steerserve.steering.vectors import resolved

        if vector is None or scale == 0:
            self.plan = None
            return
        spec = steering.merge([steering.parse({"vectors": [{"name": "study", "scale": scale, "normalize": True}]},
                                              "steering")])
        spec.vectors[0] = resolved(spec.vectors[0], vector)
        self.plan = steering.compile_spec(spec, self.facts)

    def _params(self, **kw):
        from vllm import SamplingParams

        return SamplingParams(**kw, extra_args=self.plan.to_extra_args() if self.plan else None)

    def answers(self, prompts: list[str], max_tokens: int) -> list[str]:
        ids = [self.tok(self.tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                     add_generation_prompt=True), add_special_tokens=False)
               ["input_ids"] for p in prompts]
        outs = self.llm.generate([{"prompt_token_ids": i} for i in ids],
                                 self._params(max_tokens=max_tokens, temperature=0), use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    def nll(self, ids: list[int]) -> float:
        out = self.llm.generate([{"prompt_token_ids": ids}], self._params(max_tokens=1, prompt_logprobs=0),
                                use_tqdm=False)[0]
        lps = [-entry[t].logprob for t, entry in zip(ids[1:], out.prompt_logprobs[1:], strict=True)]
        return sum(lps) / len(lps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="8-20")
    ap.add_argument("--scales", type=float, nargs="+", default=[-8, -4, 0, 2, 4, 8, 16])
    ap.add_argument("--methods", nargs="+", default=["mean", "pca", "pca-centred"])
    ap.add_argument("--backend", choices=("hf", "engine"), default="engine")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--text-tokens", type=int, default=512)
    args = ap.parse_args()

    from steerserve.server.cli import main as steerserve
    from steerserve.server.models.store import fetch_smollm2
    from steerserve.steering.vector_files import read_vector_file

    path = fetch_smollm2()
    data = json.loads(DATA.read_text())
    joyful, gloomy = set(data["joyful_words"]), set(data["gloomy_words"])
    backend = HFBackend(path) if args.backend == "hf" else EngineBackend(path)
    text = "\n\n".join(p.read_text() for p in TEXTS if p.is_file())
    text_ids = backend.tok(text, add_special_tokens=False)["input_ids"][:args.text_tokens]
    rows, reports, samples = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = pairs_file(backend.tok, data, Path(tmp) / "pairs.jsonl")
        for method in args.methods:
            out = Path(tmp) / f"joy-{method}.gguf"
            started = time.perf_counter()
            status = steerserve(["vectors", "train", "--model", str(path), "--pairs", str(pairs), "--method",
                                 method, "--layers", args.layers, "--out", str(out), "--quiet"])
            if status != 0:
                raise SystemExit(f"training the {method} vector failed")
            reports[method] = {**json.loads(out.with_suffix(".json").read_text()),
                               "train_seconds": time.perf_counter() - started}
            vector = read_vector_file(out)
            gc.collect()  # the trainer's HF model
            for scale in args.scales:
                backend.steer(vector, scale)
                started = time.perf_counter()
                answers = backend.answers(data["held_out"], args.max_tokens)
                scores = [tone(a, joyful, gloomy) for a in answers]
                nll = backend.nll(text_ids)
                rows.append({"method": method, "scale": scale, "tone": sum(scores) / len(scores),
                             "tone_per_prompt": scores, "nll": nll, "ppl": math.exp(nll),
                             "seconds": time.perf_counter() - started})
                samples[f"{method} {scale:g}"] = answers[:3]
                print(f"{method:4s} scale {scale:6.1f}  tone {rows[-1]['tone']:+7.2f}  nll {nll:.3f}  "
                      f"({rows[-1]['seconds']:.0f} s)  e.g. {answers[0][:70]!r}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    report = {"conditions": {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "backend": args.backend,
                             "layers": args.layers, "normalize": True, "pairs": len(data["pairs"]),
                             "held_out_prompts": len(data["held_out"]), "max_tokens": args.max_tokens,
                             "greedy": True, "text": [str(p) for p in TEXTS], "text_tokens": len(text_ids)},
              "training": reports, "results": rows, "samples": samples}
    (RESULTS / "vectors_steer_study.json").write_text(json.dumps(report, indent=2))
    plot(rows, RESULTS / "vectors_steer_study.png")
    plot(rows, DOC_PLOT)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        a.plot([r["scale"] for r in mine], [r["tone"] for r in mine], "o-", label=method)
        b.plot([r["scale"] for r in mine], [r["nll"] for r in mine], "o-", label=method)
    a.set_xlabel("scale (L2 norm added per layer)")
    a.set_ylabel("tone score (joyful - gloomy words per 100)")
    a.axhline(0, color="grey", lw=0.5)
    b.set_xlabel("scale (L2 norm added per layer)")
    b.set_ylabel("NLL on licence text (nats/token)")
    a.legend()
    fig.suptitle("SmolLM2-135M: joy vector (held-out prompts)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
