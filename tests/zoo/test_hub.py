"""mambazoo.from_pretrained / save_pretrained / create_model(pretrained=True) through huggingface_hub, offline.

Each test builds tiny random models, writes them in the layout a Hub repo has (transformers' save_pretrained,
mamba_ssm's config.json + pytorch_model.bin, the official Vim .pth) into a Hub cache laid out as
huggingface_hub keeps it (models--ORG--NAME/{refs,snapshots}), and loads them through the real
snapshot_download / hf_hub_download with HF_HUB_OFFLINE=1 (conftest)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import mambazoo
from mambazoo.hub import detect_layout, download, from_pretrained, load_pretrained_into, save_pretrained

transformers = pytest.importorskip("transformers")

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def put_in_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT_A, refs=("main",)) -> Path:
    """Copy ``folder``'s files into the Hub cache as the snapshot ``commit`` of ``repo_id``; point refs at it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


def _randomize(model, scale=0.3):
    with torch.no_grad():  # inner norms, D, biases away from their init, so a wrong mapping shows
        for n, p in model.named_parameters():
            if "layernorm" in n or n.endswith((".D", "norm.weight", "norm_f.weight")):
                p.add_(scale * torch.randn_like(p))
    return model


def hf_mamba(vocab=96, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.MambaConfig(vocab_size=vocab, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                   conv_kernel=4)
    return _randomize(transformers.MambaForCausalLM(cfg)).eval()


def hf_falcon_mamba():
    cfg = transformers.FalconMambaConfig(vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2,
                                         mixer_rms_eps=1e-3)
    return _randomize(transformers.FalconMambaForCausalLM(cfg)).eval()


def hf_jamba():
    cfg = transformers.JambaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                   num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
                                   expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_dt_rank=4)
    return _randomize(transformers.JambaForCausalLM(cfg)).eval()


