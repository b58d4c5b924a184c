"""The sink profiler and ZeroTuning calibration: statistics against plain re-computations, scoring against HF eager
with the steering written out, and the gamma search against a brute-force evaluation of its candidates."""
from __future__ import annotations

import json
import math

import pytest
import torch

from steerserve.steering import spec as S
from steerserve.steering.tasks import SHIPPED, TaskFileError, load_tasks
from tests.tiny_models import build_tiny_llama

# ---- the statistics on hand-made attention matrices ------------------------------------------------------------

def causal_attention(heads: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scores = 3 * torch.randn(heads, length, length, generator=gen, dtype=torch.float64)
    scores[..., 0] += 2.0  # a mild sink
    future = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def plain_stats(a: list[list[float]]) -> tuple[float, float, float]:
    """M, R, C of one head's L x L attention, with loops, straight from the definitions in docs/tools.md."""
    L = len(a)
    mass = sum(a[i][0] for i in range(1, L)) / (L - 1)
    rows = [-sum(p * math.log(p) for p in a[i][: i + 1] if p > 0) / math.log(i + 1) for i in range(1, L)]
    cols = []
    for j in range(L - 1):
        total = sum(a[i][j] for i in range(L))
        col = [a[i][j] / total for i in range(j, L)]
        cols.append(-sum(p * math.log(p) for p in col if p > 0) / math.log(L - j))
    return mass, sum(rows) / len(rows), max(cols)


def test_statistics_match_a_plain_computation():
    from steerserve.steering.profile import column_entropy, key0_mass, row_entropy

    attn = causal_attention(3, 7, seed=1)
    for h in range(3):
        m, r, c = plain_stats(attn[h].tolist())
        assert key0_mass(attn)[h].item() == pytest.approx(m, abs=1e-12)
        assert row_entropy(attn)[h].item() == pytest.approx(r, abs=1e-12)
        assert column_entropy(attn)[h].item() == pytest.approx(c, abs=1e-12)


def test_statistics_on_extreme_heads():
    from steerserve.steering.profile import column_entropy, key0_mass, row_entropy

    L = 6
    sink = torch.zeros(1, L, L, dtype=torch.float64)
    sink[..., 0] = 1.0  # all attention on key 0: a dormant sink head
    uniform = torch.tril(torch.ones(L, L, dtype=torch.float64))
    uniform = (uniform / uniform.sum(-1, keepdim=True))[None]
    assert key0_mass(sink).item() == 1.0 and row_entropy(sink).item() == 0.0
    assert column_entropy(sink).item() == pytest.approx(1.0)  # key 0 collects evenly from every query
    assert row_entropy(uniform).item() == pytest.approx(1.0)


# ---- the task file format -------------------------------------------------------------------------------------

def test_shipped_tasks_are_balanced_and_split_in_halves():
    tasks = load_tasks(SHIPPED)
    assert sum(len(t.items) for t in tasks.values()) >= 200 and len(tasks) >= 2
    for task in tasks.values():
        for label in task.choices:
            cal = [it for it in task.split("calibration") if it.label == label]
            held = [it for it in task.split("heldout") if it.label == label]
            assert cal and len(cal) == len(held)
        assert not {it.prompt for it in task.split("calibration")} & {it.prompt for it in task.split("heldout")}


def test_own_task_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    lines = [{"task": "t", "template": "Q: {text}\nA:", "choices": ["yes", "no"], "chat": False},
             {"task": "t", "text": "a", "label": "yes"}, {"task": "t", "text": "b", "label": "yes"},
             {"prompt": "Is it?", "choices": ["x", "y"], "label": "y", "task": "other", "split": "heldout"}]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    tasks = load_tasks(path)
    assert [it.split for it in tasks["t"].items] == ["calibration", "heldout"]  # split by position per label
    assert tasks["t"].items[0].prompt == "Q: a\nA:" and tasks["other"].items[0].prompt == "Is it?"
    path.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"task": "t", "text": "a", "label": "maybe"}))
    with pytest.raises(TaskFileError, match="mine.jsonl:2: label 'maybe'"):
        load_tasks(path)


# ---- the tiny model: profiler vs attention computed directly; scoring and calibration ------------------------

_RECORDED: list[torch.Tensor] = []


def recording_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Causal attention of one unpadded sequence computed here, its weights recorded per layer."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    L = scores.shape[-1]
    scores = scores.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), float("-inf"))
    weights = torch.softmax(scores.double(), dim=-1)
    _RECORDED.append(weights[0])
    return torch.matmul(weights.to(query.dtype), value).transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", seed=0)


