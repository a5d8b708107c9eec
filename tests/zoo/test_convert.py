"""Weight conversion from transformers' MambaForCausalLM / JambaForCausalLM and mamba_ssm naming
(tiny random models, no hub), and our safetensors checkpoints."""

import json

import pytest
import torch

from mambazoo import create_model
from mambazoo.convert import (convert_jamba, detect_format, jamba_config, load_checkpoint, load_into,
                         load_pretrained, save_checkpoint)
from mambazoo.lm import CausalLM

transformers = pytest.importorskip("transformers")



def _hf_mamba():
    cfg = transformers.MambaConfig(vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                   conv_kernel=4)
    return transformers.MambaForCausalLM(cfg).eval()


def _hf_jamba():
    cfg = transformers.JambaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                   num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
                                   expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_dt_rank=4)
    m = transformers.JambaForCausalLM(cfg).eval()
    with torch.no_grad():  # make the inner norms and D non-trivial so a wrong mapping shows
        for n, p in m.named_parameters():
            if "layernorm" in n or n.endswith(".D"):
                p.add_(0.3 * torch.randn_like(p))
    return m


def _same_logits(hf, ours, ids):
    with torch.no_grad():
        a, b = hf(ids).logits, ours(ids)
    assert a.shape == b.shape
    assert a.abs().max() > 1e-3
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_hf_mamba_folder(tmp_path):
    hf = _hf_mamba()
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path).eval()
    assert ours.config.n_layer == 2 and ours.config.d_state == 8
    _same_logits(hf, ours, torch.randint(0, 96, (2, 10)))


def test_mamba_ssm_naming_bin_file(tmp_path):
    hf = _hf_mamba()
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    assert detect_format(sd) == "mamba_ssm"
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 2, "vocab_size": 96}))
    ours = load_pretrained(tmp_path / "pytorch_model.bin").eval()
    _same_logits(hf, ours, torch.randint(0, 96, (1, 7)))


def test_hf_jamba_folder_per_expert_weights(tmp_path):
    hf = _hf_jamba()
    hf.save_pretrained(tmp_path)  # written in the original per-expert layout
    ours = load_pretrained(tmp_path).eval()
    assert ours.config.layer_layout() == "MAMA"
    assert [type(b.ffn).__name__ for b in ours.layers] == ["MLP", "MoE"] * 2
    _same_logits(hf, ours, torch.randint(0, 96, (2, 9)))


def test_hf_jamba_packed_state_dict():
    hf = _hf_jamba()
    ours = CausalLM(jamba_config(hf.config.to_dict())).eval()
    load_into(ours, convert_jamba(hf.state_dict()))
    _same_logits(hf, ours, torch.randint(0, 96, (1, 6)))


def test_checkpoint_round_trip(tmp_path):
    m = create_model("jamba-tiny", n_layer=2).eval()
    path = tmp_path / "ckpt" / "model.safetensors"
    save_checkpoint(m, path)
    back = load_checkpoint(path).eval()
    assert back.config == m.config
    ids = torch.randint(0, 200, (1, 5))
    with torch.no_grad():
        assert torch.equal(back(ids), m(ids))
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    tied = create_model("mamba-tiny")
    save_checkpoint(tied, tmp_path / "t.safetensors")
    assert load_checkpoint(tmp_path / "t.safetensors").lm_head.weight is not None


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="expected model.safetensors"):
        load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="expected keys"):
        detect_format({"foo.weight": torch.zeros(1)})
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a mambazoo checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")
