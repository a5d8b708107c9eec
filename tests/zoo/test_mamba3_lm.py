"""Mamba-3 LMs: the mixer choice / layout letter 3 in LMConfig and its validation, named configs, decoding
(step == forward, greedy generation == argmax of the forward), training on the CPU, the named configs through
the CLI, and loading mamba_ssm MambaLMHeadModel folders with ssm_cfg.layer "Mamba3"."""

import json

import pytest
import torch

import mambazoo
from mambazoo.core.attention import Attention
from mambazoo.core.mamba import Mamba
from mambazoo.core.mamba2 import Mamba2
from mambazoo.core.mamba3 import Mamba3
from mambazoo.hub import detect_layout
from mambazoo.lm import LMConfig, build_lm
from mambazoo.registry import create_model, describe_model, list_models

SIZES = ("130m", "370m", "780m", "1.3b", "2.7b")


def test_mixer_choice_layout_letter_and_fields():
    c = LMConfig(vocab_size=64, d_model=32, n_layer=4, d_state=8, headdim=8, n_heads=2)
    kinds = lambda m: [type(b.mixer) for b in m.layers]  # noqa: E731
    assert kinds(build_lm(c, mixer="mamba3")) == [Mamba3] * 4
    assert kinds(build_lm(c, layout="33A3")) == [Mamba3, Mamba3, Attention, Mamba3]
    assert kinds(build_lm(c, layout="M23A")) == [Mamba, Mamba2, Mamba3, Attention]
    assert kinds(build_lm(c, mixer="mamba3", layout="MA")) == [Mamba3, Attention, Mamba3, Attention]
    m = build_lm(c, mixer="mamba3", is_mimo=True, mimo_rank=2, rope_fraction=1.0, outproj_norm=True,
                 chunk_size=16).layers[0].mixer
    assert (m.mimo_rank, m.rope_fraction, m.num_rope_angles, m.is_outproj_norm, m.chunk_size) == (2, 1.0, 4, True, 16)
    assert m.mimo_x.shape == (m.nheads, 2, 8) and m.layer_idx == 0
    assert build_lm(c, mixer="mamba3", mimo_rank=2).layers[0].mixer.mimo_rank == 1  # SISO unless is_mimo


@pytest.mark.parametrize("bad,needle", [({"mixer": "mamba4"}, "mamba3"), ({"layout": "3X"}, "3 (Mamba-3)"),
                                        ({"rope_fraction": 0.25}, "0.5 or 1.0"), ({"mimo_rank": 0}, "mimo_rank"),
                                        ({"is_mimo": "yes"}, "is_mimo"), ({"a_activation": "relu"}, "heavy_tail")])
def test_bad_fields_raise_naming_expected_and_got(bad, needle):
    with pytest.raises(ValueError, match="expected") as e:
        build_lm(LMConfig(vocab_size=64, d_model=32, n_layer=2, d_state=8, headdim=8, mixer="mamba3"), **bad)
    assert needle in str(e.value) and repr(next(iter(bad.values()))).strip("'") in str(e.value)


