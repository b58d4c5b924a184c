"""Demo LoRA adapters for the default model (`steerserve adapters build-demo`): small, trained on CPU in about a
minute each, from data written here, with an effect you can see: the answer starts with a fixed greeting.

The training data: the project's questions below, each answered by the base model itself (greedy, a few dozen
tokens), with the greeting put in front. The loss covers greeting and answer, so the adapter learns "open with
this, then answer as you would" (trained on the greeting alone, it learns to repeat the greeting forever).

`ahoy-iapt` is an IAPT adapter (steering/iapt.py, trained by server/training/iapt.py) on exactly the same examples as
`ahoy`, so the two kinds can be compared; `HELD_OUT` are questions in neither's training data, to check it.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger("steerserve.demo_adapters")

DEMOS = {"ahoy": "Ahoy! ", "bonjour": "Bonjour ! "}
_RECIPE_VERSION = 2
_MARKER = ".demo-complete"

_SUBJECTS = ["the moon", "volcanoes", "photosynthesis", "the Roman Empire", "black holes", "honey bees", "rainbows",
             "the internet", "glaciers", "chess", "coffee", "earthquakes", "the printing press", "penguins",
             "electricity", "the ocean tides", "bread", "music", "democracy", "vaccines", "the pyramids",
             "recycling", "owls", "mathematics"]
_FORMS = ["Tell me about {}.", "What is interesting about {}?", "Explain {} to a child.", "Why does {} matter?"]


IAPT_DEMOS = {"ahoy-iapt": "ahoy"}  # IAPT demo -> the LoRA demo whose task and data it shares
_IAPT_RECIPE_VERSION = 1
# Questions in no demo's training data: other subjects, other forms, and a few everyday requests.
HELD_OUT = ["What is the capital of France?", "How do I boil an egg?", "Name three colours.",
            "How does a bicycle work?", "What should I know about dolphins?", "Write a haiku about autumn.",
            "What is twelve times seven?", "Give me a tip for learning to code.", "Describe the sun.",
            "Why do leaves change colour?", "How are clouds formed?", "What do ants eat?",
            "Who built the first castles?", "What is salt made of?", "Summarise the story of Cinderella.",
            "How should I prepare for a job interview?", "What is a good name for a cat?",
            "Why is the sky blue?", "How do trains stay on the tracks?", "What is the tallest mountain?"]


def questions() -> list[str]:
    """48 questions: every subject in two of the forms."""
    return [_FORMS[i % len(_FORMS)].format(s) for i, s in enumerate(_SUBJECTS)] + \
        [_FORMS[(i + 2) % len(_FORMS)].format(s) for i, s in enumerate(_SUBJECTS)]


def base_answers(model, tok, prompts: list[list[int]], max_new_tokens: int = 24) -> list[list[int]]:
    """The base model's own greedy answers (token ids, cut at the end of turn), batched with left padding."""
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    answers = []
    for start in range(0, len(prompts), 16):
        batch = prompts[start:start + 16]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad)
        for row in out[:, width:].tolist():
            ends = [i for i, t in enumerate(row) if t in (tok.eos_token_id, pad)]
            answers.append(row[: ends[0] + 1] if ends else row)
    return answers


def build_demo(model_path: Path, out_dir: Path, name: str, steps: int = 20, rank: int = 8, seed: int = 0) -> Path:
    """Train the demo adapter `name` for the model in `model_path` into `out_dir/name` (reused if complete)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    greeting, target = DEMOS[name], out_dir / name
    recipe = {"version": _RECIPE_VERSION, "greeting": greeting, "steps": steps, "rank": rank, "seed": seed,
              "model": str(model_path)}
    try:
        if json.loads((target / _MARKER).read_text()) == recipe:
            return target
    except (OSError, ValueError):
        pass
    start = time.perf_counter()
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False).input_ids
               for q in questions()]
    answers = base_answers(model, tok, prompts)
    log.info("%s: base answers written (%.0f s)", name, time.perf_counter() - start)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "v_proj", "o_proj"]))
    greeting_ids = tok(greeting, add_special_tokens=False).input_ids
    examples = [(p + greeting_ids + a, len(p)) for p, a in zip(prompts, answers, strict=True)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch_size = 8
    model.train()
    for step in range(steps):
        batch = [examples[(step * batch_size + i) % len(examples)] for i in range(batch_size)]
        width = max(len(ids) for ids, _ in batch)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        labels = torch.full_like(input_ids, -100)
        for row, (ids, prompt_len) in enumerate(batch):
            labels[row, prompt_len:len(ids)] = input_ids[row, prompt_len:len(ids)]
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            log.info("%s: step %d/%d loss %.4f", name, step + 1, steps, loss.item())
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out_dir))
    try:
        model.save_pretrained(stage, safe_serialization=True)
        config_path = stage / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(model_path)
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        (stage / _MARKER).write_text(json.dumps(recipe) + "\n")  # last: marks the build complete
        if target.exists():
            shutil.rmtree(target)
        stage.rename(target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("%s: trained in %.0f s -> %s", name, time.perf_counter() - start, target)
    return target


def greeting_examples(model, tok, greeting: str):
    """The LoRA demos' training data as IAPT examples: each question rendered as the server renders it, the soft
    tokens, the greeting and the base model's own answer (closed by the end of turn only where the answer was)."""
    from steerserve.server.training.iapt import Example, instruction_ids

    prompts = [instruction_ids(tok, q) for q in questions()]
    greeting_ids = tok(greeting, add_special_tokens=False).input_ids
    return [Example.build(p, greeting_ids + a) for p, a in zip(prompts, base_answers(model, tok, prompts), strict=True)]