def test_profiler_on_tiny_model_matches_direct_attention(tiny_dir):
    from transformers import AttentionInterface, AutoModelForCausalLM

    from steerserve.steering import profile as P

    model, tok = P.load_model(tiny_dir)
    AttentionInterface.register("recording", recording_attention)
    direct = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32,
                                                  attn_implementation="recording").eval()
    texts = ["The licensee may copy the Program", "Preamble: the licenses for most software are designed"]
    seqs = [tok(t).input_ids for t in texts]
    result = P.profile_sinks(model, seqs, "tiny")
    expected = torch.zeros(3, 2, 4, dtype=torch.float64)  # (M, R, C) x layers x heads
    for ids in seqs:
        _RECORDED.clear()
        with torch.no_grad():
            direct(torch.tensor([ids]))
        for layer, attn in enumerate(_RECORDED):
            for head in range(4):
                expected[:, layer, head] += torch.tensor(plain_stats(attn[head].tolist())) / len(seqs)
    got = torch.tensor([result.key0_mass, result.row_entropy, result.col_entropy], dtype=torch.float64)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert result.texts == 2 and len(result.key0_mass) == 2 and len(result.key0_mass[0]) == 4


TEXTS = ["You may copy the Program", "THERE IS NO WARRANTY", "the terms of section 4", "Preamble",
         "distribute copies of free software", "you must show them these terms", "modified versions",
         "the source code", "General Public License", "patents", "each author's protection", "the work"]


def synthetic_task(tmp_path):
    """Raw prompts, two one-token answers, labels fixed by a seeded coin (the model knows nothing of them)."""
    import random

    rng = random.Random(0)
    lines = [{"task": "coin", "template": "{text} is", "choices": ["free", "the"], "chat": False}]
    lines += [{"task": "coin", "text": t, "label": rng.choice(["free", "the"]), "split": "calibration"} for t in TEXTS]
    path = tmp_path / "coin.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    return load_tasks(path)["coin"]


@pytest.fixture(scope="module")
def scorer(tiny_dir, steering_llms):
    from steerserve.server.tools.calibration_engine import model_facts
    from steerserve.steering.calibrate import Scorer

    engine = steering_llms(tiny_dir, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=16,
                           enable_prefix_caching=False, kv_cache_memory_bytes=64 * 2**20,
                           logprobs_mode="processed_logprobs", seed=0)
    return Scorer(engine, model_facts(engine, tiny_dir))


def test_scores_match_hf_eager_with_the_sink_scaled(scorer, tiny_dir, tmp_path):
    """Each item's answer distribution = HF eager with ln(gamma) on key 0 of the chosen heads, renormalised
    over the choices' first tokens."""
    from steerserve.steering.tasks import choice_token_ids, render
    from tests import attention_reference as reference

    model = reference.load(tiny_dir)
    task = synthetic_task(tmp_path)
    ids = choice_token_ids(scorer.tokenizer, task)
    for sink in (None, {"gamma": 3.0, "heads": [1, 2]}, {"gamma": 0.3}):
        spec = {"attention": {"sink": sink}} if sink else None
        got = scorer.probs(task, "calibration", spec)
        for item, row in zip(task.items, got, strict=True):
            prompt = render(scorer.tokenizer, task, item)
            bias = reference.reference_bias({"sink": sink} if sink else None, len(prompt), 2, 4)  # tiny: 2 x 4
            logprobs = reference.logprobs(model, prompt, [], bias)[0, ids]
            assert row == pytest.approx(logprobs.softmax(-1).tolist(), abs=1e-4), (sink, item)


@pytest.mark.parametrize("mode", ["supervised", "unsupervised"])
def test_calibration_picks_the_brute_force_best(scorer, tmp_path, mode):
    from steerserve.steering import calibrate as C

    task = synthetic_task(tmp_path)
    grids = {"grid_up": (1.5, 3.0, 6.0), "grid_down": (0.15, 0.4, 0.7)}
    result = C.calibrate(scorer, task, mode, **grids)

    fresh = C.Scorer(scorer.llm, scorer.facts)  # no cache: every candidate re-scored
    base = fresh.metrics(task, "calibration", None)
    # The head classes follow from the probes as defined.
    for h in range(scorer.facts.num_heads):
        up, down = (fresh.metrics(task, "calibration", C.sink_spec(g, [h])).key(mode) for g in (2.0, 0.5))
        cls = "up" if up > base.key(mode) and up > down else "down" if down > base.key(mode) and down > up else None
        assert (h in result.effective["up"]) == (cls == "up") and (h in result.effective["down"]) == (cls == "down")
    side = {"up": grids["grid_up"], "down": grids["grid_down"]}.get(result.head_type,
                                                                    grids["grid_down"] + grids["grid_up"])
    candidates = {1.0: base} | {g: fresh.metrics(task, "calibration", C.sink_spec(g, result.heads)) for g in side}
    best = max(candidates.values(), key=lambda m: m.key(mode)).key(mode)
    assert candidates[result.gamma].key(mode) == best
    assert result.best.key(mode) == best
    # On this data some candidate beats no steering (re-scored above), so the search must not keep gamma = 1.
    assert best > base.key(mode) and result.gamma != 1.0 and result.heads

    # The profile, through JSON and the parser, scales key 0 by gamma on exactly the chosen heads of every layer.
    parsed = S.parse(json.loads(json.dumps(result.profile())), "profile")
    plan = S.compile_spec(S.merge([parsed]), scorer.facts)
    layers, heads = scorer.facts.num_layers, scorer.facts.num_heads
    expected = [math.log(result.gamma) if h in result.heads else 0.0 for _ in range(layers) for h in range(heads)]
    assert plan is not None and plan.attention.sink_log_gains == pytest.approx(expected)
