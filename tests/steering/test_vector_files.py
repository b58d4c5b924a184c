"""Control vector files against references we did not write: GGUF files written with the `gguf` package exactly
the way repeng's `export_gguf` writes them, and our GGUF output read back with the `gguf` package through the
rules of llama.cpp's control vector loader (`common_control_vector_load_one` + `llama_adapter_cvec::apply`),
written out plainly below; safetensors through the `safetensors` package itself."""
from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load, save

from steerserve.steering.control_vectors import ControlVector, VectorError
from steerserve.steering.vector_files import (
    VectorFileError,
    read_vector,
    read_vector_file,
    sniff,
    to_bytes,
    write_vector_file,
)

HIDDEN, LAYERS = 16, 6


def directions(layers=(1, 3, 5), seed=0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {layer: rng.standard_normal(HIDDEN).astype(np.float32) for layer in layers}


def repeng_export_gguf(path: Path, model_type: str, dirs: dict[int, np.ndarray]) -> None:
    """What repeng's ControlVector.export_gguf does (repeng/extract.py), step by step."""
    arch = "controlvector"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", model_type)
    writer.add_uint32(f"{arch}.layer_count", len(dirs))
    for layer in dirs:
        writer.add_tensor(f"direction.{layer}", dirs[layer])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_control_vector(path: Path, n_layer: int) -> tuple[int, np.ndarray]:
    """(n_embd, the buffer llama.cpp applies): the loader's checks (every tensor `direction.<k>` with k > 0, F32,
    1-D, one length; layer k's values at offset (k - 1) * n_embd, missing layers zero), then `apply`, which hands
    layer il (1 <= il < n_layer) the slice at (il - 1) * n_embd. Raises AssertionError where llama.cpp refuses."""
    reader = gguf.GGUFReader(str(path))
    n_embd, data = -1, np.zeros(0, np.float32)
    for tensor in reader.tensors:
        match = re.fullmatch(r"direction\.(-?\d+)", tensor.name)
        assert match, f"invalid/unparsable direction tensor layer index: {tensor.name}"
        layer = int(match.group(1))
        assert layer > 0, "invalid (zero) direction tensor layer index"
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, "invalid (non-F32) direction tensor type"
        assert len(tensor.shape) == 1, "invalid (non-1D) direction tensor shape"
        n_embd = int(tensor.n_elements) if n_embd == -1 else n_embd
        assert tensor.n_elements == n_embd, "direction tensor does not match previous dimensions"
        if data.size < layer * n_embd:
            data = np.concatenate([data, np.zeros(layer * n_embd - data.size, np.float32)])
        data[(layer - 1) * n_embd:layer * n_embd] += np.asarray(tensor.data, np.float32)  # summed, as llama.cpp
    applied = np.zeros(n_layer * n_embd, np.float32)
    for il in range(1, n_layer):
        off = n_embd * (il - 1)
        if off + n_embd <= data.size:
            applied[il * n_embd:(il + 1) * n_embd] = data[off:off + n_embd]
    return n_embd, applied.reshape(n_layer, n_embd)


def test_a_repeng_gguf_reads_with_its_layers_and_hint(tmp_path):
    dirs = directions()
    repeng_export_gguf(tmp_path / "v.gguf", "llama", dirs)
    vector = read_vector_file(tmp_path / "v.gguf")
    assert vector.layers == (1, 3, 5) and vector.model_hint == "llama"
    for layer, d in dirs.items():
        np.testing.assert_array_equal(vector.directions[layer], d)


def test_our_gguf_is_what_llama_cpp_loads_layer_for_layer(tmp_path):
    vector = ControlVector.of(directions(), "llama")
    path = write_vector_file(vector, tmp_path / "ours.gguf")
    n_embd, per_layer = llama_cpp_control_vector(path, LAYERS)
    assert n_embd == HIDDEN
    for layer in range(LAYERS):  # llama.cpp adds per_layer[il] at the output of block il
        expected = vector.directions.get(layer, np.zeros(HIDDEN, np.float32))
        np.testing.assert_array_equal(per_layer[layer], expected)
    reader = gguf.GGUFReader(str(path))
    field = reader.get_field("general.architecture")
    assert bytes(field.parts[field.data[0]]).decode() == "controlvector"
    count = reader.get_field("controlvector.layer_count")
    assert int(count.parts[count.data[0]][0]) == 3
    hint = reader.get_field("controlvector.model_hint")
    assert bytes(hint.parts[hint.data[0]]).decode() == "llama"


def test_gguf_round_trips_bit_for_bit():
    vector = ControlVector.of(directions((2, 4)), "qwen2")
    back = read_vector(to_bytes(vector, "gguf"))
    assert back.digest() == vector.digest() and back.model_hint == "qwen2"


def test_layer_zero_is_refused_in_gguf_both_ways(tmp_path):
    with pytest.raises(VectorFileError, match="direction.0"):
        to_bytes(ControlVector.of(directions((0, 1))), "gguf")
    repeng_export_gguf(tmp_path / "zero.gguf", "llama", directions((0, 2)))
    with pytest.raises(VectorFileError, match="direction.0"):
        read_vector_file(tmp_path / "zero.gguf")


def test_safetensors_holds_layer_zero_and_uses_the_documented_names():
    vector = ControlVector.of(directions((0, 3)), "llama")
    data = to_bytes(vector, "safetensors")
    tensors = load(data)  # the safetensors package, not our reader
    assert sorted(tensors) == ["direction.0", "direction.3"]
    np.testing.assert_array_equal(tensors["direction.3"], vector.directions[3])
    assert read_vector(data).digest() == vector.digest()
    written_elsewhere = save({"direction.7": np.ones(HIDDEN, np.float16)})
    assert read_vector(written_elsewhere).directions[7].dtype == np.float32


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b"not a vector at all"), "not a GGUF or safetensors"),
    (lambda p: p.write_bytes(b"GGUF\x03\x00\x00\x00garbage"), "not a readable GGUF"),
    (lambda p: p.write_bytes(save({"layer.3": np.ones(HIDDEN, np.float32)})), "unexpected tensor 'layer.3'"),
    (lambda p: p.write_bytes(save({"direction.1": np.ones((2, HIDDEN), np.float32)})), "not 1-D"),
    (lambda p: p.write_bytes(save({"direction.1": np.ones(4, np.float32), "direction.2": np.ones(5, np.float32)})),
     "differ in length"),
    (lambda p: p.write_bytes(save({"direction.1": np.ones(4, np.int32)})), "use float32"),
])
def test_malformed_files_are_refused_with_the_reason(tmp_path, make, reason):
    path = tmp_path / "bad"
    make(path)
    with pytest.raises(VectorFileError, match=reason) as err:
        read_vector_file(path)
    assert err.value.check == "format"


