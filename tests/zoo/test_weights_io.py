"""Every weights / checkpoint loader on every kind of bad file: one line naming the path, the format expected
and what was found; a pickle holding code is refused without running it (issue 21)."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from mambazoo import create_model
from mambazoo.convert import load_checkpoint, load_pretrained, save_checkpoint
from mambazoo.errors import WeightsFileError
from mambazoo.tasks.checkpointing import AtomicCheckpointIO
from mambazoo.vim import load_weights, read_state_dict as vim_read_state_dict
from mambazoo.weights_io import load_file, read_state_dict, sniff

TINY_LM = dict(n_layer=1, d_model=16, d_state=4)


def _good_torch(path: Path) -> Path:
    torch.save({"a.weight": torch.randn(8, 8), "b": torch.zeros(8)}, path)
    return path


def _good_safetensors(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"a.weight": torch.randn(64, 64)}, str(path))
    return path


def make_bad(kind: str, d: Path) -> tuple[Path, str]:
    """(a bad file of ``kind``, a phrase the error must hold about what was found)."""
    if kind == "empty":
        p = d / "empty.pt"
        p.write_bytes(b"")
        return p, "empty file"
    if kind == "truncated-torch":
        good = _good_torch(d / "good.pt").read_bytes()
        p = d / "truncated.pt"
        p.write_bytes(good[: len(good) // 2])
        return p, "truncated or corrupt torch zip"
    if kind == "truncated-safetensors":
        good = _good_safetensors(d / "good.safetensors").read_bytes()
        p = d / "truncated.safetensors"
        p.write_bytes(good[: len(good) // 2])
        return p, "truncated"
    if kind == "truncated-header":
        good = _good_safetensors(d / "good.safetensors").read_bytes()
        p = d / "short.safetensors"
        p.write_bytes(good[:20])
        return p, "truncated safetensors"
    if kind == "random":
        p = d / "random.bin"
        p.write_bytes(bytes(range(7, 256)) * 4)
        return p, "unrecognised data"
    if kind == "json":
        p = d / "config.bin"
        p.write_text(json.dumps({"d_model": 16}))
        return p, "JSON"
    if kind == "text":
        p = d / "notes.safetensors"
        p.write_text("these are not weights\n")
        return p, "text"
    raise AssertionError(kind)


BAD_KINDS = ["empty", "truncated-torch", "truncated-safetensors", "truncated-header", "random", "json", "text"]


def _vim():
    return create_model("vim-tiny", depth=1, embed_dim=32, img_size=32, num_classes=3)


LOADERS = {
    "weights_io.load_file": lambda p: load_file(p),
    "convert.load_pretrained": lambda p: load_pretrained(p),
    "convert.load_checkpoint": lambda p: load_checkpoint(p),
    "vim.read_state_dict": lambda p: vim_read_state_dict(p),
    "vim.load_weights": lambda p: load_weights(_vim(), p),
    "ckpt_path (AtomicCheckpointIO)": lambda p: AtomicCheckpointIO().load_checkpoint(p),
}


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_every_loader_names_the_file_and_what_it_found(tmp_path, loader, kind):
    path, found = make_bad(kind, tmp_path)
    with pytest.raises(ValueError) as e:
        LOADERS[loader](path)
    msg = str(e.value)
    assert str(path) in msg and found in msg, msg
    assert "\n" not in msg and "weights_only=False" not in msg
    assert "expected" in msg  # the format that was expected


class _Payload:
    """Unpickling this creates the marker file (what an attacker's pickle would do, harmlessly)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("style", ["torch-zip", "plain-pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, loader, style):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    if style == "torch-zip":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Payload(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"state_dict": {}, "x": _Payload(marker)}, f, protocol=2)
    assert not marker.exists()
    with pytest.raises(WeightsFileError) as e:
        LOADERS[loader](path)
    assert not marker.exists()
    msg = str(e.value)
    assert str(path) in msg and "refused" in msg and "open" in msg and "weights_only=False" not in msg


def test_content_decides_the_format_not_the_name(tmp_path):
    torch_named_st = tmp_path / "x.safetensors"
    _good_torch(torch_named_st)
    assert sniff(torch_named_st) == "torch-zip"
    assert set(read_state_dict(torch_named_st)) == {"a.weight", "b"}
    st_named_bin = tmp_path / "y.bin"
    _good_safetensors(st_named_bin)
    assert sniff(st_named_bin) == "safetensors" and set(read_state_dict(st_named_bin)) == {"a.weight"}


def test_project_files_reach_the_right_loader_or_say_why_not(tmp_path):
    lm = create_model("mamba-tiny", **TINY_LM).eval()
    # the project's own save_checkpoint file: load_pretrained and load_checkpoint read it
    st = tmp_path / "lm.safetensors"
    save_checkpoint(lm, st)
    ids = torch.randint(0, 200, (1, 6))
    with torch.no_grad():
        assert torch.equal(load_pretrained(st).eval()(ids), lm(ids))
    # ... and the Vim loader says it does not fit, naming the file
    with pytest.raises(ValueError, match=f"{st}: not a Vision Mamba state dict"):
        load_weights(_vim(), st)
    # a zoo-layout .bin has no config: load_checkpoint says so (no circular advice)
    zbin = tmp_path / "pytorch_model.bin"
    torch.save(lm.state_dict(), zbin)
    with pytest.raises(WeightsFileError, match=f"{zbin}: expected a mambazoo checkpoint.*found a torch file"):
        load_pretrained(zbin)
    # a partial mamba_ssm state dict: the missing keys are named
    part = {"backbone.embedding.weight": torch.zeros(10, 16), "backbone.layers.0.norm.weight": torch.ones(16)}
    torch.save(part, tmp_path / "partial.bin")
    with pytest.raises(ValueError, match="partial Mamba state dict, missing .*in_proj.weight"):
        load_pretrained(tmp_path / "partial.bin")
    # a Lightning checkpoint given as plain weights: named as such
    torch.save({"state_dict": {"model.w": torch.zeros(1)}, "pytorch-lightning_version": "2.6", "epoch": 0},
               tmp_path / "run.ckpt")
    with pytest.raises(WeightsFileError, match="found a Lightning checkpoint"):
        read_state_dict(tmp_path / "run.ckpt")
    # a config.json that is not JSON
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "config.json").write_text("{not json")
    save_checkpoint(lm, tmp_path / "f" / "model.safetensors")
    with pytest.raises(WeightsFileError, match="config.json: expected a JSON config, found malformed JSON"):
        load_pretrained(tmp_path / "f")


