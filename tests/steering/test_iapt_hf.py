"""IAPT's generator and its HF application (steering/iapt.py) against the formula of its docstring written out
here with plain torch ops, on a tiny random Llama: P at every layer, causality, pooling in pieces."""
from __future__ import annotations

import math

import pytest
import torch

from steerserve.steering.iapt import IaptConfig, IaptModel, Pool, hf_soft_prompts, merge_pools
from tests.tiny_models import TINY_LLAMA, build_tiny_llama

D, LAYERS = TINY_LLAMA["hidden_size"], TINY_LLAMA["num_hidden_layers"]


def random_adapter(shared: bool, seed: int = 0, degrees=(5, 4)) -> IaptModel:
    """Every tensor random (the activation far from its identity init), so each term of the formula matters."""
    iapt = IaptModel(IaptConfig("tiny", D, LAYERS, bottleneck=8, degrees=degrees, shared=shared))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in iapt.config.shapes():
            t = iapt.tensor(name)
            t.copy_(torch.randn(t.shape, generator=gen) * (0.3 if name.startswith("act") else 1.0))
    return iapt.eval()


def expected_p(iapt: IaptModel, layer: int, h: torch.Tensor) -> torch.Tensor:
    """P_l = R_l(A^T Z) Wu^T + bu, Z = RMS(H) Wd^T + bd, A = softmax over tokens of Z Q^T / sqrt(m)."""
    c = iapt.config
    proj = 0 if c.shared else layer
    wd, bd = iapt.tensor("down.weight")[proj], iapt.tensor("down.bias")[proj]
    wu, bu = iapt.tensor("up.weight")[proj], iapt.tensor("up.bias")[proj]
    q, a, b = iapt.tensor("queries")[layer], iapt.tensor("act.num")[layer], iapt.tensor("act.den")[layer]
    h = h.double()
    rms = h / torch.sqrt((h * h).mean(dim=1, keepdim=True) + 1e-6)
    z = rms @ wd.double().T + bd.double()
    weights = torch.softmax(z @ q.double().T / math.sqrt(c.bottleneck), dim=0)  # [n, 4], each column sums to 1
    x = weights.T @ z  # [4, m]
    top = sum((a[j].double() * x ** j for j in range(len(a))), torch.zeros_like(x))
    bottom = 1 + torch.abs(sum((b[k - 1].double() * x ** k for k in range(1, len(b) + 1)), torch.zeros_like(x)))
    return (top / bottom) @ wu.double().T + bu.double()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = build_tiny_llama(tmp_path_factory.mktemp("iapt-hf") / "llama", seed=0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("degrees", [(5, 4), (3, 0), (0, 2)])
def test_generator_follows_the_formula(shared, degrees):
    iapt = random_adapter(shared, degrees=degrees)
    h = torch.randn(11, D, generator=torch.Generator().manual_seed(1)) * 3
    for layer in range(LAYERS):
        with torch.no_grad():
            got = iapt(layer, h)
        torch.testing.assert_close(got.double(), expected_p(iapt, layer, h), rtol=1e-3, atol=1e-4)


def test_pooling_in_pieces_equals_whole():
    iapt = random_adapter(False)
    h = torch.randn(13, D, generator=torch.Generator().manual_seed(2)) * 5
    with torch.no_grad():
        pool: Pool | None = None
        for piece in (h[7:], h[:3], h[3:7]):  # any order
            pool = merge_pools(pool, iapt.pool_partial(1, piece))
        assert pool is not None
        torch.testing.assert_close(iapt.finish(1, pool), iapt(1, h), rtol=1e-4, atol=1e-4)


def test_hf_soft_prompts_replaces_each_layers_soft_inputs_by_p(tiny):
    """Rows of different instruction lengths, right-padded: at every layer the 4 soft positions' input is P of
    that layer's instruction inputs (captured by a hook that runs after the adapter's), other positions as given."""
    iapt = random_adapter(False)
    lens, width = [5, 9], 9 + 4 + 3
    ids = torch.randint(10, 2000, (2, width), generator=torch.Generator().manual_seed(3))
    seen: dict[int, torch.Tensor] = {}
    with torch.no_grad(), hf_soft_prompts(tiny, iapt, lens):
        hooks = [layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: seen.__setitem__(i, (args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True) for i, layer in enumerate(tiny.get_decoder().layers)]
        try:
            tiny(input_ids=ids)
        finally:
            for h in hooks:
                h.remove()
    assert sorted(seen) == list(range(LAYERS))
    for layer, hidden in seen.items():
        for row, n in enumerate(lens):
            torch.testing.assert_close(hidden[row, n:n + 4].double(), expected_p(iapt, layer, hidden[row, :n]),
                                       rtol=1e-3, atol=1e-4)
    embedded = tiny.get_input_embeddings()(ids)
    for row, n in enumerate(lens):  # layer 0 outside the soft positions: the embeddings, untouched
        assert torch.equal(seen[0][row, :n], embedded[row, :n])
        assert torch.equal(seen[0][row, n + 4:], embedded[row, n + 4:])


def test_soft_tokens_change_only_what_comes_after_them(tiny):
    iapt = random_adapter(False, seed=4)
    lens, width = [6, 4], 6 + 4 + 5
    ids = torch.randint(10, 2000, (2, width), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = tiny(input_ids=ids).logits
        with hf_soft_prompts(tiny, iapt, lens):
            steered = tiny(input_ids=ids).logits
    for row, n in enumerate(lens):
        torch.testing.assert_close(steered[row, :n], base[row, :n], rtol=0, atol=1e-6)  # before: causal, unchanged
        after = (steered[row, n:] - base[row, n:]).abs().amax(-1)
        assert (after > 1e-3).all(), after  # the soft positions and every later one see the soft tokens


def test_forwards_that_miss_the_soft_positions_are_left_alone(tiny):
    """A decode step with a KV cache (one new token) is shorter than instruction + 4: no replacement."""
    iapt = random_adapter(False)
    ids = torch.randint(10, 2000, (1, 3), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        base = tiny(input_ids=ids).logits
        with hf_soft_prompts(tiny, iapt, [5]):
            same = tiny(input_ids=ids).logits
    assert torch.equal(base, same)
