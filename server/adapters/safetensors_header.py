"""A safetensors file's header, read and checked without reading its data: registration trusts nothing in it.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the data. The
checks are those of the safetensors library's own loader, so a file that passes here loads there: a bounded header
(`MAX_HEADER_BYTES`), a JSON object of exactly that structure (so no deep nesting gets far), known dtypes,
shapes of non-negative integers, each tensor's byte length equal to dtype size x the product of its shape, and
the tensors tiling the data exactly (no gaps, no overlaps, nothing past the end)."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

MAX_HEADER_BYTES = 16 * 2**20  # an adapter's header is kilobytes (about 150 bytes per tensor)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_TENSOR_KEYS = {"dtype", "shape", "data_offsets"}


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_header(path: Path, max_bytes: int = MAX_HEADER_BYTES) -> tuple[dict, int]:
    """The header of `path` as a JSON object, and the length of the data after it; ValueError saying what is wrong
    (OSError if unreadable). Checks only the framing: the header's length and that it is a JSON object."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > max_bytes:
            raise ValueError(f"header of {header_len} bytes; at most {max_bytes} are accepted")
        if header_len > size - 8:
            raise ValueError("header length points past the end of the file")
        text = f.read(header_len)
    try:
        header = json.loads(text)
    except RecursionError:
        raise ValueError("header is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, size - 8 - header_len


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from the header of `path`, every check of the module docstring applied; ValueError
    saying what is wrong (OSError if unreadable)."""
    header, data_len = read_header(path)
    shapes, spans = {}, []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise ValueError("__metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict) or set(info) != _TENSOR_KEYS:
            raise ValueError(f"tensor {key!r}: expected exactly {sorted(_TENSOR_KEYS)}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"tensor {key!r}: unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(n) for n in shape):
            raise ValueError(f"tensor {key!r}: shape must be a list of at most 8 non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(n) for n in offsets)):
            raise ValueError(f"tensor {key!r}: data_offsets must be two non-negative integers")
        begin, end = offsets
        if not begin <= end <= data_len:
            raise ValueError(f"tensor {key!r} lies outside the file (truncated?)")
        if end - begin != DTYPE_BYTES[dtype] * math.prod(shape):
            raise ValueError(f"tensor {key!r}: {end - begin} bytes of data, but {dtype} x {shape} needs "
                             f"{DTYPE_BYTES[dtype] * math.prod(shape)}")
        shapes[key] = list(shape)
        spans.append((begin, end, key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            raise ValueError(f"tensor {key!r} {'overlaps another' if begin < position else 'leaves a gap before it'}")
        position = end
    if position != data_len:
        raise ValueError(f"{data_len - position} bytes of data after the last tensor")
    return shapes
