"""URIAL: the exact prompt text (against the structure written out here, independently of the module), the
prefixes, stop strings, and the clean-up (inner code fences kept; streaming equals non-streaming)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steerserve.steering import urial
from steerserve.steering.model import SpecError

TICKS = "`" * 3
PREFIX = "# Instruction\n\nBe helpful.\n\n"  # any text: rendering appends to it verbatim


def block(role: str, text: str) -> str:
    """URIAL's `SeparatorStyle.URIAL` as URIAL's own code renders it: "\\n" + role + "\\n```\\n" + m + "\\n```\\n"."""
    return "\n" + role + "\n" + TICKS + "\n" + text + "\n" + TICKS + "\n"


OPEN_ANSWER = "\n# Answer:\n" + TICKS + "\n"


def test_single_turn_is_prefix_query_and_open_answer():
    prefix, rest = urial.render(PREFIX, [("user", "What is 2+2?")])
    assert prefix == PREFIX
    assert prefix + rest == PREFIX + "\n# Query:\n```\nWhat is 2+2?\n```\n" + "\n# Answer:\n```\n"


def test_multi_turn_appends_past_turns_as_examples():
    history = [("user", "Q1"), ("assistant", "A1\nwith two lines"), ("user", "Q2")]
    prefix, rest = urial.render(PREFIX, history)
    # URIAL's structure (docs/methods/urial.md), rendered [Q1, A1, Q2]:
    # PREFIX + "\n# Query:\n```\nQ1\n```\n\n# Answer:\n```\nA1\n```\n..."
    expected = (PREFIX + "\n# Query:\n```\nQ1\n```\n" + "\n# Answer:\n```\nA1\nwith two lines\n```\n"
                + "\n# Query:\n```\nQ2\n```\n" + "\n# Answer:\n```\n")
    assert prefix + rest == expected
    assert rest == block("# Query:", "Q1") + block("# Answer:", "A1\nwith two lines") + block("# Query:", "Q2") \
        + OPEN_ANSWER


def test_system_messages_become_an_instruction_section_after_the_prefix():
    prefix, rest = urial.render(PREFIX, [("system", "Answer in French."), ("developer", "Be brief."), ("user", "Hi")])
    assert prefix == PREFIX  # the prefix (and its cached KV) is untouched by a system prompt
    assert rest == "\n# Instruction\n\nAnswer in French.\n\nBe brief.\n" + block("# Query:", "Hi") + OPEN_ANSWER


@pytest.mark.parametrize("messages, field", [
    ([("user", "a"), ("system", "s"), ("user", "b")], "messages.1.role"),
    ([("user", "a"), ("assistant", "b")], "messages"),
    ([("tool", "x"), ("user", "a")], "messages.0.role"),
    ([("system", "s")], "messages"),
])
def test_histories_urial_cannot_render_are_refused(messages, field):
    with pytest.raises(SpecError) as err:
        urial.render(PREFIX, messages)
    assert err.value.field == field


def until_stop(generated: str) -> str:
    """What vLLM returns for `generated` with URIAL's stop strings: the text before the first one (excluded)."""
    return generated[:min((i for s in urial.STOP_STRINGS if (i := generated.find(s)) >= 0), default=None)]


def test_stop_strings_end_the_answer_where_the_next_turn_starts():
    """A model that answers and then goes on in the prompt's own format (writing the next query) is stopped
    right at the next turn, and the clean-up gives back exactly its answer, inner code fences included."""
    answer = "Sure.\n\n# Steps\n\n" + CODE_ANSWER  # a Markdown heading in an answer is not a next turn
    _, rest = urial.render(PREFIX, [("user", "Q1"), ("assistant", answer), ("user", "Q2")])
    opened = rest.index(OPEN_ANSWER) + len(OPEN_ANSWER)  # the first answer block, as the model would write it
    generated = rest[opened:] + "Next answer.\n" + TICKS + "\n"
    kept = until_stop(generated)
    assert urial.clean(kept) == answer
    assert generated[len(kept):].startswith(block("# Query:", "Q2").lstrip("\n"))  # stopped at the query header


