"""Training IAPT adapters (steering/iapt.py) on instruction/response pairs: `steerserve adapters train-iapt`.

The base model is a Hugging Face causal LM in fp32 with every weight frozen; only the IaptModel's generators are
trained (AdamW), with the same module and the same placement as `hf_soft_prompts` and the server (the training
forward is an exact, cheaper rearrangement of `hf_soft_prompts`'s: see `Prefixes`). One example is exactly what the
server will run for that chat:

    render(tokenizer, [user: instruction], add_generation_prompt=True).ids  +  4 x PLACEHOLDER_ID
    + response tokens  +  the end-of-turn token (the tokenizer's EOS, at which the server stops)

and the loss covers the response tokens and the end-of-turn token only (the logits at the last soft token predict
the first response token). Batches are right-padded; each row has its own instruction length.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerserve.server.frontend.chat import render
from steerserve.server.http.errors import BadRequest
from steerserve.steering.iapt import PLACEHOLDER_ID, SOFT_TOKENS, IaptConfig, IaptModel, hf_soft_prompts


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One training sequence: `instruction_len` instruction tokens, the soft placeholders, then the target tokens."""

    ids: tuple[int, ...]
    instruction_len: int

    @classmethod
    def build(cls, instruction_ids: Sequence[int], response_ids: Sequence[int]) -> Example:
        if not instruction_ids or not response_ids:
            raise DataError("an example needs at least one instruction token and one response token")
        return cls((*instruction_ids, *[PLACEHOLDER_ID] * SOFT_TOKENS, *response_ids), len(instruction_ids))

    @property
    def target_start(self) -> int:
        return self.instruction_len + SOFT_TOKENS


def instruction_ids(tokenizer, instruction: str) -> list[int]:
    """The token ids the server renders for a one-message chat, up to the generation prompt (server/frontend/chat.py)."""
    return render(tokenizer, [{"role": "user", "content": instruction}], add_generation_prompt=True).ids


