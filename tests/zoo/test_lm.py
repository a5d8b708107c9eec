"""Causal LMs of every language variant: causality, cached decoding, cache size, parameter counts,
layouts, initialization, ByteTokenizer, bad input."""

import math

import pytest
import torch

from mambazoo import create_model
from mambazoo.lm import CausalLM, LMConfig, periodic_layout
from mambazoo.mambabyte import ByteTokenizer, bits_per_byte


TINY = {
    "mamba-tiny": {},
    "mambabyte-tiny": {},
    "moe-mamba-tiny": {},
    "jamba-tiny": {},
    "jamba-tiny-window": {"window": 2},
    "jamba-tiny-rope": {"rope": True, "window": 3},
}


def tiny(name):
    base = name.replace("-window", "").replace("-rope", "")
    return create_model(base, n_layer=4, **TINY[name]).eval() if base == "jamba-tiny" else create_model(base).eval()


@pytest.mark.parametrize("name", list(TINY))
def test_causality(name):
    m = tiny(name)
    ids = torch.randint(0, 200, (1, 8))
    t = 5
    other = ids.clone()
    other[0, t] = (ids[0, t] + 1) % 200
    with torch.no_grad():
        a, b = m(ids), m(other)
    assert torch.equal(a[:, :t], b[:, :t]), "logits before t changed"
    assert not torch.allclose(a[:, t:], b[:, t:]), "logits at and after t did not change"


@pytest.mark.parametrize("name", list(TINY))
def test_cached_decoding_matches_full_forward(name):
    m = tiny(name)
    ids = torch.randint(0, 200, (2, 8))
    with torch.no_grad():
        full = m(ids)
        cache = m.allocate_cache(2, max_len=8)
        got = [m(ids[:, :3], cache)]
        for t in range(3, 8):
            got.append(m.step(ids[:, t], cache)[:, None])
    torch.testing.assert_close(torch.cat(got, 1), full, rtol=1e-4, atol=1e-4)
    assert cache.seqlen_offset == 8


def test_mamba_cache_does_not_grow_with_length():
    m = create_model("mamba-tiny").eval()
    small, big = m.allocate_cache(1, max_len=4), m.allocate_cache(1, max_len=100_000)
    assert small.nbytes() == big.nbytes() > 0
    before = small.nbytes()
    with torch.no_grad():
        m(torch.randint(0, 100, (1, 4)), small)
        for _ in range(20):
            m.step(torch.tensor([1]), small)
    assert small.nbytes() == before
    hybrid = create_model("jamba-tiny")  # attention layers keep a KV cache, which does grow
    assert hybrid.allocate_cache(1, max_len=64).nbytes() > hybrid.allocate_cache(1, max_len=8).nbytes()


def _mamba_layer_params(d, d_state=16, d_conv=4, expand=2, dt_rank=None):
    di = expand * d
    r = dt_rank or math.ceil(d / 16)
    return (d * 2 * di + di * d_conv + di + di * (r + 2 * d_state) + r * di + di + di * d_state + di + di * d + d)


# Published sizes: mamba-130m ... 2.8b (Gu & Dao), MambaByte 353M / 972M, Jamba 51.6B total / 12B active.
@pytest.mark.parametrize("name,n_layer,d,vocab,nominal", [
    ("mamba-130m", 24, 768, 50280, 130e6), ("mamba-370m", 48, 1024, 50280, 370e6),
    ("mamba-790m", 48, 1536, 50280, 790e6), ("mamba-1.4b", 48, 2048, 50280, 1.4e9),
    ("mamba-2.8b", 64, 2560, 50280, 2.8e9), ("mambabyte-353m", 53, 1024, 256, 353e6),
    ("mambabyte-972m", 48, 1792, 256, 972e6)])
def test_parameter_counts_mamba(name, n_layer, d, vocab, nominal):
    with torch.device("meta"):
        m = create_model(name)
    n = m.num_params()
    assert n == vocab * d + n_layer * _mamba_layer_params(d) + d  # tied head, final norm
    assert abs(n - nominal) / nominal < 0.025
    assert m.embedding.weight.shape[0] % 8 == 0 and m.lm_head.weight is m.embedding.weight


def test_parameter_count_moe_mamba():
    with torch.device("meta"):
        m = create_model("moe-mamba")
    d, E, H = 512, 32, 1536
    moe = d * E + E * 2 * d * H
    assert m.num_params() == 50264 * d + 8 * (_mamba_layer_params(d) + d + moe) + d
    assert len(m.layers) == 8 and all(b.ffn.top_k == 1 and b.ffn.capacity_factor == 1.0 for b in m.layers)


