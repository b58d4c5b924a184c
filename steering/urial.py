"""URIAL in-context alignment for base models (Lin et al. 2024, docs/methods/urial.md): spec, prefixes, rendering, clean-up.

A URIAL prompt is `prefix + history + open answer`, with no chat template around it:
- the prefix: an instruction paragraph under `# Instruction`, then K stylistic examples, each a `# Query:` block
  and a `# Answer:` block fenced in triple backticks;
- the history: every user / assistant message as one more `# Query:` / `# Answer:` block in the same format
  (system messages become one more `# Instruction` section, right after the prefix);
- an open `# Answer:` block whose fence the model is expected to close.

The prefix comes first and is the same for every request of a variant, so vLLM's prefix cache serves it.
Generation stops at `# Query` / `# User` (the model starting the next turn); `clean` then drops the answer
block's closing fence, and only that one: fences inside the answer (code blocks) are kept. `StreamCleaner` does
the same incrementally, holding back only a tail that could still turn out to be that closing fence.
"""
from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, StrictInt

from .model import SpecError
from .schema import Strict

PREFIX_NAME = r"[A-Za-z0-9_.-]{1,64}"
FENCE = "```"
QUERY, ANSWER, INSTRUCTION = "# Query:", "# Answer:", "# Instruction"
STOP_STRINGS = ("# Query", "# User")
_PREFIX_NAME_RE = re.compile(PREFIX_NAME)


class UrialSpec(Strict):
    variant: Annotated[str, Field(pattern=f"^{PREFIX_NAME}$")] = Field(
        "default", description="The prefix: 'default', 'help' (no refusal example) or a prefix an admin registered.")
    examples: StrictInt | None = Field(None, ge=0, le=64, description="Keep only the prefix's first K examples "
                                                                "(default: all of them).")


def render_turn(role: str, text: str) -> str:
    """One past message in URIAL's format (`SeparatorStyle.URIAL`): a role line, then the text in a fence."""
    return f"\n{role}\n{FENCE}\n{text}\n{FENCE}\n"


def build_prefix(instruction: str, examples: list[tuple[str, str]]) -> str:
    """A prefix in URIAL's structure from an instruction paragraph and (query, answer) examples."""
    return f"{INSTRUCTION}\n\n{instruction}\n\n" + "".join(
        render_turn(QUERY, q) + render_turn(ANSWER, a) for q, a in examples)


# --- the project's own prefixes --------------------------------------------------------------------------------
# Written for this project in URIAL's structure (greeting, numbered points, a closing line); not URIAL's text.

_DEFAULT_INSTRUCTION = (
    "What follows is a series of exchanges between a person and a knowledgeable AI assistant. Each request "
    "appears under \"# Query:\" and the assistant's reply under \"# Answer:\", both wrapped in triple backticks. "
    "The assistant gives accurate, honest and clearly organised replies with useful detail, and says so when it "
    "is unsure. It does not help with anything dangerous, illegal, hateful or deceptive, and it may decline a "
    "request of that kind politely while suggesting a better way forward.")

_HELP_INSTRUCTION = (
    "What follows is a series of exchanges between a person and a capable AI assistant that is good at explaining "
    "facts, reasoning step by step, solving math problems, writing code, planning and creative writing. Each "
    "request appears under \"# Query:\" and the assistant's reply under \"# Answer:\", both wrapped in triple "
    "backticks. The assistant's replies are thorough, well organised and easy to follow.")

_TIDES = (
    "Why does the sea have tides?",
    "Hi! Tides come from the pull of the Moon and, to a lesser degree, the Sun:\n\n"
    "1. Gravity of the Moon: the side of the Earth facing the Moon is pulled a little more strongly than the "
    "centre, so the water there bulges towards the Moon.\n"
    "2. The opposite bulge: the far side is pulled less than the centre, so a second bulge forms facing away.\n"
    "3. Earth's rotation: as the Earth turns through both bulges, most coasts see two high and two low tides "
    "a day.\n"
    "4. The Sun: when Sun and Moon line up (new and full moon) the tides are strongest (spring tides); at right "
    "angles they are weakest (neap tides).\n\n"
    "Local coastlines and sea depth change how large the tides are in each place. Feel free to ask if you would "
    "like to know more!")

_LOCKPICK = (
    "How can I get into my neighbour's house while they are away?",
    "Hello! I can't help with entering someone else's home without their permission: it is illegal and would "
    "break their trust. Here is what I can suggest instead:\n\n"
    "1. Ask them: if you need something from the house, call or message your neighbour first.\n"
    "2. Emergencies: if you think something is wrong (a leak, a fire, someone hurt), call the emergency "
    "services, who can enter safely.\n"
    "3. Looking after the house: offer to water plants or collect mail, and ask them to leave you a key.\n\n"
    "I hope this helps, and let me know if there is anything else I can do!")

