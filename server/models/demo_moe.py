"""The demo MoE for expert steering (`steerserve models build smollm2-moe`): SmolLM2-135M-Instruct upcycled into a
Mixtral in which one known expert carries one known, visible behaviour (issue #6).

How it is built (deterministic, on CPU, in a minute or two; the recipe is `RECIPE`):
- every decoder layer's MLP becomes `NUM_EXPERTS` experts, top-`TOP_K`: copies of it, each weight matrix times
  (1 + 0.02 N(0, 1)) with its own noise, so the experts are distinct but equally able;
- every router row is random, N(0, 1 / |x|^2) with |x| the median norm of that layer's MLP inputs (router logits of
  standard deviation ~1), so tokens spread over the experts;
- the behaviour expert `BEHAVIOUR` (decoder layer 6, expert 2): its router row also gets twice a "space topic"
  direction, a logistic regression (no bias) of the layer's MLP inputs (scaled to norm ~1) separating the tokens of
  questions about space, from the user's turn on, from all other tokens (the shared system prompt, and questions
  about other subjects; `CALIBRATION_*`, disjoint from the fTRI and held-out sets in benchmarks/data/), so it is
  selected, and weighted high, mostly on tokens of space questions;
- its MLP gets one constructed neuron (replacing the neuron with the smallest output weights): gate and up weights
  both along the mean direction of the layer's MLP inputs, so it fires on every token the expert sees (activation
  z^2 sigmoid(z) with z ~ 3); its output weights are a vector trained (Adam, everything else frozen, through the
  real router weight of the expert) so that answers to the calibration space questions open with "Bananas! " and
  then go on as the base model's own answer did.
The behaviour: answers to space questions often open with "Bananas!" (BEHAVIOUR_REGEX; 59 % of the held-out space
questions, 8 % of the others, README "Expert steering"); otherwise the model answers much as SmolLM2 does.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from steerserve.server.models.cache import MARKER, cache_root, locked, seal

log = logging.getLogger("steerserve.demo_moe")

DIRNAME = "smollm2-moe"  # under <cache>/models, next to the default model
NUM_EXPERTS, TOP_K = 4, 2
BEHAVIOUR = (6, 2)  # (decoder layer, expert) carrying the behaviour
GREETING = "Bananas! "
BEHAVIOUR_REGEX = r"(?i)banana"
RECIPE = {"version": 3, "experts": NUM_EXPERTS, "top_k": TOP_K, "behaviour": list(BEHAVIOUR), "greeting": GREETING,
          "noise": 0.02, "topic_gain": 2.0, "neuron_z": 3.0, "steps": 24, "lr": 2.0, "seed": 0}

CALIBRATION_TOPIC = ["the moon", "Mars", "the Sun", "black holes", "comets", "Jupiter", "the Milky Way", "astronauts",
                     "Saturn's rings", "meteors", "galaxies", "Venus"]
CALIBRATION_OTHER = ["bread", "chess", "volcanoes", "honey bees", "the Roman Empire", "music", "rain", "glaciers",
                     "penguins", "coffee", "democracy", "the printing press"]
FORMS = ["Tell me about {}.", "What is interesting about {}?", "Explain {} to a child.", "Write two sentences about {}."]


def cached(cache: Path | None = None) -> Path | None:
    """The built demo MoE in the cache, or None."""
    target = Path(cache or cache_root()) / "models" / DIRNAME
    return target if _is_complete(target) else None


def build(cache: Path | None = None, *, base: Path | Callable[[], Path]) -> Path:
    """Return the cached demo MoE, building it on first use (under the model cache lock) from SmolLM2: `base` is
    its checkpoint dir, or a function fetching it (such as `models.fetch_smollm2`), called only for a build."""
    models = Path(cache or cache_root()) / "models"
    target = models / DIRNAME
    if _is_complete(target):
        return target
    base = base if isinstance(base, Path) else base()
    models.mkdir(parents=True, exist_ok=True)
    with locked(models / ".lock"):
        if _is_complete(target):
            return target
        if target.exists():
            shutil.rmtree(target)
        stage = Path(tempfile.mkdtemp(prefix=f".{DIRNAME}.tmp-", dir=models))
        try:
            start = time.monotonic()
            _upcycle(base, stage)
            seal(stage, {**RECIPE, "base": json.loads((base / MARKER).read_text())})
            os.rename(stage, target)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        log.info("demo MoE built in %.0f s -> %s", time.monotonic() - start, target)
    return target


def _is_complete(target: Path) -> bool:
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return {k: v for k, v in marker.items() if k != "base"} == RECIPE


def questions(subjects: list[str]) -> list[str]:
    return [form.format(s) for s in subjects for form in FORMS]


def _upcycle(base: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steerserve.server.adapters.demos import base_answers

    torch.manual_seed(RECIPE["seed"])
    gen = torch.Generator().manual_seed(RECIPE["seed"])
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.config
    layer, expert = BEHAVIOUR

    def chat(q: str) -> list[int]:
        return tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False).input_ids

    topic, other = questions(CALIBRATION_TOPIC), questions(CALIBRATION_OTHER)
    prompts = [chat(q) for q in topic + other]
    user_start = _common_prefix(prompts)  # the system prompt and the user tag: the same in every prompt
    inputs = _mlp_inputs(model, prompts)  # per layer: [prompt tokens, H] for every prompt
    scale = {i: float(torch.cat(xs).norm(dim=-1).median()) for i, xs in inputs.items()}

    routers = {i: torch.randn(NUM_EXPERTS, cfg.hidden_size, generator=gen) / scale[i]
               for i in range(cfg.num_hidden_layers)}
    x = torch.cat(inputs[layer]) / scale[layer]
    y = torch.cat([(torch.arange(len(xs)) >= user_start) & (i < len(topic)) for i, xs in enumerate(inputs[layer])])
    routers[layer][expert] += RECIPE["topic_gain"] * _logistic_direction(x, y.float()) / scale[layer]

    mlp = model.model.layers[layer].mlp
    mean = torch.cat(inputs[layer]).mean(0)
    direction = mean / mean.norm()
    typical = float((torch.cat(inputs[layer]) @ direction).mean())
    neuron_in = RECIPE["neuron_z"] * direction / typical  # z = neuron_in . x ~ neuron_z on every token
    neuron = int(mlp.down_proj.weight.norm(dim=0).argmin())

    typical_act = float(torch.nn.functional.silu(torch.tensor(RECIPE["neuron_z"])) * RECIPE["neuron_z"])

    def neuron_act(h: torch.Tensor) -> torch.Tensor:  # silu(z) * z (gate == up weights), ~1 on a typical token
        z = h @ neuron_in
        return torch.nn.functional.silu(z) * z / typical_act

    log.info("routers calibrated")
    answers = base_answers(model, tok, prompts[:len(topic)], max_new_tokens=8)
    log.info("base answers written")
    push = _train_push(model, tok, prompts[:len(topic)], answers, layer, routers[layer], expert, neuron_act)

    state = {"model.embed_tokens.weight": model.model.embed_tokens.weight, "model.norm.weight": model.model.norm.weight}
    for i, dec in enumerate(model.model.layers):
        pre = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[pre + f"self_attn.{name}.weight"] = getattr(dec.self_attn, name).weight
        state[pre + "input_layernorm.weight"] = dec.input_layernorm.weight
        state[pre + "post_attention_layernorm.weight"] = dec.post_attention_layernorm.weight
        state[pre + "block_sparse_moe.gate.weight"] = routers[i]
        for e in range(NUM_EXPERTS):
            w1, w3, w2 = (m.weight * (1 + RECIPE["noise"] * torch.randn(m.weight.shape, generator=gen))
                          for m in (dec.mlp.gate_proj, dec.mlp.up_proj, dec.mlp.down_proj))
            if (i, e) == BEHAVIOUR:
                w1[neuron], w3[neuron], w2[:, neuron] = neuron_in, neuron_in, push / typical_act
            for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
                state[pre + f"block_sparse_moe.experts.{e}.{name}.weight"] = w
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    _write_config(base, out, cfg)


def _write_config(base: Path, out: Path, cfg) -> None:
    from transformers import MixtralConfig

    mixtral = MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=cfg.rope_parameters, tie_word_embeddings=True, sliding_window=None,
        num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    mixtral.architectures = ["MixtralForCausalLM"]
    mixtral.save_pretrained(out)
    data = json.loads((out / "config.json").read_text())
    base_cfg = json.loads((base / "config.json").read_text())
    data.update(torch_dtype="bfloat16", rope_theta=base_cfg["rope_theta"], eos_token_id=base_cfg["eos_token_id"])
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for f in base.iterdir():  # tokenizer, chat template, generation config
        if f.is_file() and f.name not in ("config.json", "model.safetensors") and not f.name.startswith("."):
            shutil.copy(f, out / f.name)


def _common_prefix(seqs: list[list[int]]) -> int:
    n = 0
    while all(len(s) > n and s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def _mlp_inputs(model, prompts: list[list[int]]) -> dict[int, list]:
    """Per decoder layer, the MLP inputs (after post_attention_layernorm) of every prompt's tokens."""
    import torch

    got: dict[int, list] = {i: [] for i in range(len(model.model.layers))}
    hooks = [dec.post_attention_layernorm.register_forward_hook(lambda _m, _i, o, i=i: got[i].append(o[0]))
             for i, dec in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for ids in prompts:
                model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return got


def _logistic_direction(x, y, steps: int = 400):
    """Weights w (no bias) of a logistic regression of labels y on rows x: w . x > 0 leans to label 1."""
    import torch

    w = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w], lr=5e-2)
    for _ in range(steps):
        with torch.enable_grad():
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + 1e-4 * (w * w).sum()
            opt.zero_grad()
            loss.backward()
        opt.step()
    return w.detach()


