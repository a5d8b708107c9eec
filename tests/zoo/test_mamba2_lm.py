"""Mamba-2 LMs: named configs and their parameter counts, the mixer choice in LMConfig, decoding, training
on the CPU, and conversion from transformers' Mamba2ForCausalLM and mamba_ssm's key layout."""

import json

import pytest
import torch

from mambazoo.lm import LMConfig, build_lm
from mambazoo.core.mamba import Mamba
from mambazoo.core.mamba2 import Mamba2
from mambazoo.core.attention import Attention
from mambazoo.mamba2.convert import detect_mamba2_format, load_mamba2
from mambazoo.registry import create_model, list_models

# transformers' Mamba2ForCausalLM of the same configs (issue 24)
PUBLISHED = {"mamba2-130m": 128_989_632, "mamba2-370m": 368_346_624, "mamba2-780m": 780_161_280,
             "mamba2-1.3b": 1_343_757_312, "mamba2-2.7b": 2_702_599_680}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_on_meta(name):
    with torch.device("meta"):
        m = create_model(name)
    assert m.num_params() == PUBLISHED[name]
    assert all(isinstance(b.mixer, Mamba2) for b in m.layers)
    assert m.config.padded_vocab == 50288 and m.lm_head.weight is m.embedding.weight


def test_registered_and_tiny_runs():
    assert {"mamba2-tiny", *PUBLISHED} <= set(list_models())
    m = create_model("mamba2-tiny").eval()
    ids = torch.randint(0, 512, (2, 37))
    with torch.no_grad():
        logits = m(ids)
        cache = m.allocate_cache(2)
        steps = torch.stack([m.step(ids[:, t], cache) for t in range(37)], 1)
    assert logits.shape == (2, 37, 512)
    torch.testing.assert_close(steps, logits, rtol=1e-4, atol=1e-4)
    assert cache.layers[0].ssm.shape == (2, 8, 16, 16)


def test_prefill_then_decode_equals_full_forward():
    m = create_model("mamba2-tiny", chunk_size=8).eval()
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        full = m(ids)
        cache = m.allocate_cache(1)
        a = m(ids[:, :13], cache)
        b = torch.stack([m.step(ids[:, t], cache) for t in range(13, 20)], 1)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-4, atol=1e-4)


def test_mixer_choice_and_layout_letter():
    c = LMConfig(vocab_size=64, d_model=32, n_layer=4, d_state=8, headdim=8, n_heads=2)
    kinds = lambda m: [type(b.mixer) for b in m.layers]  # noqa: E731
    assert kinds(build_lm(c)) == [Mamba] * 4
    assert kinds(build_lm(c, mixer="mamba2")) == [Mamba2] * 4
    assert kinds(build_lm(c, layout="M2A2")) == [Mamba, Mamba2, Attention, Mamba2]
    assert kinds(build_lm(c, mixer="mamba2", layout="MMA")) == [Mamba2, Mamba2, Attention, Mamba2]
    with pytest.raises(ValueError, match="mixer: expected one of"):
        build_lm(c, mixer="mamba4")
    with pytest.raises(ValueError, match="2 \\(Mamba-2\\)"):
        build_lm(c, layout="MX")
    # a Mamba-2 + attention hybrid decodes token by token like its full forward
    m = build_lm(c, mixer="mamba2", layout="MA").eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        full = m(ids)
        cache = m.allocate_cache(2, max_len=16)
        steps = torch.stack([m.step(ids[:, t], cache) for t in range(9)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


def test_out_proj_rescaled_like_mamba_ssm():
    torch.manual_seed(0)
    m = create_model("mamba2-tiny", n_layer=8)
    w = m.layers[0].mixer.out_proj.weight
    bound = (1 / w.shape[1]) ** 0.5 / 8 ** 0.5  # kaiming_uniform(a=sqrt 5) / sqrt(n_layer)
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound


def test_tiny_trains_on_cpu():
    m = create_model("mamba2-tiny", vocab_size=32)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    ids = torch.arange(48).remainder(8).repeat(4, 1)  # a periodic sequence is learnable in a few steps
    losses = []
    for _ in range(30):
        logits = m(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def _hf_model(tie: bool, n_groups: int = 2):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    cfg = Mamba2Config(vocab_size=96, hidden_size=32, state_size=8, num_heads=8, head_dim=8, n_groups=n_groups,
                       expand=2, conv_kernel=4, num_hidden_layers=2, chunk_size=16, tie_word_embeddings=tie,
                       use_cache=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1)
    hf = Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():  # move D, the norms and the conv bias off their constant inits so all of them matter
        for n, p in hf.named_parameters():
            if n.endswith((".D", "norm.weight", "conv1d.bias", "norm_f.weight")):
                p.add_(torch.randn_like(p) * 0.3)
    return hf


@pytest.mark.parametrize("tie", [True, False])
def test_convert_transformers_mamba2_equal_logits_and_generation(tmp_path, tie):
    hf = _hf_model(tie)
    hf.save_pretrained(tmp_path)
    ours = load_mamba2(tmp_path).eval()
    assert ours.config.mixer == "mamba2" and ours.config.ngroups == 2 and ours.config.tie_embeddings == tie
    ids = torch.randint(3, 96, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
        want = hf.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10)
        got = ours.generate(ids, 10, temperature=0.0, cuda_graph=False)
    assert torch.equal(got, want)


def test_convert_mamba_ssm_layout(tmp_path):
    hf = _hf_model(True, n_groups=1)
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    # mamba_ssm pads the embedding rows (pad_vocab_size_multiple) and keeps vocab_size unpadded in config.json
    sd["backbone.embedding.weight"] = torch.cat([sd["backbone.embedding.weight"], torch.zeros(4, 32)])
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({
        "d_model": 32, "d_intermediate": 0, "n_layer": 2, "vocab_size": 96, "pad_vocab_size_multiple": 100,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 1, "chunk_size": 16},
        "rms_norm": True, "residual_in_fp32": True, "tie_embeddings": True}))
    assert detect_mamba2_format(sd) == "mamba_ssm_mamba2"
    ours = load_mamba2(tmp_path).eval()
    assert ours.config.padded_vocab == 100
    ids = torch.randint(3, 96, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
        want = hf.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        assert torch.equal(ours.generate(ids, 6, temperature=0.0, cuda_graph=False), want)


def test_convert_rejects_other_models(tmp_path):
    with pytest.raises(ValueError, match="expected a Mamba-2 LM"):
        detect_mamba2_format({"backbone.embeddings.weight": torch.zeros(2, 2)})
    sd = _hf_model(True).state_dict()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"n_groups": 2, "time_step_limit": [0.0, 0.5]}))
    with pytest.raises(ValueError, match="expected the published dt limit"):
        load_mamba2(tmp_path)


