"""Checking an adapter's files against the served model, before anything reaches the engine.

`INSPECTORS[kind](path, served_model)` returns what it found (rank, alpha, target modules, base model, ...) or
raises `AdapterInvalid` naming the failed check. Kind "lora" (PEFT: adapter_config.json +
adapter_model.safetensors): base model, architecture (every LoRA matrix fits the served model's layer), rank
within --max-lora-rank, target modules the engine supports, files that parse. Kind "iapt" (steering/iapt.py:
iapt_config.json + iapt_model.safetensors): files that parse, a valid config, the base model's name, its hidden
size and layer count, and every tensor's shape. `KIND_FILES` names each kind's files.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerserve.server.http.errors import BadRequest

from .lora_config import check_lora_config_types, selects
from .safetensors_header import read_header, tensor_shapes

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
MAX_CONFIG_BYTES = 2**20
# The linear layers vLLM can put LoRA on in the dense decoder families we serve (Llama, Mistral, Qwen2, ...).
LORA_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})

class AdapterInvalid(BadRequest):
    """A registration that failed one check; `code` is `adapter_<check>`."""

    def __init__(self, check: str, message: str):
        super().__init__(f"adapter rejected ({check}): {message}", param="adapter", code=f"adapter_{check}")
        self.check = check


@dataclass(frozen=True)
class ServedModel:
    """What registration checks an adapter against: the served model's names and its linear layers' shapes."""

    names: frozenset[str]  # lower-cased names the served model goes by (served name, directory, config name)
    linear_shapes: dict[str, tuple[int, int]]  # "model.layers.0.self_attn.q_proj" -> (out_features, in_features)
    max_lora_rank: int

    @classmethod
    def from_checkpoint(cls, path: Path, served_name: str, max_lora_rank: int) -> ServedModel:
        shapes: dict[str, tuple[int, int]] = {}
        for file in sorted(path.glob("*.safetensors")):
            for key, shape in _safetensors_shapes(file).items():
                if key.endswith(".weight") and len(shape) == 2:
                    shapes[key.removesuffix(".weight")] = (shape[0], shape[1])
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        names = {served_name, path.name, *(str(config.get(k)) for k in ("_name_or_path", "_model_name_or_path")
                                           if config.get(k))}
        return cls(frozenset(n.lower() for n in names), shapes, max_lora_rank)

    def decoder_shape(self) -> tuple[int, int] | None:
        """(hidden size, number of decoder layers) from the attention projections
        (`...layers.<i>.self_attn.q_proj`: in_features is the hidden size), or None if there are none."""
        hidden, layers = set(), set()
        for key, (_out, in_features) in self.linear_shapes.items():
            match = _Q_PROJ.fullmatch(key)
            if match:
                layers.add(int(match.group(1)))
                hidden.add(in_features)
        if len(hidden) != 1 or layers != set(range(len(layers))):
            return None
        return hidden.pop(), len(layers)


_Q_PROJ = re.compile(r"(?:.*\.)?layers\.(\d+)\.self_attn\.q_proj")


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes of the served checkpoint, checking only that the data offsets fit the file (cheap: no data
    read). Lenient on purpose: the operator's checkpoint is trusted, and may use dtypes newer than
    `tensor_shapes`, the strict reader for adapters, knows."""
    header, data_len = read_header(path, max_bytes=100 * 2**20)
    shapes = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= data_len:
            raise ValueError(f"tensor {key!r} lies outside the file (truncated?)")
        shapes[key] = list(info["shape"])
    return shapes


