"""The base of every steering model in the SDK, generated or hand-written.

`_spec.py` is generated from the server's steering schema (`make sdk-types`); its models subclass `Spec`.
steering.py puts a hand-written class over some of them (`class Rules(_spec.RulesSpec)`: a nicer name, builders,
client-side checks the schema cannot express). Such a class becomes the SDK's *public class* for that generated
model: in every subclass of a generated model defined after it, the inherited fields that name that generated
model are retyped to the public class, with the generated constraints, defaults and descriptions unchanged. So
`Steering.model_validate(json).logits.rules` is a `Rules`, while a family with no hand-written class (a new
method's, right after regeneration) keeps its generated models and works as they are.

Contract: define public classes leaves first (`EosRamp` before `Rules` before `Logits` before `Steering`); a
generated model gets at most one public class (the first one defined).
"""
from __future__ import annotations

import copy
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict
from typing_extensions import TypeAliasType

GENERATED = __name__.rpartition(".")[0] + "._spec"  # the module of the generated models

# generated model -> its hand-written public class
_PUBLIC: dict[type, type] = {}
ModelMetaclass = type(BaseModel)  # pydantic's metaclass, without importing its private module


def _retyped(tp: Any) -> Any:
    """`tp` with every generated model that has a public class replaced by it (inside unions, lists, dicts,
    Annotated and type aliases); `tp` itself when nothing changes. A type alias that changes is inlined."""
    if isinstance(tp, type):
        return _PUBLIC.get(tp, tp)
    if isinstance(tp, TypeAliasType):
        value = _retyped(tp.__value__)
        return tp if value is tp.__value__ else value
    origin, args = get_origin(tp), get_args(tp)
    if origin is None or origin is Literal or not args:
        return tp
    new = tuple(_retyped(a) for a in args)
    if all(a is b for a, b in zip(new, args, strict=True)):
        return tp
    if origin in (Union, type(int | None)):
        return Union[new]  # noqa: UP007 (rebuilt from parts)
    return origin[new]  # Annotated[...], list[...], dict[...]: subscripting with the new arguments


class _PublicClasses(ModelMetaclass):
    # Pydantic collects a model's fields from its class body, so the retyped fields are written into the body
    # (annotation + the generated FieldInfo) before the class is made.
    def __new__(mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any) -> type:
        own, annotations = namespace.get("__annotations__", {}), {}
        for base in reversed(bases):
            if base.__module__ != GENERATED:
                continue
            # A generated model names models defined after it; resolve them in its own module before a
            # subclass elsewhere inherits its fields.
            base.model_rebuild()
            for field, info in base.model_fields.items():
                if field in own or field in annotations or field in namespace:
                    continue
                annotation = _retyped(info.annotation)
                if annotation is not info.annotation:
                    annotations[field] = annotation
                    namespace[field] = copy.copy(info)
        if annotations:  # (a class body that declares fields of its own keeps them: they win)
            namespace["__annotations__"] = {**annotations, **own}
        cls = super().__new__(mcs, name, bases, namespace, **kwargs)
        for base in bases:
            if base.__module__ == GENERATED:
                _PUBLIC.setdefault(base, cls)
        return cls


class Spec(BaseModel, metaclass=_PublicClasses):
    """A steering model: as on the server, unknown fields and NaN/inf are errors, and a spec is a value
    (frozen, comparable, shareable)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    def to_json(self) -> dict[str, Any]:
        """The wire form: JSON types, unset (None) fields left out."""
        return self.model_dump(mode="json", exclude_none=True)
