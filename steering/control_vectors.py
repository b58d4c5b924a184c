"""A control vector: one direction per decoder layer, the value that activation steering (the `vectors` family)
adds to or ablates from the residual stream, whatever file or request it came from.

Layer convention (the same as llama.cpp's `direction.N` tensors and repeng's layer ids): `directions[l]` acts on
the residual stream *at the output of* decoder layer `l`, 0-based; that is the stream layer `l + 1` reads (in
vLLM's decoder layers, the sum `hidden_states + residual` that layer `l` returns). A GGUF file cannot hold layer 0
(llama.cpp refuses `direction.0`), so a vector with a layer-0 direction is only ever inline or safetensors.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


class VectorError(ValueError):
    """A control vector that cannot be used on the served model: `check` names the failed check
    ("hidden_size", "layers", "finite", "empty")."""

    def __init__(self, check: str, reason: str):
        super().__init__(reason)
        self.check, self.reason = check, reason


@dataclass(frozen=True, eq=False)
class ControlVector:
    """directions: {0-based decoder layer: float32 array of shape (hidden_size,)}; model_hint: the architecture or
    model name the file says it was made for ("" if none), informative only."""

    directions: Mapping[int, np.ndarray]
    model_hint: str = ""

    @staticmethod
    def of(directions: Mapping[int, object], model_hint: str = "") -> ControlVector:
        """A vector from any array-likes (lists, numpy, torch on CPU), copied to contiguous float32."""
        return ControlVector({int(layer): np.ascontiguousarray(np.asarray(d, dtype=np.float32)).reshape(-1)
                              for layer, d in sorted(directions.items())}, model_hint)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.directions))

    @property
    def hidden_size(self) -> int:
        return len(next(iter(self.directions.values()))) if self.directions else 0

    def check(self, hidden_size: int, num_layers: int) -> None:
        """Raises `VectorError` unless the vector fits a model with these sizes and holds only finite numbers."""
        if not self.directions:
            raise VectorError("empty", "the vector has no layers")
        for layer, d in self.directions.items():
            if not 0 <= layer < num_layers:
                raise VectorError("layers", f"layer {layer} is outside the model's decoder layers 0..{num_layers - 1}")
            if d.shape != (hidden_size,):
                raise VectorError("hidden_size", f"layer {layer} has {d.size} values; the model's hidden size is "
                                                 f"{hidden_size}")
            if not np.isfinite(d).all():
                raise VectorError("finite", f"layer {layer} holds NaN or infinite values")
            if not d.any():
                raise VectorError("empty", f"layer {layer} is all zeros")

    def digest(self) -> str:
        """A content hash (layers and float32 bytes), stable across processes: what caches and salts key on."""
        h = hashlib.sha256()
        for layer in self.layers:
            h.update(f"{layer}:".encode())
            h.update(self.directions[layer].astype("<f4", copy=False).tobytes())
        return h.hexdigest()[:32]

    def norm(self, layer: int) -> float:
        return math.sqrt(float(np.dot(self.directions[layer], self.directions[layer])))
