"""Registration refuses what a LoRA or IAPT adapter's files claim but cannot be (issue: bounded input): config
fields of the wrong type, matrices that are not 2-D, safetensors offsets that do not match dtype x shape, headers
too deep or too large, an IAPT bottleneck past the hidden size, and a config that disagrees with its tensors.
Each is AdapterInvalid (a 400 naming the check), never another exception (a 500). The files are written with the
`safetensors` library and PEFT, then edited the way a hostile or broken upload would be."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from steerserve.server.adapters.registry import AdapterInvalid, ServedModel, inspect_iapt, inspect_lora
from steerserve.server.adapters.safetensors_header import MAX_HEADER_BYTES, tensor_shapes
from tests.tiny_models import TINY_LLAMA, build_tiny_iapt, build_tiny_llama, build_tiny_lora

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, ServedModel]:
    path = build_tiny_llama(tmp_path_factory.mktemp("validation") / "tiny-llama", seed=0)
    return path, ServedModel.from_checkpoint(path, "tiny-llama", max_lora_rank=8)


@pytest.fixture(scope="module")
def good(base, tmp_path_factory) -> Path:
    return build_tiny_lora(tmp_path_factory.mktemp("lora") / "qv", base[0], rank=4, targets=("q_proj", "v_proj"))


@pytest.fixture
def lora(good, tmp_path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "lora"))


def edit_config(path: Path, file: str = CONFIG, **changes) -> None:
    (path / file).write_text(json.dumps({**json.loads((path / file).read_text()), **changes}))


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_header(path: Path, header: dict | bytes, data: bytes) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def refused(path: Path, served: ServedModel, check: str, inspect=inspect_lora) -> str:
    with pytest.raises(AdapterInvalid) as info:
        inspect(path, served)
    assert info.value.code == f"adapter_{check}" and info.value.status == 400, info.value.message
    return info.value.message


def test_the_valid_adapter_passes(lora, base):
    meta = inspect_lora(lora, base[1])
    assert meta["rank"] == 4 and meta["target_modules"] == ["q_proj", "v_proj"]
    # the library agrees with our header reader on every tensor
    from safetensors import safe_open

    with safe_open(lora / WEIGHTS, "np") as f:
        assert {k: list(f.get_slice(k).get_shape()) for k in f.keys()} == tensor_shapes(lora / WEIGHTS)


@pytest.mark.parametrize("field, value", [("r", "abc"), ("r", 4.5), ("r", True), ("rank_pattern", [1]),
                                          ("rank_pattern", {"q_proj": "8"}), ("lora_alpha", "x"),
                                          ("target_modules", 7), ("target_modules", [1, 2]), ("use_dora", "yes")])
def test_config_fields_of_the_wrong_type(lora, base, field, value):
    edit_config(lora, **{field: value})
    assert field in refused(lora, base[1], "config")


def test_config_that_disagrees_with_its_tensors(lora, base):
    edit_config(lora, target_modules=["lm_head"])  # the weights are q_proj and v_proj
    assert "target_modules" in refused(lora, base[1], "config")
    edit_config(lora, target_modules=["q_proj", "v_proj"], r=2)  # the tensors have rank 4
    assert "rank 4" in refused(lora, base[1], "config")
    edit_config(lora, r=2, rank_pattern={"q_proj": 4, "v_proj": 4})  # now declared: accepted
    assert inspect_lora(lora, base[1])["rank"] == 4


def test_matrices_must_be_2d(lora, base):
    header, data = header_of(lora / WEIGHTS)
    key = next(k for k in header if "lora_A" in k)
    r, d = header[key]["shape"]
    header[key]["shape"] = [r, d // 2, 2]  # same bytes, three dimensions
    write_header(lora / WEIGHTS, header, data)
    assert "2-D" in refused(lora, base[1], "files")


def test_data_offsets_must_match_dtype_and_shape(lora, base):
    """A 1-byte tensor that claims a full matrix (it passed before: only the offsets' bounds were checked)."""
    header, data = header_of(lora / WEIGHTS)
    keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    first = keys[0]
    begin, end = header[first]["data_offsets"]
    shrink = end - begin - 1
    header[first]["data_offsets"] = [begin, begin + 1]
    for k in keys[1:]:
        b, e = header[k]["data_offsets"]
        header[k]["data_offsets"] = [b - shrink, e - shrink]
    write_header(lora / WEIGHTS, header, data[:begin + 1] + data[end:])
    assert "needs" in refused(lora, base[1], "files")


@pytest.mark.parametrize("case", ["gap", "overlap", "trailing bytes", "unknown dtype", "negative shape",
                                  "deep", "not an object", "extra key"])
def test_malformed_headers(lora, base, case):
    header, data = header_of(lora / WEIGHTS)
    key = next(k for k in header if k != "__metadata__")
    if case == "gap":
        data = data + b"\0" * 4
        for k in header:
            if k != "__metadata__":
                header[k]["data_offsets"] = [o + 4 for o in header[k]["data_offsets"]]
    elif case == "overlap":
        other = next(k for k in header if k not in ("__metadata__", key))
        header[other]["data_offsets"] = header[key]["data_offsets"]
        header[other]["shape"], header[other]["dtype"] = header[key]["shape"], header[key]["dtype"]
    elif case == "trailing bytes":
        data += b"\0" * 8
    elif case == "unknown dtype":
        header[key]["dtype"] = "F128"
    elif case == "negative shape":
        header[key]["shape"] = [-1, 4]
    elif case == "extra key":
        header[key]["offsets"] = [0, 0]
    header_bytes = (b"[" * 100_000 + b"]" * 100_000 if case == "deep" else
                    b"[1, 2]" if case == "not an object" else json.dumps(header).encode())
    write_header(lora / WEIGHTS, header_bytes, data)
    refused(lora, base[1], "files")


def test_header_too_large(lora, base):
    with (lora / WEIGHTS).open("wb") as f:  # the length alone is refused: nothing that large is read
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    assert "at most" in refused(lora, base[1], "files")


def test_config_nested_too_deeply(lora, base):
    (lora / CONFIG).write_text("[" * 100_000 + "]" * 100_000)
    refused(lora, base[1], "files")


def test_iapt_bottleneck_has_an_upper_bound(base, tmp_path):
    path = build_tiny_iapt(tmp_path / "iapt", base[0], bottleneck=TINY_LLAMA["hidden_size"] + 1)
    assert "bottleneck" in refused(path, base[1], "config", inspect_iapt)