@pytest.mark.parametrize("size", SIZES)
def test_named_configs_on_meta_at_the_mamba2_shapes(size):
    with torch.device("meta"):
        m3, m2, mimo = create_model(f"mamba3-{size}"), create_model(f"mamba2-{size}"), create_model(f"mamba3-{size}-mimo")
    assert all(isinstance(b.mixer, Mamba3) and b.mixer.mimo_rank == 1 for b in m3.layers)
    assert all(isinstance(b.mixer, Mamba3) and b.mixer.mimo_rank == 4 for b in mimo.layers)
    assert (m3.config.n_layer, m3.config.d_model) == (m2.config.n_layer, m2.config.d_model)
    mx = m3.layers[0].mixer
    assert (mx.d_state, mx.headdim, mx.expand, mx.rope_fraction, mx.chunk_size) == (128, 64, 2, 0.5, 64)
    assert m3.config.padded_vocab == 50288 and m3.lm_head.weight is m3.embedding.weight
    # per layer: in_proj (d, 2 di + 2 N + 3 H + N/4) + out_proj (di, d) + dt_bias, D (H) + B/C biases (H, N) +
    # B/C norms (N) + the block's norm (d); Mamba-3 has no conv, no A_log and no inner norm
    d, N = m3.config.d_model, 128
    di, H = 2 * d, 2 * d // 64
    layer = d * (2 * di + 2 * N + 3 * H + N // 4) + di * d + 2 * H + 2 * H * N + 2 * N + d
    assert m3.num_params() == 50288 * d + m3.config.n_layer * layer + d
    assert describe_model(f"mamba3-{size}").startswith("Mamba-3 LM")


def test_130m_parameter_count():
    with torch.device("meta"):
        assert create_model("mamba3-130m").num_params() == 130_365_312
        assert create_model("mamba3-130m-mimo").num_params() == 145_405_824


@pytest.mark.parametrize("kw", [{}, {"is_mimo": True, "mimo_rank": 2}, {"rope_fraction": 1.0, "outproj_norm": True},
                                {"layout": "33A3", "n_layer": 4, "n_heads": 4}, {"a_activation": "heavy_tail"}])
def test_step_and_prefill_equal_the_full_forward(kw):
    torch.manual_seed(0)
    m = create_model("mamba3-tiny", chunk_size=8, **kw).eval()
    ids = torch.randint(0, 512, (2, 21))
    with torch.no_grad():
        full = m(ids)
        cache = m.allocate_cache(2)
        steps = torch.stack([m.step(ids[:, t], cache) for t in range(21)], 1)
        cache2 = m.allocate_cache(2)
        a = m(ids[:, :13], cache2)
        b = torch.stack([m.step(ids[:, t], cache2) for t in range(13, 21)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-5, atol=1e-5)
    assert cache.seqlen_offset == 21
    first = next(s for s in cache.layers if hasattr(s, "angle"))
    assert first.ssm.shape == (2, 8, 16, 16) and first.angle.shape == (2, 8, 8 if kw.get("rope_fraction") == 1.0 else 4)  # N * fraction / 2


def test_greedy_generation_is_the_argmax_of_the_full_forward():
    torch.manual_seed(0)
    m = create_model("mamba3-tiny", layout="3A33", n_layer=4, n_heads=4, is_mimo=True, mimo_rank=2).eval()
    prompt = torch.randint(0, 512, (2, 5))
    out = m.generate(prompt, max_new_tokens=8, top_k=1, cuda_graph=False)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        logits = m(out)
    torch.testing.assert_close(logits[:, 4:-1].argmax(-1), out[:, 5:], rtol=0, atol=0)


def test_out_proj_rescaled_like_mamba_ssm_and_no_weight_decay_marks():
    torch.manual_seed(0)
    m = create_model("mamba3-tiny", n_layer=8)
    w = m.layers[0].mixer.out_proj.weight
    bound = (1 / w.shape[1]) ** 0.5 / 8 ** 0.5  # kaiming_uniform(a=sqrt 5) / sqrt(n_layer)
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    mx = m.layers[0].mixer
    assert getattr(mx.dt_bias, "_no_weight_decay", False) and getattr(mx.D, "_no_weight_decay", False)
    from mambazoo.tasks.optim import split_decay

    decay, no_decay = split_decay(m)
    pre = "layers.0.mixer."
    assert {pre + "in_proj.weight", pre + "out_proj.weight"} <= set(decay)
    assert {pre + n for n in ("dt_bias", "D", "B_bias", "C_bias", "B_norm.weight", "C_norm.weight")} <= set(no_decay)


def test_tiny_trains_on_cpu():
    torch.manual_seed(0)
    m = create_model("mamba3-tiny", vocab_size=32)
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


def test_registered():
    assert {"mamba3-tiny", *(f"mamba3-{s}" for s in SIZES), *(f"mamba3-{s}-mimo" for s in SIZES)} <= set(list_models())


# -- mamba_ssm's MambaLMHeadModel folder ----------------------------------------------------------------------
def _mamba_ssm_folder(tmp_path, model, ssm_cfg, vocab):
    """Save ``model`` as mamba_ssm would: pytorch_model.bin with backbone.* names (embedding rows padded) and
    its config.json (d_model, n_layer, vocab_size, ssm_cfg, pad_vocab_size_multiple, ...)."""
    sd = {(k if k == "lm_head.weight" else "backbone." + k): v.clone() for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    c = model.config
    (tmp_path / "config.json").write_text(json.dumps({
        "d_model": c.d_model, "d_intermediate": 0, "n_layer": c.n_layer, "vocab_size": vocab, "ssm_cfg": ssm_cfg,
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": c.pad_vocab_multiple, "tie_embeddings": c.tie_embeddings}))
    return sd


@pytest.mark.parametrize("mimo,rope", [(False, 0.5), (True, 1.0)])
def test_from_pretrained_reads_a_mamba_ssm_mamba3_folder(tmp_path, mimo, rope):
    torch.manual_seed(2)
    m = create_model("mamba3-tiny", vocab_size=100, pad_vocab_multiple=16, d_model=32, d_state=8, headdim=8,
                     is_mimo=mimo, mimo_rank=2, rope_fraction=rope, outproj_norm=mimo, ngroups=2).eval()
    with torch.no_grad():  # move the constant-initialised parameters so that every one of them matters
        for n, p in m.named_parameters():
            if n.endswith(("D", "_bias", "norm.weight", "mimo_x", "mimo_z", "mimo_o")):
                p.add_(torch.randn_like(p) * 0.3)
    sd = _mamba_ssm_folder(tmp_path, m, {"layer": "Mamba3", "d_state": 8, "headdim": 8, "ngroups": 2,
                                         "rope_fraction": rope, "is_mimo": mimo, "mimo_rank": 2,
                                         "chunk_size": 32}, vocab=100)
    assert "backbone.layers.1.mixer.B_bias" in sd and "backbone.embedding.weight" in sd
    assert sd["backbone.embedding.weight"].shape[0] == 112  # padded rows, as mamba_ssm keeps them
    assert detect_layout(tmp_path) == "mamba3"
    back = mambazoo.from_pretrained(tmp_path, tokenizer=False)
    assert back.config.mixer == "mamba3" and back.config.is_mimo == mimo and back.config.rope_fraction == rope
    assert back.config.ngroups == 2 and back.config.outproj_norm == mimo and back.config.vocab_size == 100
    ids = torch.randint(0, 100, (2, 19))
    with torch.no_grad():
        assert torch.equal(back(ids), m(ids))


def test_mamba_ssm_mamba3_folder_bad_configs_raise(tmp_path):
    from mambazoo.hub import mamba3_config_from_mamba_ssm

    m = create_model("mamba3-tiny", d_model=32, d_state=8, headdim=8)
    sd = _mamba_ssm_folder(tmp_path, m, {"layer": "Mamba3"}, vocab=512)
    good = {"d_model": 32, "n_layer": 2, "ssm_cfg": {"layer": "Mamba3"}}
    assert mamba3_config_from_mamba_ssm(sd, good).d_state == 8
    for bad, needle in (({"d_intermediate": 64}, "d_intermediate"), ({"attn_layer_idx": [1]}, "attn_layer_idx"),
                        ({"ssm_cfg": {"layer": "Mamba2"}}, "'Mamba3'"),
                        ({"ssm_cfg": {"layer": "Mamba3", "A_floor": 0.1}}, "A_floor"),
                        ({"ssm_cfg": {"layer": "Mamba3", "is_mimo": True}}, "is_mimo")):
        with pytest.raises(ValueError, match=needle):
            mamba3_config_from_mamba_ssm(sd, {**good, **bad})


def test_export_and_checkpoint_round_trip(tmp_path):
    from mambazoo.convert import load_checkpoint, save_checkpoint

    m = create_model("mamba3-tiny", layout="3A", n_heads=4, is_mimo=True, mimo_rank=2).eval()
    ids = torch.randint(0, 512, (1, 11))
    save_checkpoint(m, tmp_path / "m.safetensors")
    back = load_checkpoint(tmp_path / "m.safetensors").eval()
    assert back.config == m.config
    m.save_pretrained(tmp_path / "export")
    again = mambazoo.from_pretrained(tmp_path / "export", tokenizer=False)
    assert again.config.mixer == "mamba3" and again.config.is_mimo
    with torch.no_grad():
        assert torch.equal(back(ids), m(ids)) and torch.equal(again(ids), m(ids))


# -- the named configs through the CLI ------------------------------------------------------------------------
FAST = ["--trainer.accelerator", "cpu", "--trainer.precision", "32", "--trainer.log_every_n_steps", "1",
        "--trainer.max_time", "null", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]


def _fit(run_dir, config, *extra):
    from mambazoo.cli import main

    return main(["fit", "--config", config, "--run_dir", str(run_dir), *FAST, *extra])


def test_tiny_config_fits_through_the_cli(tmp_path):
    import os
    from pathlib import Path

    text = tmp_path / "corpus.py"
    text.write_bytes(Path(os.__file__).read_bytes()[:20000])
    assert _fit(tmp_path / "run", "mamba3-tiny", "--data.init_args.path", str(text), "--data.init_args.seq_len",
                "16", "--data.init_args.batch_size", "2", "--data.init_args.val_max_windows", "2",
                "--model.init_args.sample_tokens", "4") == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["model"] == "mamba3-tiny" and ckpt["global_step"] == 2


@pytest.mark.parametrize("config", ["selective-copy-mamba3", "induction-heads-mamba3"])
def test_synthetic_mamba3_configs_fit(tmp_path, config):
    kw = {"vocab_size": 16, "n_layer": 2, "d_model": 16, "d_state": 4, "headdim": 8}
    extra = ["--data.init_args.seq_len", "24", "--data.init_args.batch_size", "2",
             "--data.init_args.eval_samples", "2", "--model.init_args.model_kwargs", json.dumps(kw)]
    if config.startswith("induction"):
        extra += ["--data.init_args.test_lengths", "[24, 96]", "--test_after_fit", "true"]
    assert _fit(tmp_path, config, *extra) == 0
    hp = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["hyper_parameters"]
    assert hp["model"] == "mamba3-tiny"