@pytest.mark.parametrize("name", sorted(urial.BUILTIN_PREFIXES))
def test_no_stop_string_fires_inside_the_examples_answers(name):
    """The model imitates the prefix's answers: none of them may contain a stop string, or answers like them
    would be cut short."""
    _, examples = urial.split_examples(urial.BUILTIN_PREFIXES[name])
    for i, ex in enumerate(examples):
        opened = ex.index(OPEN_ANSWER) + len(OPEN_ANSWER)
        answer = ex[opened:].removesuffix("\n" + TICKS + "\n")
        following = "".join(examples[i + 1:]) or block("# Query:", "next")
        assert urial.clean(until_stop(ex[opened:] + following)) == answer


@pytest.mark.parametrize("name", sorted(urial.BUILTIN_PREFIXES))
def test_builtin_prefixes_have_urials_structure(name):
    text = urial.BUILTIN_PREFIXES[name]
    head, examples = urial.split_examples(text)
    assert head.startswith("# Instruction\n\n") and len(examples) == 3
    assert head + "".join(examples) == text and text.endswith(TICKS + "\n")
    for ex in examples:  # each: a fenced query, then a fenced answer
        assert ex.startswith(block("# Query:", "")[:11]) and ex.count("\n# Answer:\n" + TICKS + "\n") == 1
    assert "# Query" not in text.split("\n# Answer:\n")[-1]  # no stop string fires inside the last example


def test_help_prefix_has_no_refusal_and_default_has_one():
    assert "can't help" in urial.BUILTIN_PREFIXES["default"]
    assert "can't" not in urial.BUILTIN_PREFIXES["help"] and "decline" not in urial.BUILTIN_PREFIXES["help"]


def test_examples_keeps_the_first_k():
    text = urial.BUILTIN_PREFIXES["default"]
    head, examples = urial.split_examples(text)
    assert urial.select_prefix(text, None, "f") == text == urial.select_prefix(text, 3, "f")
    assert urial.select_prefix(text, 1, "f") == head + examples[0]
    assert urial.select_prefix(text, 0, "f") == head
    with pytest.raises(SpecError) as err:
        urial.select_prefix(text, 4, "steering.prompt.urial.examples")
    assert err.value.field == "steering.prompt.urial.examples" and "3 examples" in err.value.reason


# --- clean-up ------------------------------------------------------------------------------------------------

CODE_ANSWER = "Hello! Here it is:\n\n```python\nprint('hi')\n```\n\nEnjoy!"


@pytest.mark.parametrize("raw, expected", [
    ("Paris.\n```\n\n", "Paris."),                                    # stopped at "# Query": closing fence dropped
    ("  Paris.\n```", "Paris."),
    ("Paris.", "Paris."),                                             # ended without a fence (EOS or length)
    (CODE_ANSWER + "\n```\n\n", CODE_ANSWER),                         # inner fences kept, closing one dropped
    ("Code:\n```python\nx = 1\n```", "Code:\n```python\nx = 1\n```"),  # balanced: the last fence is the code's
    ("Code:\n```python\nx = 1\n```\n```", "Code:\n```python\nx = 1\n```"),
    ("Use `x` here.\n```", "Use `x` here."),                          # inline backticks are not fences
    ("```", ""),
])
def test_clean_drops_only_the_closing_fence(raw, expected):
    assert urial.clean(raw) == expected


def stream(raw: str, cuts: list[int]) -> tuple[str, list[str]]:
    cleaner, chunks = urial.StreamCleaner(), []
    bounds = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    pieces = [raw[a:b] for a, b in zip(bounds, bounds[1:], strict=False)] or [""]
    for i, piece in enumerate(pieces):
        chunks.append(cleaner.feed(piece, final=i == len(pieces) - 1))
    return "".join(chunks), chunks


@pytest.mark.parametrize("raw", [CODE_ANSWER + "\n```\n\n", "Paris.\n```\n\n", "x\n```python\ny\n```\n```"])
def test_streaming_never_sends_the_closing_fence(raw):
    joined, chunks = stream(raw, list(range(len(raw))))  # one character at a time
    assert joined == urial.clean(raw)
    assert not any(TICKS in c for c in chunks[:-1] if raw.count(TICKS) == 1)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab `\n#py")), max_size=60), st.lists(st.integers(0, 80), max_size=12))
def test_streamed_clean_up_equals_clean_for_any_chunking(raw, cuts):
    assert stream(raw, cuts)[0] == urial.clean(raw)