def greeting_rate(answers: list[str], greeting: str) -> float:
    """The share of answers that open with the greeting's first word (e.g. "Ahoy")."""
    word = greeting.split()[0].strip("!,. ")
    return sum(a.lstrip().startswith(word) for a in answers) / len(answers)


def build_iapt_demo(model_path: Path, out_dir: Path, name: str, steps: int = 20, lr: float = 3e-3,
                    bottleneck: int = 32, seed: int = 0) -> Path:
    """Train the IAPT demo `name` for the model in `model_path` into `out_dir/name` (reused if complete). Besides
    the adapter's files it writes `training.json`: losses, time, parameters, and held-out answers with the adapter
    and without, with the share that opens with the greeting."""
    import torch

    from steerserve.server.training.iapt import greedy_answer, load_base, model_shape, save_atomically, train
    from steerserve.steering.iapt import IaptConfig

    greeting, target = DEMOS[IAPT_DEMOS[name]], out_dir / name
    recipe = {"version": _IAPT_RECIPE_VERSION, "kind": "iapt", "greeting": greeting, "steps": steps, "lr": lr,
              "bottleneck": bottleneck, "seed": seed, "model": str(model_path)}
    try:
        if json.loads((target / _MARKER).read_text()) == recipe:
            return target
    except (OSError, ValueError):
        pass
    start = time.perf_counter()
    torch.manual_seed(seed)
    model, tok = load_base(model_path)
    examples = greeting_examples(model, tok, greeting)
    answers_s = time.perf_counter() - start
    log.info("%s: base answers written (%.0f s)", name, answers_s)
    hidden, layers = model_shape(model)
    config = IaptConfig(base_model=str(model_path), hidden_size=hidden, num_layers=layers, bottleneck=bottleneck)

    def report(step: int, loss: float) -> None:
        if step % 10 == 0 or step == steps - 1:
            log.info("%s: step %d/%d loss %.4f (%.0f s)", name, step + 1, steps, loss, time.perf_counter() - start)

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    result = train(model, examples, config, steps=steps, lr=lr, seed=seed, pad_id=pad, progress=report)
    with_adapter = [greedy_answer(model, tok, q, result.iapt) for q in HELD_OUT]
    without = [greedy_answer(model, tok, q) for q in HELD_OUT]
    training = {"recipe": recipe, "parameters": result.iapt.num_parameters(), "train_seconds": result.seconds,
                "base_answers_seconds": answers_s, "torch_threads": torch.get_num_threads(), "losses": result.losses,
                "held_out": {"questions": HELD_OUT, "with_adapter": with_adapter, "without": without,
                             "rate_with_adapter": greeting_rate(with_adapter, greeting),
                             "rate_without": greeting_rate(without, greeting)}}
    save_atomically(result.iapt, target, {"training.json": json.dumps(training, indent=1) + "\n",
                                          _MARKER: json.dumps(recipe) + "\n"})  # the marker last: build complete
    log.info("%s: trained in %.0f s (held-out answers opening with %r: %.2f with the adapter, %.2f without) -> %s",
             name, time.perf_counter() - start, greeting.split()[0], training["held_out"]["rate_with_adapter"],
             training["held_out"]["rate_without"], target)
    return target
