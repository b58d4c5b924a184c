"""Activation steering with control vectors (the `vectors` family, docs/methods/vectors.md): add a direction to
the residual stream, or remove the component along one, at the output of chosen decoder layers, per request.

Semantics, applied item by item in the order of the list, at the output of each selected decoder layer l (the
residual stream after layer l, `steering.control_vectors` for the layer convention, llama.cpp's `direction.N`):
    add      h <- h + scale * v_l             (v_l / |v_l| first if `normalize`)
    ablate   h <- h - (h . u) u,  u = v_l / |v_l|      (`scale` absent or 1)
for the selected tokens: "all", "prompt" (positions < the prompt length) or "generated" (positions >= it: the
tokens generated so far as they are fed back, so the first generated token is sampled from the prompt's last,
unsteered, position).

`VectorItem` is the spec of one item: exactly one of `name` (the vector store's) and `data` (inline, a few
layers). The frontend resolves named items (`resolved`) before `compile_vectors` turns the list into a
`VectorsPlan`: each distinct vector once, as base64 float32 bytes with its digest, and the ops that use it.
"""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, PrivateAttr, field_validator, model_validator

from .control_vectors import ControlVector, VectorError
from .model import ModelFacts, SpecError
from .plan import PlanPart, finite
from .schema import Strict

MAX_ITEMS = 16  # items per request
MAX_INLINE_LAYERS = 8  # layers of one inline vector
MAX_INLINE_VALUES = 65536  # floats in one inline vector, all layers together (about 1 MB of JSON)
MAX_HIDDEN = 65536
TOKENS = ("all", "prompt", "generated")
MODES = ("add", "ablate")
_LAYER_KEY = re.compile(r"^\d{1,5}$")

Direction = Annotated[list[float], Field(min_length=1, max_length=MAX_HIDDEN)]


class VectorItem(Strict):
    """One control vector applied to a request. Exactly one of `name` and `data`."""

    name: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$",
                             description="A vector in the vector store (GET /v1/steering/vectors).")
    data: dict[str, Direction] | None = Field(
        None, min_length=1, max_length=MAX_INLINE_LAYERS,
        description='Inline directions, {"<decoder layer>": [hidden_size floats]}, at most 8 layers; layer l acts '
                    "on the residual stream at the output of decoder layer l (llama.cpp's direction.l).")
    scale: float | None = Field(None, ge=-1e4, le=1e4, description="add: the multiplier of each direction "
                                "(default 1); ablate: absent or 1.")
    layers: Literal["all"] | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=1024)] \
        | None = Field(None, description='Decoder layers to steer (0-based); default or "all": every layer the '
                                         "vector has. A layer the vector lacks is an error.")
    tokens: Literal["all", "prompt", "generated"] | None = Field(
        None, description="all (default): every token; prompt: prompt tokens only; generated: generated tokens only.")
    mode: Literal["add", "ablate"] | None = Field(
        None, description="add (default): h + scale * v; ablate: h - (h . u) u with u = v / |v|.")
    normalize: bool | None = Field(None, description="add: scale each layer's direction to unit length first "
                                                     "(default false).")
    _vector: ControlVector | None = PrivateAttr(None)

    @field_validator("data")
    @classmethod
    def _data(cls, value: dict[str, list[float]] | None) -> dict[str, list[float]] | None:
        for key in value or ():
            if not _LAYER_KEY.match(key):
                raise ValueError(f"{key!r} is not a decoder layer index")
        if value and len({int(key) for key in value}) < len(value):
            raise ValueError("two keys name the same layer")
        if value and sum(len(d) for d in value.values()) > MAX_INLINE_VALUES:
            raise ValueError(f"inline data holds more than {MAX_INLINE_VALUES} values; put the vector in the store")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> VectorItem:
        if (self.name is None) == (self.data is None):
            raise ValueError("give exactly one of name (a stored vector) and data (inline directions)")
        if self.mode == "ablate" and self.scale not in (None, 1.0):
            raise ValueError("ablate removes the direction's component: scale must be absent or 1")
        return self


Vectors = Annotated[list[VectorItem], Field(max_length=MAX_ITEMS)]


def resolved(item: VectorItem, vector: ControlVector) -> VectorItem:
    """A copy of a named item that carries the store's vector (what `compile_vectors` applies for it)."""
    if item.name is None:
        raise ValueError("only a named item is resolved from the store")
    copy = item.model_copy()
    copy._vector = vector
    return copy


def vector_of(item: VectorItem, field: str) -> ControlVector:
    """The vector an item applies: the store's (resolved) or its inline data."""
    if item.data is not None:
        return ControlVector.of({int(k): v for k, v in item.data.items()})
    if item._vector is None:
        raise SpecError(f"{field}.name", f"the vector {item.name!r} was not resolved from the vector store")
    return item._vector


@dataclass(frozen=True)
class VectorData:
    """One distinct vector of a plan, restricted to the layers its ops use: `size` floats per layer, as base64 of
    little-endian float32 bytes, layer after layer; `digest` is `ControlVector.digest()` of exactly that."""

    digest: str
    layers: tuple[int, ...]
    size: int
    data: str

    @staticmethod
    def of(vector: ControlVector, layers: tuple[int, ...]) -> VectorData:
        sub = ControlVector({layer: vector.directions[layer] for layer in layers})
        raw = b"".join(sub.directions[layer].astype("<f4", copy=False).tobytes() for layer in layers)
        return VectorData(sub.digest(), layers, vector.hidden_size, base64.b64encode(raw).decode())

    def directions(self) -> dict[int, np.ndarray]:
        flat = np.frombuffer(base64.b64decode(self.data, validate=True), dtype="<f4")
        if flat.size != self.size * len(self.layers):
            raise ValueError("plan: vector data does not match its layers and size")
        return {layer: flat[i * self.size:(i + 1) * self.size].astype(np.float32)
                for i, layer in enumerate(self.layers)}


