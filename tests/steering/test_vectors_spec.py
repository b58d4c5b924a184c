"""Control vectors' spec and plan: validation (every refusal names its field), named items resolved from the
store, the compact plan part's round trip and digests, the salt, and the engine's stage programs against the
item-by-item definition."""
from __future__ import annotations

import numpy as np
import pytest

from steerserve.steering import spec as S
from steerserve.steering.control_vectors import ControlVector
from steerserve.steering.model import ModelFacts, SpecError
from steerserve.steering.plan import Plan, cache_salt
from steerserve.steering.vectors import VectorItem, resolved

H, L = 8, 4
MODEL = ModelFacts(None, 100, num_layers=L, extra={"vectors": {"hidden_size": H}})
RNG = np.random.default_rng(0)


def vec(*layers: int) -> dict[str, list[float]]:
    return {str(layer): RNG.standard_normal(H).round(3).tolist() for layer in layers}


def compile_(items: list, store: dict[str, ControlVector] | None = None) -> Plan | None:
    spec = S.merge([S.parse({"vectors": items}, "steering")])
    if store is not None:
        spec = spec.model_copy(update={"vectors": [resolved(i, store[i.name]) if i.name else i
                                                   for i in spec.vectors]})
    return S.compile_spec(spec, MODEL)


@pytest.mark.parametrize("item, field, words", [
    ({"data": vec(1), "name": "x"}, "steering.vectors.0", "exactly one"),
    ({"scale": 2.0}, "steering.vectors.0", "exactly one"),
    ({"data": vec(1), "mode": "ablate", "scale": 2.0}, "steering.vectors.0", "scale must be absent or 1"),
    ({"data": {"1": [0.1] * (H - 1)}}, "steering.vectors[0].data", "hidden size is 8"),
    ({"data": {"7": [0.1] * H}}, "steering.vectors[0].data", "outside the model's decoder layers"),
    ({"data": {"1": [0.0] * H}}, "steering.vectors[0].data", "all zeros"),
    ({"data": {"x1": [0.1] * H}}, "steering.vectors.0.data", "not a decoder layer index"),
    ({"data": {"1": []}}, "steering.vectors.0.data.1", ""),
    ({"data": {"1": [0.1] * H, "01": [0.2] * H}}, "steering.vectors.0.data", "same layer"),
    ({"data": vec(1, 2), "layers": [2, 3]}, "steering.vectors[0].layers", "no direction for layer 3"),
    ({"data": vec(1), "layers": [9]}, "steering.vectors[0].layers", "outside"),
    ({"data": vec(1), "tokens": "output"}, "steering.vectors.0.tokens", ""),
    ({"data": vec(1), "mode": "steer"}, "steering.vectors.0.mode", ""),
    ({"data": vec(*range(9))}, "steering.vectors.0.data", "at most 8"),
    ({"data": vec(1), "colour": 1}, "steering.vectors.0.colour", ""),
    ({"name": "calm"}, "steering.vectors[0].name", "not resolved"),
])
def test_unappliable_items_name_their_field(item, field, words):
    with pytest.raises(SpecError) as info:
        compile_([item])
    assert info.value.field == field and words in info.value.reason, info.value


def test_non_finite_and_long_lists_are_refused():
    with pytest.raises(SpecError) as info:
        S.parse({"vectors": [{"data": {"1": [float("nan")] * H}}]}, "steering")
    assert info.value.field.startswith("steering.vectors.0.data.1")
    with pytest.raises(SpecError) as info:
        S.parse({"vectors": [{"data": vec(1)}] * 17}, "steering")
    assert info.value.field == "steering.vectors"


def test_plan_carries_each_vector_once_exactly_and_round_trips():
    shared = vec(1, 2, 3)
    plan = compile_([{"data": shared, "scale": 2.0, "layers": [1]},
                     {"data": shared, "mode": "ablate", "tokens": "generated", "layers": [3]},
                     {"data": vec(0), "normalize": True, "tokens": "prompt"}])
    part = plan.vectors
    assert len(part.vectors) == 2 and part.vectors[0].layers == (1, 3)  # only the layers the ops use
    dirs = part.vectors[0].directions()
    assert np.array_equal(dirs[1], np.float32(shared["1"])) and np.array_equal(dirs[3], np.float32(shared["3"]))
    assert part.vectors[0].digest == ControlVector.of({1: shared["1"], 3: shared["3"]}).digest()
    assert [(o.vector, o.layers, o.scale, o.tokens, o.mode, o.normalize) for o in part.ops] == [
        (0, (1,), 2.0, "all", "add", False), (0, (3,), 1.0, "generated", "ablate", False),
        (1, (0,), 1.0, "prompt", "add", True)]
    assert Plan.from_extra_args(plan.to_extra_args()) == plan
    assert "data" not in str(part.salt_key(5))


