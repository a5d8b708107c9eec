"""Named AuM configs: 128 mel x 1024 frames (10.24 s at a 10 ms hop), 16x16 patches, depth 24, and a
small one for the spoken-digits task (1 s clips)."""

from __future__ import annotations

# Every field is a keyword of mambazoo.audio.model.AudioMamba.
AUM_CONFIGS: dict[str, dict] = {
    "aum-tiny": dict(embed_dim=192, depth=24, n_mels=128, frames=1024, num_classes=527),
    "aum-small": dict(embed_dim=384, depth=24, n_mels=128, frames=1024, num_classes=527, drop_path_rate=0.05),
    "aum-base": dict(embed_dim=768, depth=24, n_mels=128, frames=1024, num_classes=527, drop_path_rate=0.1),
    # spoken digits: 1 s at 16 kHz -> 101 frames, padded to 112: 4 x 7 patches of 16x16.
    "aum-digits": dict(embed_dim=128, depth=6, n_mels=64, frames=112, num_classes=10, freq_mask=8,
                       time_mask=16, drop_path_rate=0.05),
    # aum-tiny's shape with the bidirectional Mamba-3 mixer (d_state 64 as vim-tiny-mamba3)
    "aum-tiny-mamba3": dict(embed_dim=192, depth=24, n_mels=128, frames=1024, num_classes=527, mixer="mamba3",
                            d_state=64, headdim=64),
}

DESCRIPTIONS = {
    "aum-tiny": "Audio Mamba tiny: 128 mel x 1024 frames, 16x16 patches, depth 24, width 192",
    "aum-small": "Audio Mamba small: 128 mel x 1024 frames, 16x16 patches, depth 24, width 384",
    "aum-base": "Audio Mamba base: 128 mel x 1024 frames, 16x16 patches, depth 24, width 768",
    "aum-digits": "Audio Mamba for 1 s spoken digits: 64 mel x 112 frames, depth 6, width 128, 10 classes",
    "aum-tiny-mamba3": "Audio Mamba tiny with bidirectional Mamba-3 mixers: 128 mel x 1024 frames, depth 24, "
                       "width 192, d_state 64",
}
