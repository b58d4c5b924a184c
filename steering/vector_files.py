"""Control vector files: GGUF as llama.cpp and repeng write them, and safetensors, to and from `ControlVector`.

GGUF (what llama.cpp's `--control-vector` loads, what its `cvector-generator` and repeng's `export_gguf` write):
`general.architecture = "controlvector"`, `controlvector.model_hint` (a string, informative), and
`controlvector.layer_count` (uint32, the number of direction tensors); one 1-D F32 tensor `direction.N` per layer,
all of one length (the hidden size). N is the 0-based decoder layer at whose *output* the direction acts (see
`steering/control_vectors.py`); llama.cpp refuses `direction.0`, so neither reader nor writer accepts layer 0 here.
llama.cpp itself reads only the tensors; we also refuse a file whose architecture is set to anything else (a model
file is not a vector).

safetensors: one 1-D tensor per layer named `direction.N` (the same names, layer 0 allowed), float32 (float16 and
float64 are converted), optional metadata `model_hint`.

Which format a byte string is in is told by its magic bytes (`sniff`), never by a file name or content type.
"""
from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from pathlib import Path

import numpy as np

from .control_vectors import ControlVector, VectorError

ARCH = "controlvector"
GGUF_MAGIC = b"GGUF"
_DIRECTION = re.compile(r"direction\.(\d{1,6})")
FORMATS = ("gguf", "safetensors")


class VectorFileError(VectorError):
    """A file that is not a control vector we can read (check "format"), or a vector one format cannot hold."""

    def __init__(self, reason: str):
        super().__init__("format", reason)


def sniff(data: bytes) -> str | None:
    """"gguf" or "safetensors" by the file's first bytes, or None."""
    if data[:4] == GGUF_MAGIC:
        return "gguf"
    if len(data) >= 10:
        (header_len,) = struct.unpack("<Q", data[:8])
        if 2 <= header_len <= len(data) - 8 and data[8:9] == b"{":
            return "safetensors"
    return None


def read_vector(data: bytes) -> ControlVector:
    """The vector in a GGUF or safetensors file's bytes; VectorFileError if it is neither, or malformed. Sizes,
    layers and values are not checked against a model here (`ControlVector.check` does that)."""
    kind = sniff(data)
    if kind == "gguf":
        return _read_gguf(data)
    if kind == "safetensors":
        return _read_safetensors(data)
    raise VectorFileError("not a GGUF or safetensors file (checked by its first bytes)")


def read_vector_file(path: str | os.PathLike[str]) -> ControlVector:
    return read_vector(Path(path).read_bytes())


def to_bytes(vector: ControlVector, fmt: str) -> bytes:
    """The vector as a file of format `fmt` ("gguf" or "safetensors")."""
    if fmt == "gguf":
        return _gguf_bytes(vector)
    if fmt == "safetensors":
        return _safetensors_bytes(vector)
    raise ValueError(f"unknown vector format {fmt!r}; known: {', '.join(FORMATS)}")


def write_vector_file(vector: ControlVector, path: str | os.PathLike[str]) -> Path:
    """Write the vector to `path` (GGUF for a `.gguf` suffix, else safetensors), atomically."""
    path = Path(path)
    data = to_bytes(vector, "gguf" if path.suffix.lower() == ".gguf" else "safetensors")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


# --- GGUF ---

def _gguf_bytes(vector: ControlVector) -> bytes:
    import gguf

    if 0 in vector.directions:
        raise VectorFileError("a GGUF control vector cannot hold layer 0 (llama.cpp refuses direction.0); "
                              "use safetensors, or leave layer 0 out")
    if not vector.directions:
        raise VectorFileError("the vector has no layers")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vector.gguf"
        writer = gguf.GGUFWriter(str(path), ARCH)
        writer.add_string(f"{ARCH}.model_hint", vector.model_hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(vector.directions))
        for layer in vector.layers:
            writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(vector.directions[layer], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def _gguf_string(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not field.data:
        return None
    try:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (UnicodeDecodeError, IndexError, TypeError):
        raise VectorFileError(f"GGUF key {key!r} is not a UTF-8 string") from None


def _read_gguf(data: bytes) -> ControlVector:
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vector.gguf"
        path.write_bytes(data)
        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as exc:  # the gguf package raises ValueError, struct.error, IndexError... on bad files
            raise VectorFileError(f"not a readable GGUF file: {type(exc).__name__}: {exc}") from None
        arch = _gguf_string(reader, "general.architecture")
        if arch is not None and arch != ARCH:
            raise VectorFileError(f"the GGUF file's architecture is {arch!r}, not {ARCH!r}: a model or adapter "
                                  f"file, not a control vector")
        hint = _gguf_string(reader, f"{ARCH}.model_hint") or ""
        directions: dict[int, np.ndarray] = {}
        for tensor in reader.tensors:
            match = _DIRECTION.fullmatch(tensor.name)
            if match is None:
                raise VectorFileError(f"unexpected tensor {tensor.name!r}: a control vector holds only "
                                      f"direction.N tensors")
            layer = int(match.group(1))
            if layer == 0:
                raise VectorFileError("direction.0 is not a valid layer in a GGUF control vector (llama.cpp "
                                      "refuses it)")
            if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
                raise VectorFileError(f"{tensor.name} is {tensor.tensor_type.name}; control vectors are F32")
            if len([d for d in tensor.shape if d != 1]) > 1 or tensor.n_elements < 1:
                raise VectorFileError(f"{tensor.name} is not 1-D (shape {list(tensor.shape)})")
            if layer in directions:
                raise VectorFileError(f"{tensor.name} appears twice")
            directions[layer] = np.array(tensor.data, dtype=np.float32).reshape(-1)  # a copy: the file goes away
    return _vector(directions, hint)


# --- safetensors ---

def _safetensors_bytes(vector: ControlVector) -> bytes:
    from safetensors.numpy import save

    if not vector.directions:
        raise VectorFileError("the vector has no layers")
    tensors = {f"direction.{layer}": np.ascontiguousarray(vector.directions[layer], dtype=np.float32)
               for layer in vector.layers}
    return save(tensors, metadata={"model_hint": vector.model_hint})


def _read_safetensors(data: bytes) -> ControlVector:
    from safetensors.numpy import load

    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + header_len])
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError, TypeError for unknown dtypes, ...
        raise VectorFileError(f"not a readable safetensors file: {type(exc).__name__}: {exc}") from None
    meta = header.get("__metadata__") or {}
    directions: dict[int, np.ndarray] = {}
    for name, array in tensors.items():
        match = _DIRECTION.fullmatch(name)
        if match is None:
            raise VectorFileError(f"unexpected tensor {name!r}: name one tensor per layer direction.N (N the "
                                  f"0-based decoder layer)")
        if array.dtype not in (np.float32, np.float16, np.float64):
            raise VectorFileError(f"{name} is {array.dtype}; use float32")
        if array.ndim != 1 or array.size < 1:
            raise VectorFileError(f"{name} is not 1-D (shape {list(array.shape)})")
        directions[int(match.group(1))] = array.astype(np.float32)
    return _vector(directions, str(meta.get("model_hint", "")))


def _vector(directions: dict[int, np.ndarray], hint: str) -> ControlVector:
    if not directions:
        raise VectorFileError("the file holds no direction tensors")
    sizes = {d.size for d in directions.values()}
    if len(sizes) > 1:
        raise VectorFileError(f"the direction tensors differ in length ({sorted(sizes)})")
    return ControlVector.of(directions, hint)