def test_named_items_use_the_resolved_vector_and_layers_default_to_its_own():
    store = {"calm": ControlVector.of({2: RNG.standard_normal(H), 3: RNG.standard_normal(H)})}
    plan = compile_([{"name": "calm", "scale": -1.5}], store)
    assert plan.vectors.ops[0].layers == (2, 3) and plan.vectors.ops[0].scale == -1.5
    assert plan.vectors.vectors[0].digest == store["calm"].digest()
    with pytest.raises(ValueError):
        resolved(VectorItem(data=vec(1)), store["calm"])


def test_salt_separates_vectors_and_prompt_lengths_only_when_tokens_select():
    a, b = vec(1), vec(1)
    salt = lambda items, n: cache_salt("t", compile_(items), n)  # noqa: E731
    assert salt([{"data": a}], 5) != cache_salt("t", None, 5) != salt([{"data": b}], 5)
    assert salt([{"data": a}], 5) == salt([{"data": a}], 6)  # every token steered alike: blocks are shareable
    assert salt([{"data": a, "tokens": "generated"}], 5) != salt([{"data": a, "tokens": "generated"}], 6)
    assert salt([{"data": a, "scale": 2.0}], 5) != salt([{"data": a}], 5)


def test_methods_lists_modes_and_a_later_list_replaces_an_earlier_one():
    profile = S.parse({"vectors": [{"data": vec(1), "mode": "ablate"}]}, "profile")
    body = S.parse({"vectors": [{"data": vec(2)}]}, "steering")
    merged = S.merge([profile, body])
    assert len(merged.vectors) == 1 and merged.methods() == ["vectors.add"]
    assert S.merge([profile]).methods() == ["vectors.ablate"]
    assert S.compile_spec(S.merge([profile, S.parse({"vectors": []}, "steering")]), MODEL) is None


def test_stage_programs_follow_the_list_order():
    from steerserve.server.engine.vectors_hook import program

    v1, v2, v3 = vec(1), vec(1), vec(1)
    part = compile_([{"data": v1, "scale": 2.0}, {"data": v2, "mode": "ablate"}, {"data": v3},
                     {"data": v1, "tokens": "generated"}]).vectors
    key, prog = program(part, "prompt")
    assert len(key) == 3
    (u0, a0), (u1, a1) = prog[1]
    assert u0 is None and np.allclose(a0, 2 * np.float32(v1["1"]))
    assert np.isclose(np.linalg.norm(u1), 1) and np.allclose(u1 * np.linalg.norm(v2["1"]), v2["1"], atol=1e-6)
    assert np.allclose(a1, np.float32(v3["1"]))
    _, gen = program(part, "generated")
    assert np.allclose(gen[1][1][1], np.float32(v3["1"]) + np.float32(v1["1"]), atol=1e-6)


def test_rows_share_slots_and_free_them_when_they_leave():
    import torch

    from steerserve.server.engine.state import RowContext
    from steerserve.server.engine.vectors_hook import VectorsRows, admit

    ctx = RowContext(L, 1, 0, torch.device("cpu"))
    shared, other = vec(1, 2), vec(2)
    a = admit(compile_([{"data": shared, "scale": 2.0}]), 5, ctx)
    b = admit(compile_([{"data": shared, "scale": 2.0}]), 9, ctx)
    c = admit(compile_([{"data": other, "tokens": "generated"}]), 3, ctx)
    rows = VectorsRows()
    rows.rows = [(0, a), (1, b), (2, c)]
    assert a.slots == b.slots == {"prompt": 1, "generated": 1} and c.slots == {"prompt": 0, "generated": 2}
    assert torch.allclose(rows.add[0][2, 1], 2 * torch.tensor(shared["2"])) and rows.add[0][1, 2].eq(0).all()
    assert sorted(rows.layers) == [1, 2]
    index = rows.slot_index([0, 4, 6, 9], torch.tensor([0, 1, 2, 3, 7, 8, 2, 3, 4]), 10)
    assert index.tolist() == [1, 1, 1, 1, 1, 1, 0, 2, 2, 0]  # row 2: positions >= its prompt length 3
    rows.rows = [(0, c)]
    assert rows.slots == {c.keys["generated"]: 2} and rows.add[0][:, 1].eq(0).all() and sorted(rows.layers) == [2]
    assert rows.slot_index([0, 2], torch.tensor([0, 1]), 2) is None  # prompt tokens only: nothing steered
