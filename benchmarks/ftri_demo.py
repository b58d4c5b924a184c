"""fTRI acceptance on the demo MoE (issue #6): does fTRI find the behaviour expert, and does switching it off help?

    python -m benchmarks.ftri_demo [--max-tokens 48]

Builds (or reuses) the demo MoE (`steerserve models build smollm2-moe`, server/models/demo_moe.py), runs fTRI on the
training set benchmarks/data/moe_demo_ftri.jsonl, classes from the greedy responses (`banana` when the answer
matches the behaviour regex, else `other`), then measures the behaviour's rate (greedy answers matching the regex)
on the held-out set benchmarks/data/moe_demo_heldout.jsonl (other subjects and other question forms) with no
steering, with fTRI's top expert switched off, and with each other expert of that layer switched off (one of them
drawn at random, seed 0, is "the random expert"). Offline vLLM, fp32, in-process. Acceptance: top expert off cuts
the rate by at least half; the random expert off does not. Writes benchmarks/results/ftri_demo.{json,png} and
fTRI's own outputs under benchmarks/results/ftri_demo/.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).parent / "data"
TRAIN, HELDOUT = DATA / "moe_demo_ftri.jsonl", DATA / "moe_demo_heldout.jsonl"


def behaviour_rates(llm, facts, spec: dict | None, rows: list[dict], max_tokens: int) -> dict:
    """The fraction of greedy answers with the behaviour, overall and per label, under `spec`."""
    from steerserve.server.models.demo_moe import behaviour_hits

    hits, texts = behaviour_hits(llm, facts, spec, [r["prompt"] for r in rows], max_tokens)
    rates = {"all": sum(hits) / len(hits)}
    for label in sorted({r["label"] for r in rows}):
        mine = [h for h, r in zip(hits, rows, strict=True) if r["label"] == label]
        rates[label] = sum(mine) / len(mine)
    return {"rate": rates, "examples": texts[:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=48, help="answer length, held-out and fTRI classification")
    args = ap.parse_args()

    from steerserve.server.engine.builder import llm_facts
    from steerserve.server.models import demo_moe
    from steerserve.server.models.store import fetch_smollm2
    from steerserve.server.tools import ftri

    path = demo_moe.build(base=fetch_smollm2)
    llm = ftri.open_engine(path)
    report = ftri.run(path, [TRAIN], "banana", RESULTS / "ftri_demo", classify_rules=[
        f"banana={demo_moe.BEHAVIOUR_REGEX}"], max_tokens=args.max_tokens, top_k=1, llm=llm)
    top = report["ranked"][0]["expert"]
    layer, expert = map(int, top.split("."))
    others = [e for e in range(demo_moe.NUM_EXPERTS) if e != expert]
    drawn = random.Random(0).choice(others)
    facts = llm_facts(llm, path)
    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines() if line.strip()]
    conditions = {"none": None, f"off {top} (fTRI top)": {"off": [top]}}
    for e in others:
        conditions[f"off {layer}.{e}" + (" (random)" if e == drawn else "")] = {"off": [f"{layer}.{e}"]}
    results = {}
    for name, spec in conditions.items():
        results[name] = behaviour_rates(llm, facts, spec, rows, args.max_tokens)
        print(f"{name:28s} behaviour rate {results[name]['rate']}", flush=True)
    base = results["none"]["rate"]["all"]
    top_rate = results[f"off {top} (fTRI top)"]["rate"]["all"]
    random_rate = results[f"off {layer}.{drawn} (random)"]["rate"]["all"]
    known = "{}.{}".format(*demo_moe.BEHAVIOUR)
    verdict = {"behaviour_expert": known, "ftri_top": top, "ftri_top_is_behaviour_expert": top == known,
               "top_off_cuts_rate_by_half": top_rate <= base / 2, "random_off_cuts_rate_by_half": random_rate <= base / 2}
    print(json.dumps(verdict, indent=1))
    out = {"conditions": {"model": str(path), "recipe": demo_moe.RECIPE, "dtype": "float32", "decoding": "greedy",
                          "max_tokens": args.max_tokens, "behaviour_regex": demo_moe.BEHAVIOUR_REGEX,
                          "ftri_set": str(TRAIN.relative_to(RESULTS.parent.parent)),
                          "heldout_set": str(HELDOUT.relative_to(RESULTS.parent.parent)),
                          "ftri_classes": report["classes"], "ftri_tokens": report["tokens"]},
           "ftri_top5": report["ranked"][:5], "heldout": results, "verdict": verdict}
    (RESULTS / "ftri_demo.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(results, RESULTS / "ftri_demo.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    topics = [t for t in results["none"]["rate"] if t != "all"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / (len(topics) + 1)
    for j, t in enumerate(["all", *topics]):
        ax.bar([i + j * width for i in range(len(names))], [results[n]["rate"][t] for n in names], width, label=t)
    ax.set_xticks([i + width * len(topics) / 2 for i in range(len(names))], names, rotation=15, fontsize=8)
    ax.set_ylabel("held-out answers with the behaviour")
    ax.set_title("Demo MoE: behaviour rate by switched-off expert")
    ax.legend(title="prompts", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
