"""Meta-device construction: to_empty() then mambazoo.core.init.reset_parameters draws every parameter as a direct
build does (the same deterministic values, random ones from the same distribution)."""

import pytest
import torch

from mambazoo import create_model
from mambazoo.core.init import reset_parameters

CASES = [
    ("mamba-tiny", {}),
    ("jamba-tiny", {}),
    ("moe-mamba-tiny", {}),
    ("mamba-tiny", dict(selective=False)),  # the LTI mixer's own parameters
    ("vim-tiny", dict(depth=2, img_size=32, num_classes=10)),
]


def _params(model):
    return dict(model.named_parameters(remove_duplicate=False))


@pytest.mark.parametrize("name,overrides", CASES)
def test_meta_build_then_reset_matches_a_direct_build(name, overrides):
    torch.manual_seed(0)
    direct = _params(create_model(name, **overrides))
    torch.manual_seed(1)
    other = _params(create_model(name, **overrides))  # another direct build: what varies between seeds is random
    with torch.device("meta"):
        model = create_model(name, **overrides)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(2)
    got = _params(reset_parameters(model))
    assert got.keys() == direct.keys()
    tied = [k for k in got if got[k] is got.get("embedding.weight") and k != "embedding.weight"]
    assert tied == [k for k in direct if direct[k] is direct.get("embedding.weight") and k != "embedding.weight"]
    for k, want in direct.items():
        p = got[k]
        assert p.shape == want.shape and p.dtype == want.dtype, k
        assert torch.isfinite(p).all(), k
        for mark in ("_no_weight_decay", "_no_reinit"):  # the optimizer's groups and the models' init read these
            assert getattr(p, mark, False) == getattr(want, mark, False), (k, mark)
        if torch.equal(want, other[k]):  # deterministic (norm weights, A_log, D, zero biases): the same values
            assert torch.equal(p, want), k
            continue
        n = want.numel()
        w, q = want.double().flatten(), p.double().flatten()
        spread = w.std().item()
        # mean within 5 standard errors, std within a ratio that narrows with the sample, range within the direct one's
        assert abs(q.mean().item() - w.mean().item()) <= 5 * spread / n ** 0.5 + 1e-6, k
        assert abs(q.std().item() / spread - 1) <= 0.1 + 5 / n ** 0.5, k
        lo, hi = w.min().item(), w.max().item()
        margin = 0.5 * (hi - lo)
        assert lo - margin <= q.min().item() and q.max().item() <= hi + margin, k
