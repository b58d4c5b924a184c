"""The IAPT trainer (server/training/iapt.py) on a tiny random Llama: examples as the server renders them, the
cached-prefix loss against a whole forward under `hf_soft_prompts`, a short training run through the CLI, bad
data; and the trained demo's behaviour when it has been built (not built here: minutes of CPU)."""
from __future__ import annotations

import json

import pytest
import torch

from steerserve.server.adapters.registry import ServedModel, inspect_iapt
from steerserve.server.cli import main
from steerserve.server.training import iapt as T
from steerserve.steering.iapt import PLACEHOLDER_ID, IaptConfig, IaptModel, hf_soft_prompts
from tests.tiny_models import build_tiny_llama

PAIRS = [("What is the model?", "It is a server of tokens."), ("Say hello.", "hello hello"),
         ("Name an expert.", "The steering vector changes attention heads and layers."), ("a", "b c d")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("iapt-train") / "llama", seed=0)


@pytest.fixture(scope="module")
def base(tiny):
    return T.load_base(tiny)


def test_examples_are_the_servers_prompt_then_placeholders_then_response_and_end_of_turn(base):
    _, tok = base
    (example,) = T.encode_pairs(tok, [("Say hello.", "hello there")])
    text = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=False,
                                   add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False).input_ids
    assert text.endswith("<|im_start|>assistant\n")
    assert list(example.ids) == [*prompt, *[PLACEHOLDER_ID] * 4, *tok("hello there", add_special_tokens=False).input_ids,
                                 tok.eos_token_id]
    assert example.instruction_len == len(prompt) and example.target_start == len(prompt) + 4


def test_cached_prefix_loss_and_gradients_equal_the_whole_forward(base, tiny):
    model, tok = base
    examples = T.encode_pairs(tok, PAIRS)
    iapt = IaptModel(IaptConfig(str(tiny), 128, 2, bottleneck=8))
    with torch.no_grad():  # away from the init, so every parameter gets a gradient
        for p in iapt.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ids, mask, labels = T.collate(examples, tok.pad_token_id)
    with hf_soft_prompts(model, iapt, [e.instruction_len for e in examples]):
        reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    reference.backward()
    expected = {k: p.grad.clone() for k, p in iapt.named_parameters()}
    iapt.zero_grad()
    loss = T.Prefixes(model).loss(iapt, examples, tok.pad_token_id)
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    for name, p in iapt.named_parameters():
        assert expected[name].abs().max() > 0, name
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-3, atol=1e-4 * expected[name].abs().max().item())


def test_untrained_adapter_starts_close_to_the_base_model(base, tiny):
    """The data-dependent init (soft states = the mean last-instruction state per layer) barely moves the loss."""
    model, tok = base
    examples = T.encode_pairs(tok, PAIRS)
    prefixes = T.Prefixes(model)
    zero_init = IaptModel(IaptConfig(str(tiny), 128, 2, bottleneck=8))
    with torch.no_grad():
        data_init = IaptModel(zero_init.config)
        data_init.load_state_dict(zero_init.state_dict())
        prefixes.init_soft_states(data_init, examples)
        plain = [T.Example((*e.ids[:e.instruction_len], *e.ids[e.target_start:]), e.instruction_len - 4)
                 for e in examples]  # the same targets right after the instruction, no soft tokens
        ids, mask, labels = T.collate(plain, tok.pad_token_id)
        without = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        started = prefixes.loss(data_init, examples, tok.pad_token_id).item()
    assert abs(started - without) < abs(prefixes.loss(zero_init, examples, tok.pad_token_id).item() - without)


@pytest.mark.parametrize("shared", [False, True])
def test_train_iapt_command_lowers_the_loss_and_writes_a_valid_adapter(tiny, tmp_path, capsys, shared):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"instruction": i, "response": r}) + "\n" for i, r in PAIRS) + "\n")
    out = tmp_path / "adapter"
    assert main(["adapters", "train-iapt", "--model", str(tiny), "--data", str(data), "--out", str(out),
                 "--bottleneck", "8", "--degrees", "3", "2", "--steps", "25", "--lr", "1e-2", "--batch-size",
                 "4", *(["--shared"] if shared else [])]) == 0
    printed = capsys.readouterr().out
    first, last = (float(x) for x in printed.split("loss ")[1].split(" (")[0].split(" -> "))
    assert last < 0.7 * first, printed
    assert sorted(p.name for p in out.iterdir()) == ["iapt_config.json", "iapt_model.safetensors"]
    loaded = IaptModel.load(out)
    assert loaded.config == IaptConfig(str(tiny), 128, 2, bottleneck=8, degrees=(3, 2), shared=shared)
    meta = inspect_iapt(out, ServedModel.from_checkpoint(tiny, "tiny", 8))
    assert meta["parameters"] == loaded.num_parameters() and meta["degrees"] == [3, 2]


@pytest.mark.parametrize("lines, message", [
    ([], "holds no examples"),
    (["{not json"], ":1: not valid JSON"),
    (['["a", "b"]'], ":1: expected an object"),
    (['{"instruction": "a", "response": "b"}', '{"instruction": "a"}'], ":2: missing 'response'"),
    (['{"instruction": "", "response": "b"}'], ":1: 'instruction' must be a non-empty string"),
    (['{"instruction": "a", "response": 3}'], ":1: 'response' must be a non-empty string"),
])
def test_bad_data_is_rejected_naming_the_line(tmp_path, lines, message, tiny, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(T.DataError, match=message.replace("[", r"\[")):
        T.read_pairs(data)
    assert main(["adapters", "train-iapt", "--model", str(tiny), "--data", str(data), "--out",
                 str(tmp_path / "never"), "--steps", "1"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_built_demo_opens_held_out_answers_with_its_greeting():
    """Only where `steerserve adapters build-demo ahoy-iapt` has been run (CI does not build it)."""
    from steerserve.server.adapters.demos import HELD_OUT, greeting_rate
    from steerserve.server.models.store import cache_root

    demo, model_dir = cache_root() / "adapters" / "ahoy-iapt", cache_root() / "models" / "smollm2-135m-instruct"
    if not (demo / ".demo-complete").is_file() or not model_dir.is_dir():
        pytest.skip("the ahoy-iapt demo is not built")
    model, tok = T.load_base(model_dir)
    meta = inspect_iapt(demo, ServedModel.from_checkpoint(model_dir, "smollm2-135m-instruct", 8))
    assert meta["layers"] == 30
    iapt = IaptModel.load(demo)
    questions = HELD_OUT[:4]
    with_adapter = [T.greedy_answer(model, tok, q, iapt, max_new_tokens=4) for q in questions]
    without = [T.greedy_answer(model, tok, q, max_new_tokens=4) for q in questions]
    assert greeting_rate(with_adapter, "Ahoy! ") >= 0.75, with_adapter
    assert greeting_rate(without, "Ahoy! ") == 0, without