def end_of_turn_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, so a response cannot be ended")
    return int(tokenizer.eos_token_id)


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """(instruction, response) pairs from a JSONL file of {"instruction": str, "response": str} objects; blank
    lines are skipped, anything else wrong is a DataError naming the line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with \"instruction\" and \"response\", got "
                            f"{type(row).__name__}")
        for key in ("instruction", "response"):
            if key not in row:
                raise DataError(f"{where}: missing {key!r}")
            if not isinstance(row[key], str) or not row[key].strip():
                raise DataError(f"{where}: {key!r} must be a non-empty string")
        pairs.append((row["instruction"], row["response"]))
    if not pairs:
        raise DataError(f"{path} holds no examples")
    return pairs


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], max_len: int | None = None) -> list[Example]:
    """Examples for (instruction, response) text pairs; each response is closed with the end-of-turn token."""
    end = end_of_turn_id(tokenizer)
    examples = []
    for i, (instruction, response) in enumerate(pairs):
        try:
            prompt = instruction_ids(tokenizer, instruction)
        except BadRequest as exc:
            raise DataError(f"example {i + 1}: {exc.message}") from None
        example = Example.build(prompt, [*tokenizer(response, add_special_tokens=False).input_ids, end])
        if max_len is not None and len(example.ids) > max_len:
            raise DataError(f"example {i + 1} is {len(example.ids)} tokens with the soft tokens, more than the "
                            f"model's context of {max_len}")
        examples.append(example)
    return examples


@dataclass
class TrainResult:
    iapt: IaptModel
    losses: list[float] = field(default_factory=list)  # per step, mean over the batch's target tokens
    seconds: float = 0.0


def collate(examples: Sequence[Example], pad_id: int):
    """Right-padded input ids, attention mask and labels (-100 outside the targets) of whole examples: the batch
    a plain HF forward under `hf_soft_prompts` takes (the reference for `Prefixes.loss`)."""
    import torch

    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.ids)] = torch.tensor(e.ids)
        mask[row, :len(e.ids)] = 1
        labels[row, e.target_start:len(e.ids)] = ids[row, e.target_start:len(e.ids)]
    return ids, mask, labels


class Prefixes:
    """The instructions' part of the forward, computed once: it comes before the soft tokens, so (causal
    attention) it does not depend on the adapter. Per instruction we keep each layer's input states (what the
    generators read) and K/V cache; a training step then runs, with gradients, only the soft tokens and the
    targets on top of that cache, each row at its own positions. The result equals the whole sequence's forward
    under `hf_soft_prompts` (tests/server/test_iapt_train.py checks loss and gradients); it is ~2-3x cheaper,
    which is what makes the demo train in minutes on a 2-core CPU."""

    def __init__(self, model):
        self.model, self.decoder = model, model.get_decoder()
        self.num_layers = len(self.decoder.layers)
        self._cache: dict[tuple[int, ...], tuple[list, list, list]] = {}

    def _get(self, instruction: tuple[int, ...]):
        import torch

        if instruction not in self._cache:
            with torch.no_grad():
                out = self.decoder(input_ids=torch.tensor([instruction]), use_cache=True, output_hidden_states=True)
            cache = out.past_key_values
            self._cache[instruction] = ([h[0] for h in out.hidden_states[:self.num_layers]],
                                        [layer.keys[0] for layer in cache.layers],
                                        [layer.values[0] for layer in cache.layers])
        return self._cache[instruction]

    def init_soft_states(self, iapt: IaptModel, examples: Sequence[Example]) -> None:
        """Start each layer's soft tokens (up.bias; per-layer projections only) at the mean state of the
        instructions' last token at that layer: the untrained adapter then barely changes the model (SmolLM2
        demo: loss 1.80 with it, 1.80 without soft tokens, 4.96 with the soft states at ~0), whereas the residual
        stream's scale grows ~200x with depth, which no data-free init matches."""
        import torch

        last = [self._get(e.ids[:e.instruction_len])[0] for e in examples]
        with torch.no_grad():
            for layer in range(self.num_layers):
                iapt.tensor("up.bias")[layer] = torch.stack([states[layer][-1] for states in last]).mean(0)

    def loss(self, iapt: IaptModel, batch: Sequence[Example], pad_id: int):
        """Mean cross-entropy over the batch's target tokens, differentiable in `iapt`'s parameters."""
        import torch
        from transformers import DynamicCache

        prefixes = [self._get(e.ids[:e.instruction_len]) for e in batch]
        lens = [e.instruction_len for e in batch]
        suffixes = [e.ids[e.instruction_len:] for e in batch]
        rows, width, tail = len(batch), max(lens), max(map(len, suffixes))
        layers = []
        for layer in range(self.num_layers):
            kv = []
            for part in (1, 2):
                first = prefixes[0][part][layer]
                padded = first.new_zeros((rows, first.shape[0], width, first.shape[2]))
                for b, prefix in enumerate(prefixes):
                    padded[b, :, :lens[b]] = prefix[part][layer]
                kv.append(padded)
            layers.append((kv[0], kv[1]))
        ids = torch.full((rows, tail), pad_id, dtype=torch.long)
        mask = torch.zeros((rows, width + tail), dtype=torch.long)
        for b, suffix in enumerate(suffixes):
            ids[b, :len(suffix)] = torch.tensor(suffix)
            mask[b, :lens[b]] = 1
            mask[b, width:width + len(suffix)] = 1
        positions = torch.tensor(lens)[:, None] + torch.arange(tail)[None, :]
        s = iapt.config.soft_tokens

        def hook(layer: int):
            def pre(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                soft = [iapt(layer, prefix[0][layer]) for prefix in prefixes]
                hidden = hidden.clone()
                for b in range(rows):
                    hidden[b, :s] = soft[b].to(hidden.dtype)
                return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
            return pre

        handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(self.decoder.layers)]
        try:
            out = self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                               past_key_values=DynamicCache(layers), use_cache=True)
        finally:
            for h in handles:
                h.remove()
        # the state at suffix index j predicts the token at j + 1; targets start at index s
        which = [(b, j) for b, suffix in enumerate(suffixes) for j in range(s - 1, len(suffix) - 1)]
        index_b, index_j = torch.tensor([w[0] for w in which]), torch.tensor([w[1] for w in which])
        logits = self.model.get_output_embeddings()(out.last_hidden_state[index_b, index_j])
        return torch.nn.functional.cross_entropy(logits.float(), ids[index_b, index_j + 1])