def tiny_tokenizer(folder: Path):
    """A word-level tokenizer (tokenizers package) saved as transformers writes one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<eos>", "<unk>", "the", "cat", "sat", "on", "a", "mat", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return fast


def same_logits(hf, ours, ids):
    with torch.no_grad():
        a, b = hf(ids).logits, ours(ids)
    assert a.abs().max() > 1e-3
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hub"


def test_hub_repo_id_through_the_offline_cache(tmp_path, cache):
    hf = hf_mamba()
    src = tmp_path / "src"
    hf.save_pretrained(src)
    tiny_tokenizer(src)
    snap = put_in_cache(cache, "tiny-org/mamba-tiny-hf", src)
    assert download("tiny-org/mamba-tiny-hf", cache_dir=cache) == snap
    model = mambazoo.from_pretrained("tiny-org/mamba-tiny-hf", cache_dir=cache)
    same_logits(hf, model, torch.randint(0, 96, (2, 9)))
    assert model.tokenizer is not None and model.tokenizer.encode("the cat sat") == [2, 3, 4]


def test_revision_picks_the_snapshot(tmp_path, cache):
    a, b = hf_mamba(seed=0), hf_mamba(seed=1)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    put_in_cache(cache, "tiny-org/m", tmp_path / "a", COMMIT_A, refs=("main",))
    put_in_cache(cache, "tiny-org/m", tmp_path / "b", COMMIT_B, refs=("v2",))
    ids = torch.randint(0, 96, (1, 7))
    same_logits(a, from_pretrained("tiny-org/m", cache_dir=cache), ids)
    same_logits(b, from_pretrained("tiny-org/m", revision="v2", cache_dir=cache), ids)
    same_logits(b, from_pretrained("tiny-org/m", revision=COMMIT_B, cache_dir=cache), ids)
    with pytest.raises(ValueError, match="tiny-org/m.*revision 'v3'.*offline"):
        from_pretrained("tiny-org/m", revision="v3", cache_dir=cache)


def test_offline_and_not_cached_is_a_clear_error(cache):
    with pytest.raises(ValueError, match="nobody/nothing.*not in the local Hub cache.*HF_HUB_OFFLINE"):
        from_pretrained("nobody/nothing", cache_dir=cache)
    with pytest.raises(ValueError, match="expected a local folder or file, a Hub repo id"):
        from_pretrained("not a name", cache_dir=cache)


def test_falcon_mamba_folder(tmp_path):
    hf = hf_falcon_mamba()
    hf.save_pretrained(tmp_path)
    assert detect_layout(tmp_path) == "falcon_mamba"
    ours = from_pretrained(tmp_path)
    assert ours.config.inner_norm and ours.layers[0].mixer.fwd.B_norm.eps == 1e-3
    same_logits(hf, ours, torch.randint(0, 96, (2, 8)))


def test_jamba_folder(tmp_path):
    hf = hf_jamba()
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert ours.config.layer_layout() == "MAMA"
    same_logits(hf, ours, torch.randint(0, 96, (2, 8)))


def test_mamba_ssm_repo_in_the_cache(tmp_path, cache):
    hf = hf_mamba(vocab=90)  # mamba_ssm pads the vocabulary to a multiple of 8: 90 -> 96 rows
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    sd["backbone.embedding.weight"] = torch.cat([sd["backbone.embedding.weight"], torch.zeros(6, 32)])
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    src = tmp_path / "src"
    src.mkdir()
    torch.save(sd, src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 2, "vocab_size": 90, "ssm_cfg": {},
                                                 "rms_norm": True, "pad_vocab_size_multiple": 8}))
    put_in_cache(cache, "tiny-org/mamba-ssm-tiny", src)
    ours = from_pretrained("tiny-org/mamba-ssm-tiny", cache_dir=cache, tokenizer=False)
    assert ours.embedding.weight.shape[0] == 96
    same_logits(hf, ours, torch.randint(0, 90, (1, 6)))


# -- Vim: the official checkpoint under the name the zoo knows ----------------------------------------
_OFFICIAL = {"in_proj.weight": "in_proj.weight", "out_proj.weight": "out_proj.weight",
             "fwd.conv1d.weight": "conv1d.weight", "fwd.conv1d.bias": "conv1d.bias", "fwd.x_proj.weight": "x_proj.weight",
             "fwd.dt_proj.weight": "dt_proj.weight", "fwd.dt_proj.bias": "dt_proj.bias", "fwd.A_log": "A_log",
             "fwd.D": "D", "bwd.conv1d.weight": "conv1d_b.weight", "bwd.conv1d.bias": "conv1d_b.bias",
             "bwd.x_proj.weight": "x_proj_b.weight", "bwd.dt_proj.weight": "dt_proj_b.weight",
             "bwd.dt_proj.bias": "dt_proj_b.bias", "bwd.A_log": "A_b_log", "bwd.D": "D_b"}


def official_vim_checkpoint(model) -> dict:
    """Our VisionMamba's weights as a hustvl/Vim training checkpoint ({'model': state_dict, ...})."""
    out = {}
    for key, v in model.state_dict().items():
        p = key.split(".")
        if p[0] == "blocks" and p[2] == "mixer":
            out[f"layers.{p[1]}.mixer.{_OFFICIAL['.'.join(p[3:])]}"] = v.clone()
        elif p[0] == "blocks":
            out[f"layers.{p[1]}.{'.'.join(p[2:])}"] = v.clone()
        elif key == "norm.weight":
            out["norm_f.weight"] = v.clone()
        elif key == "pos_embed":
            half = (v.shape[1] - 1) // 2
            out[key] = torch.cat([v[:, 1:1 + half], v[:, :1], v[:, 1 + half:]], dim=1).clone()
        else:
            out[key] = v.clone()
    return {"model": out, "epoch": 299}


