"""MoE FFN: routing, load-balancing and z losses against hand computations, capacity dropping."""

import math

import pytest
import torch
import torch.nn.functional as F

from mambazoo.core.moe import MoE, capacity_keep, expert_capacity



def _moe(E=4, k=1, D=8, H=16, **kw):
    return MoE(D, H, E, top_k=k, **kw)


def _dense_reference(moe, x, keep=None):
    """Every token through every chosen expert, by hand, in float64."""
    logits = x.double() @ moe.router.weight.double().t()
    p = logits.softmax(-1)
    g, e = p.topk(moe.top_k, -1)
    if moe.renormalize:
        g = g / g.sum(-1, keepdim=True)
    out = torch.zeros_like(x, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(moe.top_k):
            if keep is not None and not keep[t, j]:
                continue
            w_in, w_out = moe.experts.w_in[e[t, j]].double(), moe.experts.w_out[e[t, j]].double()
            h = w_in @ x[t].double()
            if moe.experts.kind == "swiglu":
                a, b = h.chunk(2)
                h = F.silu(a) * b
            else:
                h = F.gelu(h)
            out[t] += g[t, j] * (w_out @ h)
    return out


@pytest.mark.parametrize("k,kind,renorm", [(1, "gelu", False), (2, "swiglu", False), (2, "gelu", True)])
@pytest.mark.parametrize("gather", [True, False])
def test_output_matches_hand_computation(k, kind, renorm, gather):
    moe = _moe(k=k, kind=kind, renormalize=renorm, capacity_factor=None,
               gather_threshold=10**6 if gather else 0)
    x = torch.randn(10, 8)
    out, _ = moe(x)
    torch.testing.assert_close(out.double(), _dense_reference(moe, x), rtol=1e-4, atol=1e-5)


def test_load_balancing_loss_by_hand():
    moe = _moe(E=3, k=1, D=2, capacity_factor=None, aux_loss_weight=1.0)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [3.0, 1.0], [-2.0, -2.0]])
    _, aux = moe(x)
    p = torch.tensor([[math.exp(v) for v in row] for row in [[2, 0, -2], [0, 2, -2], [3, 1, -4], [-2, -2, 4]]])
    p = p / p.sum(1, keepdim=True)
    f = torch.tensor([2, 1, 1]) / 4  # argmax: experts 0, 1, 0, 2
    expected = 3 * (f * p.mean(0)).sum()
    torch.testing.assert_close(aux, expected.float())
    assert moe.last_routing.experts[:, 0].tolist() == [0, 1, 0, 2]


def test_top2_load_balancing_and_z_loss_by_hand():
    moe = _moe(E=4, k=2, D=8, capacity_factor=None, aux_loss_weight=0.5, z_loss_weight=0.1)
    x = torch.randn(6, 8)
    _, aux = moe(x)
    logits = x @ moe.router.weight.t()
    p = logits.softmax(-1)
    top2 = p.topk(2, -1).indices
    f = torch.stack([(top2 == i).any(-1).float().mean() for i in range(4)])
    lb = 4 * (f * p.mean(0)).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(aux, 0.5 * lb + 0.1 * z, rtol=1e-5, atol=1e-6)


def test_balanced_routing_gives_loss_one():
    # uniform router -> p = 1/E everywhere; any assignment gives E * sum(f_i / E) = 1 (the minimum).
    moe = _moe(E=4, capacity_factor=None, aux_loss_weight=1.0)
    with torch.no_grad():
        moe.router.weight.zero_()
    _, aux = moe(torch.randn(8, 8))
    torch.testing.assert_close(aux, torch.tensor(1.0))


def test_capacity_drops_overflow_tokens_in_order():
    moe = _moe(E=4, k=1, capacity_factor=1.0).train()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0  # every token with x[0] > 0 goes to expert 0
    x = torch.randn(8, 8)
    x[:, 0] = 1.0
    out, _ = moe(x)
    cap = expert_capacity(8, 4, 1, 1.0)
    assert cap == 2
    keep = moe.last_routing.keep[:, 0]
    assert keep.tolist() == [True, True] + [False] * 6
    assert torch.all(out[2:] == 0) and torch.all(out[:2].abs().sum(-1) > 0)
    ref = _dense_reference(moe, x, keep=moe.last_routing.keep)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    # eval mode: no dropping unless eval_capacity_factor is set
    moe.eval()
    out_eval, _ = moe(x)
    assert torch.all(out_eval.abs().sum(-1) > 0)


def test_capacity_priority_first_choices_before_second():
    experts = torch.tensor([[0, 1], [1, 0], [0, 2], [0, 1]])  # (T=4, k=2)
    keep = capacity_keep(experts, 3, capacity=2)
    # expert 0: first choices of tokens 0, 2, 3 -> tokens 0, 2 kept, token 3 dropped; token 1's second choice dropped
    # expert 1: first choice of token 1, then second choices of tokens 0 and 3 -> token 0 kept, token 3 dropped
    assert keep.tolist() == [[True, True], [True, False], [True, True], [False, False]]


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        MoE(8, 16, 4, top_k=5)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(8, 16, 4, capacity_factor=0.0)
    with pytest.raises(ValueError, match="d_model=8"):
        MoE(8, 16, 4)(torch.randn(3, 7))
