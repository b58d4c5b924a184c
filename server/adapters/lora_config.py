"""A PEFT LoRA config's fields, as registration reads them: their JSON types (a string rank or a list where a
mapping belongs is a clear 400, not an exception), and which modules `target_modules` selects (so a config that
disagrees with its weights is refused)."""
from __future__ import annotations

import re
from typing import Any

# PEFT config fields the server reads, and the JSON types each must have (others are PEFT's business).
_LORA_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "r": (int,), "lora_alpha": (int, float), "rank_pattern": (dict,), "alpha_pattern": (dict,),
    "target_modules": (list, str), "peft_type": (str,), "use_dora": (bool,), "modules_to_save": (list,),
    "base_model_name_or_path": (str,), "use_rslora": (bool,), "bias": (str,)}


def check_lora_config_types(config: dict[str, Any], config_file: str) -> None:
    """Every field the server reads has its JSON type (None allowed where PEFT allows it); ValueError naming
    the field otherwise."""
    for key, kinds in _LORA_FIELD_TYPES.items():
        if key not in config or (config[key] is None and key not in ("r", "peft_type")):
            continue
        value = config[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ValueError(f"{config_file}: {key} must be {' or '.join(k.__name__ for k in kinds)}, "
                             f"got {str(value)[:40]!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        for name, value in (config.get(key) or {}).items():
            if not isinstance(value, int | float) or isinstance(value, bool) or \
                    (key == "rank_pattern" and not isinstance(value, int)):
                raise ValueError(f"{config_file}: {key}[{str(name)[:40]!r}] must be "
                                 f"{'an integer' if key == 'rank_pattern' else 'a number'}, got {str(value)[:40]!r}")
    targets = config.get("target_modules")
    if isinstance(targets, list) and not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{config_file}: target_modules must be a list of names")


def selects(declared: list[str] | str, module: str) -> bool:
    """Whether PEFT's `target_modules` selects `module`: a list of names matching its last component(s), a
    regular expression matching its full name, or "all-linear"."""
    if isinstance(declared, str):
        if declared == "all-linear":
            return True
        try:
            return re.fullmatch(declared, module) is not None
        except re.error:
            return False
    return any(module == t or module.endswith("." + t) for t in declared)