def tiny_vim(num_classes=5):
    from mambazoo.vim.model import VisionMamba

    m = VisionMamba(img_size=32, patch_size=8, embed_dim=16, depth=2, d_state=4, num_classes=num_classes)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def test_create_model_pretrained_vim_from_the_known_repo(tmp_path, cache):
    src = tiny_vim()
    (tmp_path / "src").mkdir()
    torch.save(official_vim_checkpoint(src), tmp_path / "src" / "vim_t_midclstok_76p1acc.pth")
    put_in_cache(cache, "hustvl/Vim-tiny-midclstok", tmp_path / "src")
    ours = mambazoo.create_model("vim-tiny", pretrained=True, cache_dir=cache)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), src(x), rtol=1e-5, atol=1e-5)
    fine = mambazoo.create_model("vim-tiny", pretrained=True, cache_dir=cache, num_classes=3)
    assert fine.head.weight.shape == (3, 16)
    torch.testing.assert_close(fine.blocks[1].mixer.in_proj.weight, src.blocks[1].mixer.in_proj.weight)
    with pytest.raises(ValueError, match="no pretrained weights are known"):
        mambazoo.create_model("mamba-tiny", pretrained=True)


# -- export ----------------------------------------------------------------------------------------------
def test_save_pretrained_mamba_loads_in_transformers(tmp_path):
    ours = mambazoo.create_model("mamba-tiny", vocab_size=90, d_model=32)  # 90 padded to 96 inside
    _randomize(ours)
    with torch.no_grad():
        for b in ours.layers:
            b.mixer.fwd.D.add_(torch.randn_like(b.mixer.fwd.D))
    save_pretrained(ours, tmp_path)
    hf = transformers.MambaForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.vocab_size == 90
    ids = torch.randint(0, 90, (2, 9))
    same_logits(hf, ours.eval(), ids)
    back = from_pretrained(tmp_path)
    assert back.config == ours.config
    torch.testing.assert_close(back(ids), ours(ids))


def test_save_pretrained_jamba_and_falcon_load_in_transformers(tmp_path):
    ours = from_pretrained(_saved(hf_jamba(), tmp_path / "j"))
    save_pretrained(ours, tmp_path / "j2")
    hf = transformers.JambaForCausalLM.from_pretrained(tmp_path / "j2").eval()
    ids = torch.randint(0, 96, (2, 7))
    same_logits(hf, ours, ids)
    torch.testing.assert_close(from_pretrained(tmp_path / "j2")(ids), ours(ids))

    ours = from_pretrained(_saved(hf_falcon_mamba(), tmp_path / "f"))
    save_pretrained(ours, tmp_path / "f2")
    hf = transformers.FalconMambaForCausalLM.from_pretrained(tmp_path / "f2").eval()
    same_logits(hf, ours, ids)


def _saved(model, folder):
    model.save_pretrained(folder)
    return folder


def test_save_pretrained_other_models_round_trip(tmp_path):
    moe = mambazoo.create_model("moe-mamba-tiny").eval()
    save_pretrained(moe, tmp_path / "moe")
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["model_type"] == "mambazoo"
    ids = torch.randint(0, moe.config.vocab_size, (1, 5))
    torch.testing.assert_close(from_pretrained(tmp_path / "moe")(ids), moe(ids))
    vim = tiny_vim()
    vim.save_pretrained(tmp_path / "vim")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(tmp_path / "vim")(x), vim(x))


def test_load_pretrained_into_a_new_head(tmp_path):
    src = tiny_vim(num_classes=5)
    save_pretrained(src, tmp_path / "vim")
    from mambazoo.vim.model import VisionMamba

    target = VisionMamba(img_size=32, patch_size=8, embed_dim=16, depth=2, d_state=4, num_classes=2)
    head_before = target.head.weight.clone()
    report = load_pretrained_into(target, tmp_path / "vim")
    assert report["fresh"] == ["head.weight", "head.bias"]
    torch.testing.assert_close(target.head.weight, head_before)
    torch.testing.assert_close(target.pos_embed, src.pos_embed)
    wrong = VisionMamba(img_size=32, patch_size=8, embed_dim=24, depth=2, d_state=4, num_classes=2)
    with pytest.raises(ValueError, match="do not fit the model"):
        load_pretrained_into(wrong, tmp_path / "vim")


