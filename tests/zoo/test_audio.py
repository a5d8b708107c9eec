"""AuM-style audio classifier: front end on synthetic tones, named configs, bad audio."""

import math

import pytest
import torch

import mambazoo
from mambazoo.audio import AudioFrontend, AudioMamba


def tones(freqs, seconds=1.0, rate=16000):
    t = torch.arange(int(seconds * rate)) / rate
    return torch.stack([0.5 * torch.sin(2 * math.pi * f * t) for f in freqs])


def test_frontend_shapes_resampling_and_padding():
    fe = AudioFrontend(sample_rate=16000, n_mels=64, frames=112).eval()
    spec = fe(tones([440, 2000]))  # 1 s -> 101 frames, padded to 112
    assert spec.shape == (2, 1, 64, 112) and torch.isfinite(spec).all()
    # the 2 kHz tone puts its energy in a higher mel band than the 440 Hz one
    band = spec[:, 0, :, :100].mean(-1).argmax(-1)
    assert band[1] > band[0]
    # a 22.05 kHz input is resampled first: same spectrogram shape, nearly the same content
    spec22 = fe(tones([440, 2000], rate=22050), sample_rate=22050)
    assert spec22.shape == spec.shape
    assert (spec22[:, :, :, :100] - spec[:, :, :, :100]).abs().mean() < 0.1
    # longer clips are cut to the frame count
    assert fe(tones([440], seconds=2.0)).shape == (1, 1, 64, 112)


def test_spec_augment_only_in_training():
    fe = AudioFrontend(n_mels=64, frames=112, freq_mask=16, time_mask=30)
    wave = tones([300, 600, 900, 1200])
    fe.eval()
    torch.testing.assert_close(fe(wave), fe(wave))
    fe.train()
    masked = fe(wave)
    # masked bands / frames are constant (filled with 0) across the whole other axis
    full_rows = (masked[:, 0] == 0).all(dim=-1).any(dim=-1)
    full_cols = (masked[:, 0] == 0).all(dim=-2).any(dim=-1)
    assert (full_rows | full_cols).all()


@pytest.mark.parametrize("name, width", [("aum-tiny", 192), ("aum-small", 384), ("aum-base", 768)])
def test_named_configs_shapes(name, width):
    with torch.device("meta"):
        full = mambazoo.create_model(name)
        one_block = mambazoo.create_model(name, depth=1)
        logits = one_block.backbone(torch.empty(2, 1, 128, 1024))
    assert len(full.backbone.blocks) == 24 and full.backbone.embed_dim == width
    assert full.backbone.patch_embed.grid_size == (8, 64)  # 128 mel x 1024 frames in 16x16 patches
    assert logits.shape == (2, 527)
    # the front end (built on the CPU) gives exactly the backbone's image size
    assert full.frontend.eval()(tones([500])).shape == (1, 1, 128, 1024)


def test_digits_config_end_to_end():
    m = mambazoo.create_model("aum-digits", depth=2)
    assert m(tones([300, 700], rate=22050), sample_rate=22050).shape == (2, 10)
    loss = m.train()(tones([300, 700])).logsumexp(-1).mean()
    loss.backward()
    assert m.backbone.blocks[0].mixer.bwd.x_proj.weight.grad is not None


def test_bad_audio_raises_clear_errors():
    m = AudioMamba(num_classes=3, n_mels=32, frames=32, embed_dim=16, depth=1)
    with pytest.raises(ValueError, match="silent"):
        m(torch.zeros(2, 16000))
    with pytest.raises(ValueError, match=r"clip\(s\) \[1\]"):
        m(torch.cat([tones([440]), torch.zeros(1, 16000)]))
    with pytest.raises(ValueError, match="empty audio"):
        m(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="expected \\(batch, samples\\)"):
        m(tones([440])[0])  # no batch axis
    with pytest.raises(ValueError, match="expected \\(batch, samples\\)"):
        m(torch.randn(2, 2, 16000))  # stereo
    with pytest.raises(ValueError, match="NaN"):
        m(torch.full((1, 1000), float("nan")))
    with pytest.raises(ValueError, match="float"):
        m(torch.ones(1, 1000, dtype=torch.int16))