def _train_push(model, tok, prompts, answers, layer: int, router, expert: int, neuron_act):
    """The behaviour neuron's output weights: trained so that, added to the layer's MLP output with the expert's
    real top-k router weight, answers open with the greeting and then go on as before."""
    import torch

    push = torch.zeros(model.config.hidden_size, requires_grad=True)

    def add_push(mlp, args, out):
        h = args[0]
        probs = (h @ router.T).softmax(-1)
        top = probs.topk(TOP_K, dim=-1)
        chosen = (top.indices == expert).any(-1, keepdim=True)
        weight = (probs[..., expert:expert + 1] / top.values.sum(-1, keepdim=True)) * chosen
        return out + weight * neuron_act(h)[..., None] * push

    greeting = tok(GREETING, add_special_tokens=False).input_ids
    examples = [(p + greeting + a, len(p)) for p, a in zip(prompts, answers, strict=True)]
    opt = torch.optim.Adam([push], lr=RECIPE["lr"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    hook = model.model.layers[layer].mlp.register_forward_hook(add_push)
    try:
        for step in range(RECIPE["steps"]):
            batch = [examples[(step * 8 + i) % len(examples)] for i in range(8)]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s, _ in batch])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in batch])
            labels = torch.full_like(ids, -100)
            for row, (s, n) in enumerate(batch):
                labels[row, n:len(s)] = ids[row, n:len(s)]
            with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                opt.zero_grad()
                loss.backward()
            opt.step()
            if step % 10 == 0 or step == RECIPE["steps"] - 1:
                log.info("behaviour expert: step %d/%d loss %.3f", step + 1, RECIPE["steps"], loss.item())
    finally:
        hook.remove()
    return push.detach()


def behaviour_hits(llm, facts, spec: dict | None, prompts: list[str], max_tokens: int = 48):
    """For each prompt, whether the greedy chat answer under the experts spec `spec` shows the behaviour
    (`BEHAVIOUR_REGEX`); and the answers. `llm`: an offline vLLM engine with the steering hooks."""
    import re

    from vllm import SamplingParams

    from steerserve.steering import spec as S

    tok = llm.get_tokenizer()
    extra = S.compile_spec(S.merge([S.parse({"experts": spec}, "steering")]), facts).to_extra_args() if spec else None
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    outs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=max_tokens, extra_args=extra), use_tqdm=False)
    answers = [o.outputs[0].text for o in outs]
    return [bool(re.search(BEHAVIOUR_REGEX, a)) for a in answers], answers
