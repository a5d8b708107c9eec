"""Grouped-query causal attention: against a naive softmax, KV-cache prefill/step, sliding window ring."""

import pytest
import torch

from mambazoo.core.attention import Attention



def naive(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(d)) v with KV heads repeated and a causal (windowed) mask, float64."""
    b, L, _ = x.shape
    H, Hkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    xd = x.double()
    q = (xd @ attn.q_proj.weight.double().t()).view(b, L, H, hd).transpose(1, 2)
    k = (xd @ attn.k_proj.weight.double().t()).view(b, L, Hkv, hd).transpose(1, 2).repeat_interleave(H // Hkv, 1)
    v = (xd @ attn.v_proj.weight.double().t()).view(b, L, Hkv, hd).transpose(1, 2).repeat_interleave(H // Hkv, 1)
    if attn.rope:  # rotary as complex multiplication: (x_i + j x_{i+hd/2}) * exp(j pos base^(-i/(hd/2)))
        half = hd // 2
        ang = torch.arange(L, dtype=torch.float64)[:, None] * attn.rope_base ** (-torch.arange(half) / half)
        rot = torch.polar(torch.ones_like(ang), ang)

        def rope(t):
            c = torch.complex(t[..., :half], t[..., half:]) * rot
            return torch.cat([c.real, c.imag], dim=-1)

        q, k = rope(q), rope(k)
    s = q @ k.transpose(-1, -2) / hd ** 0.5
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    mask = j <= i
    if attn.window is not None:
        mask &= i - j < attn.window
    s = s.masked_fill(~mask, float("-inf"))
    y = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, L, H * hd)
    return y @ attn.o_proj.weight.double().t()


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("kv", [4, 2, 1])
def test_matches_naive(window, kv, rope):
    attn = Attention(16, 4, kv, window=window, rope=rope)
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(attn(x).double(), naive(attn, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_prefill_chunks_and_steps_match_full(window, rope):
    attn = Attention(16, 4, 2, window=window, rope=rope)
    x = torch.randn(2, 11, 16)
    full = attn(x)
    st = attn.allocate_state(2, max_len=11)
    assert st.capacity == (11 if window is None else 3)
    parts = [attn(x[:, :4], st), attn(x[:, 4:6], st)]  # two prefills, the second continues the first
    parts += [attn.step(x[:, t], st)[:, None] for t in range(6, 11)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert int(st.pos) == 11


def test_cache_full_and_bad_input():
    attn = Attention(16, 4, 2)
    st = attn.allocate_state(1, max_len=4)
    attn(torch.randn(1, 3, 16), st)
    with pytest.raises(ValueError, match="capacity 4"):
        attn(torch.randn(1, 2, 16), st)
    with pytest.raises(ValueError, match="d_model=16"):
        attn(torch.randn(1, 3, 15))
    with pytest.raises(ValueError, match="n_kv_heads"):
        Attention(16, 4, 3)
    with pytest.raises(ValueError, match="batch=2"):
        attn(torch.randn(2, 1, 16), attn.allocate_state(1, max_len=4))


def test_rope_makes_order_visible():
    """Without positions the last output ignores the order of the earlier tokens; with rope it does not."""
    torch.manual_seed(0)
    x = torch.randn(1, 6, 16)
    swapped = x[:, [1, 0, 2, 3, 4, 5]]
    plain, rotary = Attention(16, 4), Attention(16, 4, rope=True)
    torch.testing.assert_close(plain(x)[:, -1], plain(swapped)[:, -1])
    assert not torch.allclose(rotary(x)[:, -1], rotary(swapped)[:, -1], atol=1e-4)
    with pytest.raises(ValueError, match="even head_dim"):
        Attention(12, 4, rope=True)
