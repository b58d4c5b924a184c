"""Compare two JSON schemas structurally: $refs resolved, titles and descriptions ignored."""
from __future__ import annotations

from typing import Any

IGNORED = {"title", "description"}


def resolve(node: Any, defs: dict[str, Any]) -> Any:
    """`node` with every local `$ref` inlined (recursively) and titles/descriptions dropped."""
    if isinstance(node, list):
        return [resolve(x, defs) for x in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].removeprefix("#/$defs/")
        return resolve({**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}, defs)
    return {k: resolve(v, defs) for k, v in node.items() if k not in IGNORED and k != "$defs"}


def differences(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Where two resolved schemas disagree, as readable lines (empty when they agree)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = [f"{path}.{k}: only in {'SDK' if k in ours else 'server'}" for k in sorted(ours.keys() ^ theirs.keys())]
        for k in sorted(ours.keys() & theirs.keys()):
            out += differences(ours[k], theirs[k], f"{path}.{k}")
        return out
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [d for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) for d in differences(a, b, f"{path}[{i}]")]
    return [] if ours == theirs else [f"{path}: SDK {ours!r} != server {theirs!r}"]


def family(schema: dict[str, Any], name: str) -> Any:
    """One top-level property (e.g. `logits`) of a schema, resolved."""
    return resolve(schema["properties"][name], schema.get("$defs", {}))