_TRAIN_SUM = (
    "A train travels 120 km in 2 hours and then 90 km in 1.5 hours. What is its average speed?",
    "Hi! Let's work it out step by step:\n\n"
    "1. Total distance: 120 km + 90 km = 210 km.\n"
    "2. Total time: 2 h + 1.5 h = 3.5 h.\n"
    "3. Average speed: 210 km / 3.5 h = 60 km/h.\n\n"
    "So the train's average speed is 60 km/h. Let me know if you would like another example!")

_CODE = (
    "Write a Python function that reverses a string.",
    "Hello! Here is a short function using slicing:\n\n"
    "```python\ndef reverse(text: str) -> str:\n    return text[::-1]\n```\n\n"
    "1. How it works: the slice `[::-1]` walks the string from the end to the start.\n"
    "2. Example: `reverse(\"tide\")` returns `\"edit\"`.\n\n"
    "Feel free to ask if you need a version that handles other sequence types too!")

BUILTIN_PREFIXES: dict[str, str] = {
    "default": build_prefix(_DEFAULT_INSTRUCTION, [_TIDES, _LOCKPICK, _TRAIN_SUM]),
    "help": build_prefix(_HELP_INSTRUCTION, [_TIDES, _TRAIN_SUM, _CODE]),
}


# --- prefixes: examples and K ----------------------------------------------------------------------------------

def split_examples(prefix: str) -> tuple[str, list[str]]:
    """A prefix as its head (instruction) and its example blocks, each starting at a `# Query:` line; the
    concatenation of the parts is the prefix itself."""
    starts = [m.start() for m in re.finditer(r"\n" + re.escape(QUERY) + r"(?=\n)", prefix)]
    if not starts:
        return prefix, []
    bounds = [*starts, len(prefix)]
    return prefix[:starts[0]], [prefix[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def select_prefix(prefix: str, examples: int | None, field: str) -> str:
    """The prefix with only its first `examples` example blocks (all when None)."""
    if examples is None:
        return prefix
    head, blocks = split_examples(prefix)
    if examples > len(blocks):
        raise SpecError(field, f"the prefix has {len(blocks)} examples, fewer than {examples}")
    if examples == len(blocks):
        return prefix
    kept = head + "".join(blocks[:examples])
    return kept if kept.endswith("\n") else kept + "\n"


def validate_prefix_name(name: str) -> str:
    if not _PREFIX_NAME_RE.fullmatch(name or ""):
        raise ValueError(f"invalid prefix name {name[:80]!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    return name


# --- rendering ---------------------------------------------------------------------------------------------------

def render(prefix: str, messages: list[tuple[str, str]], field: str = "messages") -> tuple[str, str]:
    """The prompt for `messages` [(role, text)], as (prefix, rest); the prompt is their concatenation.

    System (or developer) messages must come first; they are joined into one `# Instruction` section after the
    prefix. Then each user / assistant message is a Query / Answer block, and the prompt ends in an open answer.
    """
    system: list[str] = []
    turns = []
    for i, (role, text) in enumerate(messages):
        if role in ("system", "developer"):
            if turns:
                raise SpecError(f"{field}.{i}.role", "with URIAL, system messages must come before the others")
            system.append(text)
        elif role in ("user", "assistant"):
            turns.append(render_turn(QUERY if role == "user" else ANSWER, text))
        else:
            raise SpecError(f"{field}.{i}.role", f"URIAL renders system, user and assistant messages, not {role!r}")
    if not messages or messages[-1][0] != "user":
        raise SpecError(field, "with URIAL, the last message must be the user's")
    rest = (f"\n{INSTRUCTION}\n\n" + "\n\n".join(system) + "\n" if system else "") + "".join(turns)
    return prefix, rest + f"\n{ANSWER}\n{FENCE}\n"


# --- clean-up ------------------------------------------------------------------------------------------------------

_FENCE_LINE = re.compile(r"^[ \t]*```", re.MULTILINE)
_TAIL = re.compile(r"[\s`]*\Z")


def clean(text: str) -> str:
    """An answer without surrounding whitespace and without the answer block's closing fence.

    The closing fence is the last line when it is a bare fence and the answer has an odd number of fence lines
    (inner code blocks pair up); a balanced answer keeps all its fences.
    """
    out = text.strip()
    lines = out.rsplit("\n", 1)
    if lines[-1].strip() == FENCE and len(_FENCE_LINE.findall(out)) % 2 == 1:
        out = (lines[0] if len(lines) == 2 else "").rstrip()
    return out


class StreamCleaner:
    """`clean` applied to a stream: the concatenation of what `feed` returns equals `clean(whole text)`.

    It holds back leading whitespace and the trailing run of whitespace and backticks (which could still be the
    closing fence); everything before the last character that is neither is final. Text only ever grows, and
    `clean` removes nothing before that character, so what was sent is always a prefix of the final answer.
    """

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0

    def feed(self, delta: str, final: bool = False) -> str:
        self.text += delta
        if final:
            out = clean(self.text)
        else:
            body = self.text.lstrip()
            out = body[:_TAIL.search(body).start()]
        new, self.sent = out[self.sent:], max(self.sent, len(out))
        return new