def train(model, examples: Sequence[Example], config: IaptConfig, *, steps: int, lr: float = 1e-3,
          batch_size: int = 8, seed: int = 0, weight_decay: float = 0.0, pad_id: int = 0,
          progress: Callable[[int, float], Any] | None = None) -> TrainResult:
    """Train a fresh IaptModel for `config` on `examples` through the frozen HF `model` (fp32). Batches walk a
    seeded shuffle of the examples, epoch after epoch; the learning rate warms up over the first 10% of the steps
    and then follows a cosine down to 10%. `progress(step, loss)` is called after each step."""
    import torch

    if not examples:
        raise DataError("no training examples")
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError("steps, batch_size and lr must be positive")
    start = time.perf_counter()
    torch.manual_seed(seed)
    model.requires_grad_(False)
    model.eval()  # no dropout; gradients still flow to the generators through the frozen layers
    iapt = IaptModel(config)
    iapt.reset_parameters(torch.Generator().manual_seed(seed))
    prefixes = Prefixes(model)
    if not config.shared:
        prefixes.init_soft_states(iapt, examples)
    iapt.train()
    optimizer = torch.optim.AdamW(iapt.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (
        1 + math.cos(math.pi * max(0, s - warmup) / max(1, steps - warmup)))))
    order: list[int] = []
    shuffler = random.Random(seed)
    result = TrainResult(iapt)
    for step in range(steps):
        batch = []
        while len(batch) < min(batch_size, len(examples)):
            if not order:
                order = list(range(len(examples)))
                shuffler.shuffle(order)
            batch.append(examples[order.pop()])
        loss = prefixes.loss(iapt, batch, pad_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(iapt.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
        if progress is not None:
            progress(step, result.losses[-1])
    iapt.eval()
    result.seconds = time.perf_counter() - start
    return result


def save_atomically(iapt: IaptModel, target: Path, extra_files: dict[str, str] | None = None) -> Path:
    """Write the adapter's files into a fresh directory beside `target`, then swap it in (a reader never sees half
    an adapter). `extra_files` (name -> text) are written last, e.g. a completion marker."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        iapt.save(stage)
        for name, text in (extra_files or {}).items():
            (stage / name).write_text(text)
        for item in (stage, *stage.iterdir()):  # mkdtemp's 0700 (and safetensors' 0600) would hide the adapter
            item.chmod(0o755 if item.is_dir() else 0o644)  # from a server running as another user
        if target.exists():
            shutil.rmtree(target)
        stage.rename(target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def load_base(model_path: Path | str):
    """The frozen fp32 HF model and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.requires_grad_(False)
    return model.eval(), tok


def model_shape(model) -> tuple[int, int]:
    """(hidden size, number of decoder layers) of an HF decoder."""
    return int(model.config.hidden_size), len(model.get_decoder().layers)


def train_iapt(model_path: Path, data: Path, out: Path, *, bottleneck: int = 32, degrees: tuple[int, int] = (5, 4),
               shared: bool = False, steps: int = 200, lr: float = 3e-3, batch_size: int = 8, seed: int = 0,
               base_model: str | None = None, show_progress: bool = True) -> TrainResult:
    """The whole `train-iapt` command: read and check the data, train, write `out` atomically."""
    from tqdm import tqdm

    pairs = read_pairs(data)  # before the minutes of loading: bad data fails at once
    model, tok = load_base(model_path)
    hidden, layers = model_shape(model)
    config = IaptConfig(base_model=base_model or str(model_path), hidden_size=hidden, num_layers=layers,
                        bottleneck=bottleneck, degrees=tuple(degrees), shared=shared)  # type: ignore[arg-type]
    examples = encode_pairs(tok, pairs, getattr(model.config, "max_position_embeddings", None))
    pad = tok.pad_token_id if tok.pad_token_id is not None else end_of_turn_id(tok)
    with tqdm(total=steps, desc="train-iapt", unit="step", disable=not show_progress) as bar:
        def tick(_step: int, loss: float) -> None:
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}")

        result = train(model, examples, config, steps=steps, lr=lr, batch_size=batch_size, seed=seed, pad_id=pad,
                       progress=tick)
    save_atomically(result.iapt, out)
    return result


def greedy_answer(model, tok, instruction: str, iapt: IaptModel | None = None, max_new_tokens: int = 24) -> str:
    """The greedy answer of the HF model to a one-message chat, with the adapter (instruction + soft tokens, as
    the server runs it) or without (the base model's plain prompt)."""
    import torch

    prompt = instruction_ids(tok, instruction)
    ids = prompt + [PLACEHOLDER_ID] * SOFT_TOKENS if iapt is not None else prompt
    pad = tok.pad_token_id if tok.pad_token_id is not None else end_of_turn_id(tok)
    with torch.no_grad():
        if iapt is None:
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad)
        else:
            with hf_soft_prompts(model, iapt, [len(prompt)]):
                out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=pad)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)