def _read_files(path: Path, config_file: str, weights_file: str) -> tuple[dict, dict[str, list[int]]]:
    """An adapter's JSON config and its weights' tensor shapes; AdapterInvalid("files") if either is missing or
    does not parse."""
    for name in (config_file, weights_file):
        if not (path / name).is_file():
            raise AdapterInvalid("files", f"{name} is missing")
    try:
        if (path / config_file).stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_BYTES} bytes")
        config = json.loads((path / config_file).read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except RecursionError:
        raise AdapterInvalid("files", f"{config_file} is nested too deeply") from None
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise AdapterInvalid("files", f"{config_file} is not valid JSON: {exc}") from None
    try:
        return config, tensor_shapes(path / weights_file)
    except (ValueError, OSError) as exc:
        raise AdapterInvalid("files", f"{weights_file} is corrupt: {exc}") from None


def inspect_lora(path: Path, base: ServedModel) -> dict[str, Any]:
    """The PEFT LoRA adapter in `path`, checked against `base`; its metadata, or AdapterInvalid naming the check."""
    config, shapes = _read_files(path, CONFIG_FILE, WEIGHTS_FILE)
    try:
        check_lora_config_types(config, CONFIG_FILE)
    except ValueError as exc:
        raise AdapterInvalid("config", str(exc)) from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterInvalid("format", f"peft_type is {config.get('peft_type')!r}; this kind needs 'LORA'")
    if config.get("use_dora"):
        raise AdapterInvalid("format", "DoRA adapters are not supported by the engine")
    if config.get("modules_to_save"):
        raise AdapterInvalid("target_modules", f"modules_to_save {config['modules_to_save']} is not supported")
    declared = config.get("base_model_name_or_path")
    if declared and Path(str(declared)).name.lower() not in {Path(n).name for n in base.names}:
        raise AdapterInvalid("base_model", f"the adapter was trained for {declared!r}; this server serves "
                                           f"{sorted(base.names)[0]!r}")
    rank = config.get("r", 8)  # PEFT's default
    ranks = [rank, *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > base.max_lora_rank or min(ranks) < 1:
        raise AdapterInvalid("rank", f"rank {max(ranks)} is outside 1..{base.max_lora_rank} (the server's "
                                     "--max-lora-rank)")

    modules: dict[str, dict[str, list[int]]] = {}
    for key, shape in shapes.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0].removeprefix("base_model.model.")
                modules.setdefault(module, {})[part] = shape
                break
        else:
            raise AdapterInvalid("target_modules", f"tensor {key!r} is not a LoRA matrix (lora_A / lora_B)")
    if not modules:
        raise AdapterInvalid("files", f"{WEIGHTS_FILE} holds no LoRA matrices")
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    unsupported = [t for t in targets if t not in LORA_TARGETS]
    if unsupported:
        raise AdapterInvalid("target_modules", f"{unsupported} not supported (supported: {sorted(LORA_TARGETS)})")
    declared_targets = config.get("target_modules")
    for module, parts in sorted(modules.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            raise AdapterInvalid("files", f"{module} has only {sorted(parts)}")
        if any(len(shape) != 2 for shape in parts.values()):
            raise AdapterInvalid("files", f"{module}: LoRA matrices must be 2-D, got shapes "
                                          f"{parts['lora_A']} and {parts['lora_B']}")
        if declared_targets is not None and not selects(declared_targets, module):
            raise AdapterInvalid("config", f"{module} has LoRA tensors, but target_modules {declared_targets} does "
                                           "not name it: the config and the weights disagree")
        if module not in base.linear_shapes:
            raise AdapterInvalid("base_model", f"the served model has no layer {module!r} (another architecture "
                                               "or depth)")
        out_features, in_features = base.linear_shapes[module]
        (r_a, a_in), (b_out, r_b) = parts["lora_A"], parts["lora_B"]
        if a_in != in_features or b_out != out_features or r_a != r_b:
            raise AdapterInvalid("base_model", f"{module}: LoRA maps {a_in}->{b_out} (rank {r_a}/{r_b}), the "
                                               f"served layer {in_features}->{out_features}")
        if r_a > base.max_lora_rank:
            raise AdapterInvalid("rank", f"{module} has rank {r_a} > the server's --max-lora-rank "
                                         f"{base.max_lora_rank}")
        if r_a not in ranks:
            raise AdapterInvalid("config", f"{module} has rank {r_a}, but the config declares r={rank}"
                                           + (f" and rank_pattern {sorted(set(ranks[1:]))}" if ranks[1:] else "")
                                           + ": the config and the weights disagree")
    return {"rank": max(ranks), "alpha": config.get("lora_alpha"), "target_modules": targets,
            "base_model": declared, "layers": len({m.split(".self_attn")[0].split(".mlp")[0] for m in modules})}


def _declared_base_matches(declared: str, base: ServedModel) -> bool:
    return Path(declared).name.lower() in {Path(n).name for n in base.names}


def inspect_iapt(path: Path, base: ServedModel) -> dict[str, Any]:
    """The IAPT adapter in `path` (steering/iapt.py: iapt_config.json + iapt_model.safetensors), checked against
    `base`; its metadata, or AdapterInvalid naming the check. Reads only the safetensors header."""
    from steerserve.steering.iapt import CONFIG_FILE as IAPT_CONFIG
    from steerserve.steering.iapt import WEIGHTS_FILE as IAPT_WEIGHTS
    from steerserve.steering.iapt import IaptConfig

    raw, shapes = _read_files(path, IAPT_CONFIG, IAPT_WEIGHTS)

    types = {"base_model": str, "hidden_size": int, "num_layers": int, "bottleneck": int, "degrees": list,
             "shared": bool, "soft_tokens": int}
    unknown = sorted(set(raw) - set(types))
    if unknown:
        raise AdapterInvalid("config", f"{IAPT_CONFIG} has unknown fields {unknown}")
    for key, kind in types.items():
        value = raw.get(key)
        if key in raw and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise AdapterInvalid("config", f"{key} must be {kind.__name__}, got {value!r}")
    degrees = raw.get("degrees", [])
    if not (len(degrees) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in degrees)):
        raise AdapterInvalid("config", f"degrees must be two integers [p, q], got {degrees!r}")
    try:
        config = IaptConfig(**raw)
    except (TypeError, ValueError) as exc:
        raise AdapterInvalid("config", f"{IAPT_CONFIG}: {exc}") from None

    if config.base_model and not _declared_base_matches(config.base_model, base):
        raise AdapterInvalid("base_model", f"the adapter was trained for {config.base_model!r}; this server serves "
                                           f"{sorted(base.names)[0]!r}")
    served = base.decoder_shape()
    if served is None:
        raise AdapterInvalid("architecture", "the served model has no decoder layers IAPT can attach to "
                                             "(layers.<i>.self_attn.q_proj)")
    if config.bottleneck > config.hidden_size:
        raise AdapterInvalid("config", f"bottleneck {config.bottleneck} is larger than the hidden size "
                                       f"{config.hidden_size}: it must lie in 1..hidden_size")
    if (config.hidden_size, config.num_layers) != served:
        raise AdapterInvalid("architecture", f"the adapter is for hidden size {config.hidden_size} and "
                                             f"{config.num_layers} layers; the served model has hidden size "
                                             f"{served[0]} and {served[1]} layers")
    expected = config.shapes()
    if set(shapes) != set(expected):
        raise AdapterInvalid("files", f"{IAPT_WEIGHTS} holds {sorted(shapes)}, expected {sorted(expected)}")
    for name, shape in sorted(expected.items()):
        if tuple(shapes[name]) != shape:
            raise AdapterInvalid("files", f"{name} has shape {shapes[name]}; {IAPT_CONFIG} implies {list(shape)}")
    return {"bottleneck": config.bottleneck, "degrees": list(config.degrees), "shared": config.shared,
            "soft_tokens": config.soft_tokens, "layers": config.num_layers, "hidden_size": config.hidden_size,
            "parameters": sum(math.prod(s) for s in expected.values()), "base_model": config.base_model}


INSPECTORS: dict[str, Callable[[Path, ServedModel], dict[str, Any]]] = {"lora": inspect_lora, "iapt": inspect_iapt}
# The files of each kind: what an upload may send and what a registration by path copies into the store.
KIND_FILES = {"lora": (CONFIG_FILE, WEIGHTS_FILE), "iapt": ("iapt_config.json", "iapt_model.safetensors")}

