"""Labelled classification tasks for calibration (ZeroTuning) and profiling: the JSONL format and its loader.

One JSON object per line, of three kinds:
- a task:  {"task": "sentiment", "template": "...{text}...", "choices": ["positive", "negative"],
            "system": "...", "chat": true}
  `template` holds `{text}` once; `choices` are the label words (each must start with a distinct token);
  `system` is an optional system message, `chat` (default true) renders the prompt with the model's chat
  template (user turn = the filled template, then the assistant turn opens), false uses the filled template
  as the raw prompt.
- an item of a task: {"task": "sentiment", "text": "...", "label": "positive", "split": "calibration"}
- a self-contained item: {"prompt": "...", "choices": [...], "label": "...", "task": "mine", "split": ...}
  (`prompt` is the whole user message; items of one `task` must share their choices).
`split` is "calibration" or "heldout"; items without it are split by position within their task and label
(even -> calibration, odd -> heldout), so a file of one's own needs no split field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SHIPPED = Path(__file__).parent / "data" / "classification.jsonl"
SPLITS = ("calibration", "heldout")


class TaskFileError(ValueError):
    """A malformed task file: the message names the file and line."""


@dataclass(frozen=True)
class Item:
    prompt: str  # the user message (template filled in)
    label: str
    split: str


@dataclass
class Task:
    name: str
    choices: tuple[str, ...]
    system: str | None = None
    chat: bool = True
    template: str | None = None
    items: list[Item] = field(default_factory=list)

    def split(self, which: str) -> list[Item]:
        return [it for it in self.items if it.split == which]


def load_tasks(path: str | Path = SHIPPED) -> dict[str, Task]:
    """The tasks of a task file, in file order, each with its items (at least one per task)."""
    path = Path(path)
    tasks: dict[str, Task] = {}
    pending: list[tuple[int, dict]] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskFileError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise TaskFileError(f"{path}:{n}: each line must be a JSON object")
        if "template" in obj:
            task = _task(obj, path, n)
            if task.name in tasks:
                raise TaskFileError(f"{path}:{n}: task {task.name!r} defined twice")
            tasks[task.name] = task
        else:
            pending.append((n, obj))
    counters: dict[tuple[str, str], int] = {}
    for n, obj in pending:
        where = f"{path}:{n}"
        if "prompt" in obj:
            name = str(obj.get("task", "custom"))
            choices = _choices(obj.get("choices"), where)
            task = tasks.setdefault(name, Task(name, choices, obj.get("system"), bool(obj.get("chat", True))))
            if task.choices != choices:
                raise TaskFileError(f"{where}: items of task {name!r} must share their choices")
            prompt = _string(obj["prompt"], "prompt", where)
        else:
            name = _string(obj.get("task"), "task", where)
            if name not in tasks:
                raise TaskFileError(f"{where}: unknown task {name!r} (define it with a template line)")
            task = tasks[name]
            prompt = task.template.replace("{text}", _string(obj.get("text"), "text", where))  # type: ignore[union-attr]
        label = _string(obj.get("label"), "label", where)
        if label not in task.choices:
            raise TaskFileError(f"{where}: label {label!r} is not one of {list(task.choices)}")
        split = obj.get("split")
        if split is None:
            k = counters[(name, label)] = counters.get((name, label), -1) + 1
            split = SPLITS[k % 2]
        if split not in SPLITS:
            raise TaskFileError(f"{where}: split must be one of {list(SPLITS)}")
        task.items.append(Item(prompt, label, split))
    empty = [name for name, t in tasks.items() if not t.items]
    if empty:
        raise TaskFileError(f"{path}: task {empty[0]!r} has no items")
    return tasks


def _task(obj: dict, path: Path, n: int) -> Task:
    where = f"{path}:{n}"
    template = _string(obj.get("template"), "template", where)
    if template.count("{text}") != 1:
        raise TaskFileError(f"{where}: template must contain {{text}} exactly once")
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise TaskFileError(f"{where}: system must be a string")
    return Task(_string(obj.get("task"), "task", where), _choices(obj.get("choices"), where), system,
                bool(obj.get("chat", True)), template)


def _choices(value: object, where: str) -> tuple[str, ...]:
    if not (isinstance(value, list) and len(value) >= 2 and all(isinstance(c, str) and c for c in value)):
        raise TaskFileError(f"{where}: choices must be a list of at least two non-empty strings")
    if len(set(value)) != len(value):
        raise TaskFileError(f"{where}: choices must be distinct")
    return tuple(value)


def _string(value: object, name: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise TaskFileError(f"{where}: {name} must be a non-empty string")
    return value


def render(tokenizer, task: Task, item: Item) -> list[int]:
    """The prompt token ids the model sees for an item: chat template (user turn, assistant turn opened) or raw."""
    if not task.chat:
        return tokenizer.encode(item.prompt)
    messages = ([{"role": "system", "content": task.system}] if task.system else []) + \
        [{"role": "user", "content": item.prompt}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def choice_token_ids(tokenizer, task: Task) -> list[int]:
    """The first token of each choice as the model would write it first in its answer: at the start of the
    assistant turn (chat), or after a space (raw prompts). Raises TaskFileError if two choices share it."""
    lead = "" if task.chat else " "
    ids = [tokenizer.encode(lead + c, add_special_tokens=False)[0] for c in task.choices]
    if len(set(ids)) != len(ids):
        raise TaskFileError(f"task {task.name!r}: choices {list(task.choices)} do not start with distinct tokens")
    return ids