def test_parameter_count_jamba_v01():
    with torch.device("meta"):
        m = create_model("jamba-v0.1")
    c = m.config
    assert c.layer_layout() == "MMMMAMMM" * 4
    assert c.ffn_layout() == ["mlp", "moe"] * 16
    n = m.num_params()
    assert abs(n - 51.6e9) < 0.05e9, n
    expert = 3 * 4096 * 14336
    active = n - 16 * (16 - 2) * expert
    assert abs(active - 12.1e9) < 0.1e9, active
    assert m.lm_head.weight is not m.embedding.weight  # Jamba's head is untied
    assert m.layers[4].mixer.n_kv_heads == 8 and m.layers[0].mixer.dt_rank == 256


def test_layout_from_pattern_and_period():
    assert periodic_layout(8, 8, 4, "A", "M") == "MMMMAMMM"
    m = create_model("jamba-tiny", layout="MA", ffn="nde", n_layer=6)
    assert [type(b.mixer).__name__ for b in m.layers] == ["Mamba", "Attention"] * 3
    assert [type(b.ffn).__name__ for b in m.layers] == ["NoneType", "MLP", "MoE"] * 2
    m = create_model("jamba-tiny", attn_period=4, attn_offset=1)
    assert m.config.layer_layout() == "MAMMMAMM"
    with pytest.raises(ValueError, match="layout"):
        create_model("jamba-tiny", layout="MXM")
    with pytest.raises(ValueError, match="unknown config fields"):
        create_model("mamba-tiny", n_layers=3)


def test_out_proj_rescaled_at_init():
    torch.manual_seed(0)
    a = CausalLM(LMConfig(vocab_size=64, d_model=64, n_layer=16))
    torch.manual_seed(0)
    b = CausalLM(LMConfig(vocab_size=64, d_model=64, n_layer=16, rescale_prenorm_residual=False))
    ratio = b.layers[0].mixer.out_proj.weight.std() / a.layers[0].mixer.out_proj.weight.std()
    assert abs(ratio - 4.0) < 0.3  # sqrt(n_layer)
    assert abs(a.embedding.weight.std() - 0.02) < 0.002


def test_moe_aux_loss_collected():
    m = create_model("moe-mamba-tiny").train()
    m(torch.randint(0, 100, (2, 8)))
    per_layer = [b.aux_loss for b in m.layers]
    assert all(l is not None for l in per_layer)
    torch.testing.assert_close(m.aux_loss(), sum(per_layer))
    assert m.aux_loss() > 0
    assert create_model("mamba-tiny").aux_loss() == 0


@pytest.mark.parametrize("data", [b"", b"hello", bytes(range(256)), b"\xff\xfe\x80 invalid \xc3", "héllo ✓"])
def test_byte_tokenizer_round_trip(data):
    tok = ByteTokenizer()
    ids = tok.encode(data)
    assert all(0 <= i < 256 for i in ids)
    raw = data.encode() if isinstance(data, str) else data
    assert tok.decode_bytes(ids) == raw
    assert isinstance(tok.decode(ids), str)  # never raises on invalid UTF-8
    if isinstance(data, str):
        assert tok.decode(ids) == data
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        tok.decode([256])


def test_bits_per_byte():
    assert bits_per_byte(math.log(2)) == pytest.approx(1.0)
    assert bits_per_byte(torch.tensor(math.log(256))).item() == pytest.approx(8.0)


def test_bad_input_raises():
    m = create_model("mamba-tiny")
    with pytest.raises(ValueError, match=r"ids in \[0, 512\)"):
        m(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match=r"ids in \[0, 512\)"):
        m(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="at least one token"):
        m(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="integer dtype"):
        m(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\(batch, L\)"):
        m(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch 1"):
        m(torch.zeros(1, 3, dtype=torch.long), m.allocate_cache(2))
    with pytest.raises(ValueError, match="did you mean"):
        create_model("mamba-130")


def test_grad_checkpointing_recomputes_blocks_with_equal_gradients():
    """The config flag (and set_grad_checkpointing) recomputes each block in the backward pass: same loss and
    gradients, fewer saved activations; inference and bad values unaffected / named."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, d_model=32, n_layer=3, layout="M3A", n_heads=2, d_state=8, headdim=8, chunk_size=16)
    plain = CausalLM(LMConfig(**cfg))
    ckpt = CausalLM(LMConfig(**cfg, grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 64, (2, 24))

    def grads_and_saved(m):
        m.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = m(ids).logsumexp(-1).mean()
        loss.backward()
        return loss.item(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}, sum(saved)

    l0, g0, s0 = grads_and_saved(plain)
    l1, g1, s1 = grads_and_saved(ckpt)
    assert l0 == pytest.approx(l1, rel=1e-6) and g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6)
    assert s1 < s0 / 2, (s1, s0)
    ckpt.set_grad_checkpointing(False)
    assert grads_and_saved(ckpt)[2] == s0
    with torch.no_grad():
        assert CausalLM(LMConfig(**cfg, grad_checkpointing=True)).eval()(ids).shape == (2, 24, 64)
    with pytest.raises(ValueError, match="grad_checkpointing: expected true or false, got 'yes'"):
        LMConfig(**cfg, grad_checkpointing="yes").validate()