FAST = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.max_time", "null", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]


def _fit(run_dir, config, *extra):
    from mambazoo.cli import main

    return main(["fit", "--config", config, "--run_dir", str(run_dir), *FAST, *extra])


def test_tiny_config_fits_through_the_cli(tmp_path):
    import os
    from pathlib import Path

    text = tmp_path / "corpus.py"
    text.write_bytes(Path(os.__file__).read_bytes()[:20000])
    assert _fit(tmp_path / "run", "mamba2-tiny", "--data.init_args.path", str(text), "--data.init_args.seq_len",
                "16", "--data.init_args.batch_size", "2", "--data.init_args.val_max_windows", "2",
                "--model.init_args.sample_tokens", "4") == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["model"] == "mamba2-tiny" and ckpt["global_step"] == 2


@pytest.mark.parametrize("config,seq_len", [("selective-copy-mamba2", 24), ("induction-heads-mamba2", 24),
                                            ("mqar-mamba2-hybrid", 48)])
def test_synthetic_mamba2_configs_fit(tmp_path, config, seq_len):
    vocab = 512 if config.startswith("mqar") else 16
    kw = {"vocab_size": vocab, "n_layer": 2, "d_model": 16, "d_state": 4, "headdim": 8}
    if config.startswith("mqar"):
        kw.update(layout="MA", n_heads=2, n_kv_heads=2)
    extra = ["--data.init_args.seq_len", str(seq_len), "--data.init_args.batch_size", "2",
             "--data.init_args.eval_samples", "2", "--model.init_args.model_kwargs", json.dumps(kw)]
    if config.startswith("induction"):
        extra += ["--data.init_args.test_lengths", "[24, 96]", "--test_after_fit", "true"]
    assert _fit(tmp_path, config, *extra) == 0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    hp = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["hyper_parameters"]
    assert hp["model"] == "mamba2-tiny"


def test_checkpoint_round_trip(tmp_path):
    from mambazoo.convert import load_checkpoint, save_checkpoint

    m = create_model("mamba2-tiny", layout="M2A", n_heads=4).eval()
    save_checkpoint(m, tmp_path / "m.safetensors")
    back = load_checkpoint(tmp_path / "m.safetensors").eval()
    assert back.config == m.config and back.config.mixer == "mamba2"
    ids = torch.randint(0, 512, (1, 11))
    with torch.no_grad():
        assert torch.equal(back(ids), m(ids))


def test_from_pretrained_and_load_pretrained_recognise_mamba2(tmp_path):
    """The hub loader and the local loader route a transformers Mamba2 folder to the Mamba-2 converter."""
    import mambazoo
    from mambazoo.convert import load_pretrained

    hf = _hf_model(tie=True)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(3, 96, (1, 13))
    for ours in (mambazoo.from_pretrained(tmp_path, tokenizer=False), load_pretrained(tmp_path)):
        assert ours.config.mixer == "mamba2"
        with torch.no_grad():
            torch.testing.assert_close(ours.eval()(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