def test_a_model_file_is_not_a_vector(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "model.gguf"), "llama")
    writer.add_tensor("direction.1", np.ones(HIDDEN, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(VectorFileError, match="architecture is 'llama'"):
        read_vector_file(tmp_path / "model.gguf")


def test_magic_bytes_tell_the_format():
    vector = ControlVector.of(directions((1,)))
    assert sniff(to_bytes(vector, "gguf")) == "gguf"
    assert sniff(to_bytes(vector, "safetensors")) == "safetensors"
    assert sniff(b"{\"data\": {}}") is None and sniff(b"") is None


@pytest.mark.parametrize("mutate, check", [
    (lambda d: {1: d[1][:-1]}, "hidden_size"),
    (lambda d: {LAYERS: d[1]}, "layers"),
    (lambda d: {1: np.where(np.arange(HIDDEN) == 3, np.nan, d[1])}, "finite"),
    (lambda d: {1: np.zeros(HIDDEN)}, "empty"),
])
def test_checks_against_a_model_survive_the_file_round_trip(mutate, check):
    vector = read_vector(to_bytes(ControlVector.of(mutate(directions((1,)))), "safetensors"))
    with pytest.raises(VectorError) as err:
        vector.check(HIDDEN, LAYERS)
    assert err.value.check == check
