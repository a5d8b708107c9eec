"""Bad data files get one clear line naming the file (issue 21): one-class folders, 0-byte / non-image files
in an ImageFolder, 0-frame and non-WAV files in a WAV folder; each is found when the data module is set up,
skipped and named, and a loader that still meets one names the file."""

import wave

import numpy as np
import pytest
import torch

from mambazoo.data.audio import WavFolderDataModule, read_wav
from mambazoo.data.images import ImageFolderDataModule, _rgb_loader


def _png(path, seed=0):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)


def _wav(path, frames=800):
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes((np.sin(np.arange(frames) / 5) * 8000).astype("<i2").tobytes())


def test_one_class_is_refused_with_the_folder_named(tmp_path):
    _png(tmp_path / "img" / "cat" / "0.png")
    with pytest.raises(ValueError, match=r"img: one class sub-folder \('cat'\); classification needs at least 2"):
        ImageFolderDataModule(str(tmp_path / "img"), img_size=8, num_workers=0)
    _wav(tmp_path / "wav" / "yes" / "0.wav")
    with pytest.raises(ValueError, match=r"wav: one class sub-folder \('yes'\)"):
        WavFolderDataModule(str(tmp_path / "wav"), num_workers=0)


def test_unreadable_images_are_skipped_and_named(tmp_path, capsys):
    for cls in ("cat", "dog"):
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", seed=i)
    (tmp_path / "cat" / "empty.jpg").write_bytes(b"")
    (tmp_path / "dog" / "notes.png").write_text("not an image")
    dm = ImageFolderDataModule(str(tmp_path), img_size=8, batch_size=2, num_workers=0, val_split=0.34)
    dm.setup()
    out = capsys.readouterr().out
    assert out.count("skipped 2 file(s) that are not readable images") == 1
    assert "empty.jpg" in out and "notes.png" in out
    assert len(dm.train_set) + len(dm.val_set) == 6
    for x, y in dm.train_dataloader():  # every kept file loads
        assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match=r"empty.jpg: not a readable image"):
        _rgb_loader(str(tmp_path / "cat" / "empty.jpg"))


def test_empty_and_broken_wavs_are_skipped_and_named(tmp_path, capsys):
    for label in ("no", "yes"):
        for i in range(3):
            _wav(tmp_path / label / f"{i}.wav")
    _wav(tmp_path / "no" / "silent.wav", frames=0)
    (tmp_path / "yes" / "zero.wav").write_bytes(b"")
    dm = WavFolderDataModule(str(tmp_path), batch_size=2, sample_rate=8000, clip_seconds=0.1, num_workers=0,
                             val_split=0.34)
    dm.setup()
    out = capsys.readouterr().out
    assert out.count("skipped 2 file(s)") == 1 and "silent.wav" in out and "zero.wav" in out
    assert len(dm.train_set) + len(dm.val_set) == 6
    with pytest.raises(ValueError, match="silent.wav: a WAV file with no audio frames"):
        read_wav(tmp_path / "no" / "silent.wav")
    with pytest.raises(ValueError, match="zero.wav: not a PCM WAV file"):
        read_wav(tmp_path / "yes" / "zero.wav")


@pytest.mark.parametrize("kwargs,message", [
    (dict(val_split=1.5), "val_split: expected a fraction in [0, 1)"),
    (dict(num_workers=-1), "num_workers: expected an int >= 0"),
    (dict(img_size=0), "img_size, crop_pct"),
])
def test_image_folder_ranges(tmp_path, kwargs, message):
    for cls in ("a", "b"):
        _png(tmp_path / cls / "0.png")
        _png(tmp_path / cls / "1.png")
    with pytest.raises(ValueError) as e:
        ImageFolderDataModule(str(tmp_path), **{"img_size": 8, "num_workers": 0, **kwargs}).setup()
    assert message in str(e.value)


def test_model_boundary_inputs_are_named():
    """create_model(None), a negative class count and uint8 images each give a ValueError naming them."""
    import mambazoo

    with pytest.raises(ValueError, match="model name: expected a registered name"):
        mambazoo.create_model(None)
    with pytest.raises(ValueError, match="num_classes: expected an int >= 0"):
        mambazoo.create_model("vim-tiny", depth=1, num_classes=-1)
    vim = mambazoo.create_model("vim-tiny", depth=1, embed_dim=16, img_size=32, num_classes=3)
    with pytest.raises(ValueError, match="expected a float tensor.*uint8"):
        vim(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
