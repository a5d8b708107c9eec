"""Nemotron-H (Mamba-2 + attention + relu^2 MLP hybrid) from transformers' NemotronHForCausalLM: equal logits and
greedy generations on a tiny random model; unsupported layer patterns are refused."""

import pytest
import torch

from mambazoo.core.attention import Attention
from mambazoo.core.mamba2 import Mamba2
from mambazoo.mamba2.nemotron_h import ReLU2MLP, _layer_types, _pairs, load_nemotron_h, nemotron_h_config

TYPES = ["linear_attention", "mlp", "full_attention", "mlp", "linear_attention", "linear_attention", "mlp"]


def _hf(tmp_path):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    cfg = NemotronHConfig(vocab_size=96, hidden_size=32, layers_block_type=TYPES, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, intermediate_size=48, ssm_state_size=8,
                          mamba_num_heads=8, mamba_head_dim=8, n_groups=2, chunk_size=16, tie_word_embeddings=False,
                          use_cache=True)
    torch.manual_seed(0)
    hf = NemotronHForCausalLM(cfg).eval()
    with torch.no_grad():  # off the constant inits, so that D, every norm and the conv bias matter
        for n, p in hf.named_parameters():
            if n.endswith((".D", "norm.weight", "conv1d.bias", "norm_f.weight")):
                p.add_(torch.randn_like(p) * 0.3)
            elif n.endswith(("proj.weight", "embeddings.weight")):
                p.mul_(3.0)
            if n == "lm_head.weight":
                p.mul_(10.0)
    hf.save_pretrained(tmp_path)
    return hf


def test_nemotron_h_equal_logits_and_greedy_generation(tmp_path):
    hf = _hf(tmp_path)
    ours = load_nemotron_h(tmp_path).eval()
    c = ours.config
    assert (c.layout, c.ffn, c.mixer, c.ngroups) == ("MAMM", "ddnd", "mamba2", 2)
    kinds = [(type(b.mixer), type(b.ffn)) for b in ours.layers]
    assert kinds == [(Mamba2, ReLU2MLP), (Attention, ReLU2MLP), (Mamba2, type(None)), (Mamba2, ReLU2MLP)]
    ids = torch.randint(3, 96, (2, 23))
    with torch.no_grad():
        want = hf(ids).logits
        assert want.abs().max() > 1.0  # logits that can tell a wrong mapping apart
        torch.testing.assert_close(ours(ids), want, rtol=1e-4, atol=1e-4)
        gen_hf = hf.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10)
        gen = ours.generate(ids, 10, temperature=0.0, cuda_graph=False)
    assert torch.equal(gen, gen_hf)


def test_patterns():
    assert _layer_types({"hybrid_override_pattern": "M-*-"}) == ["linear_attention", "mlp", "full_attention", "mlp"]
    assert _pairs(TYPES) == [(0, 1), (2, 3), (4, None), (5, 6)]
    with pytest.raises(ValueError, match="MoE layers of Nemotron-H are not supported"):
        _pairs(["linear_attention", "moe"])
    with pytest.raises(ValueError, match="expected an MLP layer to follow"):
        _pairs(["mlp", "linear_attention"])
    with pytest.raises(ValueError, match="expected letters M"):
        _layer_types({"hybrid_override_pattern": "MX"})
    base = dict(vocab_size=64, hidden_size=32, hybrid_override_pattern="M*", num_attention_heads=4, head_dim=8,
                mamba_num_heads=8, mamba_head_dim=8, n_groups=2)
    assert nemotron_h_config(base).layout == "MA"
    with pytest.raises(ValueError, match="head_dim: expected hidden_size / num_attention_heads = 8"):
        nemotron_h_config({**base, "head_dim": 16})
    with pytest.raises(ValueError, match="time_step_limit"):
        nemotron_h_config({**base, "time_step_limit": [0.0, 0.1]})
