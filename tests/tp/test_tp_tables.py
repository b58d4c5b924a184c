"""Per-rank arithmetic of tensor parallelism (server/engine/tp.py), without an engine: which heads a rank holds,
how a row's attention tables are cut to them, the CPU binding, and the rows failed when a method goes off on one
rank. Cost: < 1 s."""
from __future__ import annotations

import torch

from steerserve.server.engine import attention_backend, faults, state, tp
from steerserve.server.engine.hooks import HOOKS
from steerserve.server.engine.state import RowContext
from tests.steering.test_attention_engine import SPECS, compile_for
from tests.tiny_models import build_tokenizer

SHAPES = [(4, 2, 2), (4, 1, 2), (8, 2, 4), (8, 8, 2), (6, 3, 3), (4, 4, 4), (9, 3, 1), (8, 1, 4)]  # (Hq, Hkv, N)


def test_every_query_head_on_one_rank_and_its_kv_head_on_the_same_rank():
    """The invariant that lets a rank steer its query heads alone: each query head's KV head (HF's GQA grouping,
    `repeat_kv`: head h reads KV head h // (Hq / Hkv)) is among the KV heads its rank holds, also when KV heads
    are replicated (Hkv < N)."""
    for hq, hkv, n in SHAPES:
        ranks = [tp.Rank(r, n) for r in range(n)]
        owned = [list(tp.query_heads(hq, r)) for r in ranks]
        assert sorted(h for heads in owned for h in heads) == list(range(hq))
        for rank, heads in zip(ranks, owned, strict=True):
            kv = tp.kv_heads(hkv, rank)
            assert len(kv) == max(1, hkv // n)
            assert {h // (hq // hkv) for h in heads} <= set(kv), (hq, hkv, n, rank)
        replicas = [tuple(tp.kv_heads(hkv, r)) for r in ranks]
        assert all(replicas.count(kv) == max(1, n // hkv) for kv in set(replicas))


def test_a_rows_attention_tables_cut_per_rank_concatenate_to_the_whole(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path))
    prompt_len = 24
    for name, spec in SPECS.items():
        if spec is None:
            continue
        plan = compile_for(spec, tok, prompt_len)

        def ctx(rank, size):
            return RowContext(2, 4, 0, torch.device("cpu"), tp.Rank(rank, size))

        whole = attention_backend.admit(plan, prompt_len, ctx(0, 1))
        parts = [attention_backend.admit(plan, prompt_len, ctx(r, 2)) for r in range(2)]
        for layer, full in enumerate(whole.biases):
            cut = [p.biases[layer] for p in parts]
            if full is None:
                assert cut == [None, None], name
                continue
            got = torch.cat([c if c is not None else torch.zeros(2, full.shape[1]) for c in cut])
            assert torch.equal(got, full), (name, layer)
            assert all(c is None or c.any() for c in cut)  # a rank with nothing to steer in a layer skips it
        assert all((p.mode, p.power, p.mode_layers) == (whole.mode, whole.power, whole.mode_layers) for p in parts)


def test_cpu_binding_gives_each_rank_its_own_cores():
    assert tp.cpu_binding(2, [0, 1]) == "0|1"
    assert tp.cpu_binding(2, list(range(8))) == "0-3|4-7"
    assert tp.cpu_binding(2, [1, 3, 5, 7, 9]) == "1,3|5,7"
    try:
        tp.cpu_binding(2, [0])
    except ValueError as e:
        assert "2 CPU cores" in str(e)
    else:
        raise AssertionError("one core for two ranks was accepted")


def test_a_method_going_off_on_one_rank_fails_its_rows_in_flight(tmp_path, monkeypatch):
    """The other ranks keep steering those rows: their requests must fail, not finish half-steered."""
    monkeypatch.setenv(faults.REPORT_DIR, str(tmp_path))
    monkeypatch.setattr(tp, "current", lambda: tp.Rank(1, 2))
    engine = state.EngineState(HOOKS)
    engine.rows["vectors"]._rows = [(0, object()), (3, object())]  # row states are not read here
    engine.rows["attention"]._rows = [(1, object())]
    engine.row_keys = {0: "req0", 1: "req1", 3: None}
    try:
        engine.rows["vectors"].switch_off("broken here")
        assert "rank 1" in (faults.row_fault("req0") or "") and "broken here" in faults.row_fault("req0")
        assert faults.row_fault("req1") is None  # another method's row
        assert faults.reported()["vectors"] == "broken here"
    finally:
        faults.clear()
    monkeypatch.setattr(tp, "current", lambda: tp.Rank(0, 1))  # without TP nothing else is failed
    single = state.EngineState(HOOKS)
    assert all(rows.fail_rows is None for rows in single.rows.values())