def test_saved_files_get_the_users_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(create_model("mamba-tiny", **TINY_LM), tmp_path / "m.safetensors")
        io = AtomicCheckpointIO()
        io.save_checkpoint({"state_dict": {}}, tmp_path / "c.ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "c.ckpt").stat().st_mode & 0o777 == 0o644


def test_timm_checkpoint_path_goes_through_the_safe_reader(tmp_path):
    timm = pytest.importorskip("timm")
    import mambazoo.vim  # noqa: F401  (registers the models)

    kw = dict(num_classes=3, img_size=32, depth=1, embed_dim=32)
    src = timm.create_model("vim_tiny_patch16_224", **kw).eval()
    good = tmp_path / "vim.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}}, good)
    m = timm.create_model("vim_tiny_patch16_224", checkpoint_path=str(good), **kw).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), src(x))
    for kind in ("empty", "truncated-torch", "random", "json"):
        path, found = make_bad(kind, tmp_path)
        with pytest.raises(ValueError) as e:
            timm.create_model("vim_tiny_patch16_224", checkpoint_path=str(path), **kw)
        assert str(path) in str(e.value) and found in str(e.value)
    marker = tmp_path / "PWNED"
    torch.save({"x": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(WeightsFileError, match="refused"):
        timm.create_model("vim_tiny_patch16_224", checkpoint_path=str(tmp_path / "evil.pth"), **kw)
    assert not marker.exists()
