"""Registration checks of IAPT adapters (`inspect_iapt` in server/adapters/registry.py) against a tiny served model: a valid
adapter's metadata, and each way an adapter can be wrong rejected with the check's name."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steerserve.server.adapters.registry import INSPECTORS, AdapterInvalid, ServedModel, inspect_iapt
from steerserve.steering.iapt import CONFIG_FILE, WEIGHTS_FILE, IaptConfig, IaptModel
from tests.tiny_models import TINY_LLAMA, build_tiny_llama

D, LAYERS = TINY_LLAMA["hidden_size"], TINY_LLAMA["num_hidden_layers"]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> ServedModel:
    path = build_tiny_llama(tmp_path_factory.mktemp("iapt-inspect") / "tiny-llama", seed=0)
    return ServedModel.from_checkpoint(path, "tiny-served", max_lora_rank=8)


def write(path: Path, **overrides) -> Path:
    config = {"base_model": "/somewhere/tiny-llama", "hidden_size": D, "num_layers": LAYERS, "bottleneck": 8,
              **overrides}
    IaptModel(IaptConfig(**config)).save(path)
    return path


def edit_config(path: Path, **changes) -> None:
    raw = json.loads((path / CONFIG_FILE).read_text())
    raw.update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(raw))


def test_decoder_shape_from_the_served_linear_layers(served):
    assert served.decoder_shape() == (D, LAYERS)
    assert ServedModel(frozenset(), {}, 8).decoder_shape() is None


@pytest.mark.parametrize("shared", [False, True])
def test_valid_adapter_is_accepted_with_its_facts(served, tmp_path, shared):
    path = write(tmp_path / "a", shared=shared, degrees=[3, 2])
    meta = INSPECTORS["iapt"](path, served)
    assert meta == {"bottleneck": 8, "degrees": [3, 2], "shared": shared, "soft_tokens": 4, "layers": LAYERS,
                    "hidden_size": D, "parameters": IaptModel.load(path).num_parameters(),
                    "base_model": "/somewhere/tiny-llama"}
    # the served name works as well as the directory name
    edit_config(path, base_model="Tiny-Served")
    assert inspect_iapt(path, served)["base_model"] == "Tiny-Served"


def truncate(path: Path) -> None:
    weights = path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])


def wrong_shape(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / WEIGHTS_FILE))
    tensors["queries"] = torch.zeros(LAYERS, 4, 9)
    save_file(tensors, str(path / WEIGHTS_FILE))


def missing_tensor(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / WEIGHTS_FILE))
    del tensors["act.den"]
    save_file(tensors, str(path / WEIGHTS_FILE))


@pytest.mark.parametrize("damage, check, message", [
    (lambda p: (p / CONFIG_FILE).unlink(), "files", "iapt_config.json is missing"),
    (lambda p: (p / WEIGHTS_FILE).unlink(), "files", "iapt_model.safetensors is missing"),
    (lambda p: (p / CONFIG_FILE).write_text("{oops"), "files", "not valid JSON"),
    (lambda p: (p / CONFIG_FILE).write_text("[1, 2]"), "files", "not valid JSON"),
    (truncate, "files", "corrupt"),
    (lambda p: (p / WEIGHTS_FILE).write_bytes(b"\x01"), "files", "corrupt"),
    (wrong_shape, "files", "queries has shape [2, 4, 9]"),
    (missing_tensor, "files", "expected"),
    (lambda p: edit_config(p, rank=8), "config", "unknown fields ['rank']"),
    (lambda p: edit_config(p, hidden_size="128"), "config", "hidden_size must be int"),
    (lambda p: edit_config(p, shared=1), "config", "shared must be bool"),
    (lambda p: edit_config(p, degrees=[5]), "config", "degrees must be two integers"),
    (lambda p: edit_config(p, degrees=[5, 40]), "config", "rational degrees"),
    (lambda p: edit_config(p, soft_tokens=8), "config", "soft_tokens must be 4"),
    (lambda p: edit_config(p, bottleneck=0), "config", "must be positive"),
    (lambda p: edit_config(p, num_layers=None), "config", "num_layers must be int"),
    (lambda p: edit_config(p, base_model="smollm2-135m-instruct"), "base_model", "trained for"),
    (lambda p: write(p, hidden_size=D * 2), "architecture", f"hidden size {D * 2} and {LAYERS} layers"),
    (lambda p: write(p, num_layers=LAYERS + 1), "architecture", f"{LAYERS + 1} layers"),
])
def test_bad_adapter_is_rejected_naming_the_check(served, tmp_path, damage, check, message):
    path = write(tmp_path / "a")
    damage(path)
    with pytest.raises(AdapterInvalid, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        inspect_iapt(path, served)
    assert info.value.check == check and info.value.code == f"adapter_{check}"