@dataclass(frozen=True)
class VectorOp:
    """One item of the list, compiled: `vector` indexes the plan's `vectors`."""

    vector: int
    layers: tuple[int, ...]
    scale: float = 1.0
    tokens: str = "all"
    mode: str = "add"
    normalize: bool = False


@dataclass(frozen=True)
class VectorsPlan(PlanPart):
    """Control vectors of one request: the distinct vectors (each once) and the ops, in the request's order."""

    FAMILY: ClassVar[str] = "vectors"
    HIDDEN_STATE: ClassVar[bool] = True

    vectors: tuple[VectorData, ...] = ()
    ops: tuple[VectorOp, ...] = ()

    def is_noop(self) -> bool:
        return not self.ops

    def salt_key(self, prompt_len: int) -> Any:
        """The ops with their vectors' digests (not the data); with `tokens` prompt or generated, which positions
        are steered depends on the prompt length, so it enters too (a generated-only request's cached blocks
        hold steered generated tokens that another request's longer prompt must not read)."""
        key = [[self.vectors[op.vector].digest, op.layers, op.scale, op.tokens, op.mode, op.normalize]
               for op in self.ops]
        return [key, prompt_len] if any(op.tokens != "all" for op in self.ops) else key

    def directions(self) -> list[dict[int, np.ndarray]]:
        return [v.directions() for v in self.vectors]

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> VectorsPlan:
        vectors = tuple(VectorData(str(v["digest"]), tuple(int(x) for x in v["layers"]), int(v["size"]),
                                   str(v["data"])) for v in raw.get("vectors", ()))
        ops = tuple(VectorOp(int(o["vector"]), tuple(int(x) for x in o["layers"]), float(o.get("scale", 1.0)),
                             str(o.get("tokens", "all")), str(o.get("mode", "add")), bool(o.get("normalize", False)))
                    for o in raw.get("ops", ()))
        for v in vectors:
            if v.size < 1 or not v.layers or any(x < 0 for x in v.layers):
                raise ValueError("plan: a vector needs layers and a size")
            if not all(np.isfinite(d).all() for d in v.directions().values()):
                raise ValueError("plan: non-finite vector")
        for op in ops:
            if not 0 <= op.vector < len(vectors) or not set(op.layers) <= set(vectors[op.vector].layers):
                raise ValueError("plan: a vector op names a vector or layer the plan does not carry")
            if op.tokens not in TOKENS or op.mode not in MODES or not finite(op.scale):
                raise ValueError("plan: bad vector op")
        return cls(vectors, ops)


def compile_vectors(items: list[VectorItem], model: ModelFacts, field: str) -> VectorsPlan:
    """The plan part of a list of items on this model; SpecError naming the item's field otherwise."""
    hidden = int((model.extra.get("vectors") or {}).get("hidden_size", 0))
    used: dict[str, tuple[ControlVector, set[int]]] = {}
    pending = []
    for i, item in enumerate(items):
        f = f"{field}[{i}]"
        vector = vector_of(item, f)
        source = f"{f}.data" if item.data is not None else f"{f}.name"
        try:
            vector.check(hidden, model.num_layers)
        except VectorError as exc:
            raise SpecError(source, exc.reason) from None
        layers = vector.layers if item.layers in (None, "all") else tuple(dict.fromkeys(item.layers))
        for layer in layers:
            if layer >= model.num_layers:
                raise SpecError(f"{f}.layers", f"layer {layer} is outside the model's decoder layers "
                                               f"0..{model.num_layers - 1}")
            if layer not in vector.directions:
                raise SpecError(f"{f}.layers", f"the vector has no direction for layer {layer} (it has "
                                               f"{', '.join(map(str, vector.layers))})")
        key = vector.digest()
        used.setdefault(key, (vector, set()))[1].update(layers)
        pending.append((key, item, tuple(sorted(layers))))
    keys = list(used)
    vectors = tuple(VectorData.of(used[k][0], tuple(sorted(used[k][1]))) for k in keys)
    ops = tuple(VectorOp(keys.index(key), layers, 1.0 if item.scale is None else float(item.scale),
                         item.tokens or "all", item.mode or "add", bool(item.normalize))
                for key, item, layers in pending)
    return VectorsPlan(vectors, ops)


def names(value: list[dict[str, Any]]) -> list[str]:
    """X-Steering-Applied: `vectors.add` and/or `vectors.ablate`."""
    return sorted({item.get("mode") or "add" for item in value})


def layer_ops(op: VectorOp, directions: dict[int, np.ndarray]) -> dict[int, tuple[str, np.ndarray]]:
    """What one op does at each of its layers, in fp32: ("add", scale * v) or ("ablate", u) with u of unit
    length (the reference the engine's tables are built from)."""
    out = {}
    for layer in op.layers:
        v = directions[layer].astype(np.float64)
        unit = v / np.linalg.norm(v)
        if op.mode == "ablate":
            out[layer] = ("ablate", unit.astype(np.float32))
        else:
            out[layer] = ("add", (op.scale * (unit if op.normalize else v)).astype(np.float32))
    return out