def test_load_pretrained_into_a_language_model_and_a_task_like_wrapper(tmp_path):
    hf = hf_mamba()
    hf.save_pretrained(tmp_path / "hf")
    target = mambazoo.create_model("mamba-tiny", vocab_size=96, d_model=32, d_state=8)
    wrapper = torch.nn.Module()
    wrapper.model = target  # a Lightning task holds the network as .model
    assert load_pretrained_into(wrapper, tmp_path / "hf")["fresh"] == []
    same_logits(hf, target.eval(), torch.randint(0, 96, (1, 6)))
    with pytest.raises(ValueError, match="do not fit"):
        load_pretrained_into(mambazoo.create_model("mamba-tiny", vocab_size=96, d_model=32), tmp_path / "hf")


def test_mamba_ssm_repo_gets_the_gpt_neox_tokenizer_and_dtype(tmp_path, cache):
    hf = hf_mamba()
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    src = tmp_path / "src"
    src.mkdir()
    torch.save(sd, src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 2, "vocab_size": 96}))
    put_in_cache(cache, "tiny-org/ssm", src)
    tok_dir = tmp_path / "tok"
    tiny_tokenizer(tok_dir)  # stands in for EleutherAI/gpt-neox-20b's tokenizer files
    put_in_cache(cache, "EleutherAI/gpt-neox-20b", tok_dir)
    model = from_pretrained("tiny-org/ssm", cache_dir=cache, dtype=torch.bfloat16)
    assert model.embedding.weight.dtype == torch.bfloat16
    assert model.tokenizer.encode("the dog") == [2, 8]


def test_unknown_model_type_is_refused_clearly(tmp_path):
    """(Mamba-2 folders load: tests/zoo/test_mamba2_lm.py.) Another architecture is named and refused."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        from_pretrained(tmp_path)


def test_tokenizer_without_transformers_uses_the_tokenizers_package(tmp_path, monkeypatch):
    import importlib.util

    from mambazoo.hub import FastTokenizer, load_tokenizer

    tiny_tokenizer(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, FastTokenizer)
    assert tok.encode("the cat") == [2, 3] and tok.decode([2, 3]).split() == ["the", "cat"]


def test_the_configs_name_the_known_repos():
    import re

    from mambazoo.cli import CONFIG_DIR
    from mambazoo.hub import KNOWN_REPOS

    named = {}
    for p in CONFIG_DIR.glob("*.yaml"):
        m = re.search(r"^# pretrained weights: (\S+)", p.read_text(), re.M)
        if m:
            named[p.stem] = m.group(1)
    assert named == {k: v for k, v in KNOWN_REPOS.items() if (CONFIG_DIR / f"{k}.yaml").is_file()}
    assert len(named) == 9


def test_exported_vim_with_a_new_head_and_an_unreadable_pth(tmp_path):
    src = tiny_vim(num_classes=5)
    src.save_pretrained(tmp_path / "vim")
    fine = from_pretrained(tmp_path / "vim", num_classes=2)
    assert fine.head.weight.shape == (2, 16)
    torch.testing.assert_close(fine.blocks[0].mixer.in_proj.weight, src.blocks[0].mixer.in_proj.weight)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "weights.pth").write_bytes(b"\x00not a checkpoint" * 4)
    with pytest.raises(ValueError, match="weights.pth: expected a .safetensors file or a torch checkpoint"):
        from_pretrained(tmp_path / "bad")


def test_audio_mamba_round_trip(tmp_path):
    pytest.importorskip("torchaudio")
    from mambazoo.audio.model import AudioMamba

    m = AudioMamba(num_classes=3, n_mels=16, frames=32, n_fft=64, win_length=48, hop_length=16, freq_mask=4,
                   time_mask=0, patch_size=8, embed_dim=16, depth=2, d_state=4).eval()
    save_pretrained(m, tmp_path / "aum")
    back = from_pretrained(tmp_path / "aum")
    assert back.frontend.mel.win_length == 48 and back.frontend.freq_masking.mask_param == 4
    wave = torch.randn(2, 500)
    with torch.no_grad():
        torch.testing.assert_close(back(wave), m(wave))


def test_loaded_model_keeps_tied_head_and_parameter_flags(tmp_path):
    hf_mamba().save_pretrained(tmp_path)
    m = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert m.lm_head.weight is m.embedding.weight  # still tied: fine-tuning updates one matrix
    assert m.layers[0].mixer.fwd.A_log._no_weight_decay  # the task's weight-decay split still sees it
