"""AuM-style audio classifier: the audio front end's log-mel spectrogram (batch, 1, n_mels, frames)
is cut into 16x16 patches and read by the Vision Mamba backbone (middle class token, absolute
position embedding, bidirectional "v2" blocks)."""

from __future__ import annotations

import torch
from torch import nn

from mambazoo.audio.frontend import AudioFrontend
from mambazoo.vim.model import VisionMamba


class AudioMamba(nn.Module):
    """wave (batch, samples) at ``sample_rate`` -> logits (batch, num_classes).

    Args:
        sample_rate, n_mels, frames, n_fft, win_length, hop_length, freq_mask, time_mask: the front end's
            (see AudioFrontend); a batch at another rate is resampled when ``forward`` is told it.
        patch_size, stride, embed_dim, depth, d_state, num_classes, drop_path_rate, drop_rate:
            the backbone's (see VisionMamba), applied to an image of (n_mels, frames) pixels.
        mixer, headdim: the backbone's mixer, 'mamba', 'mamba2' (bidirectional Mamba-2, heads of headdim) or
            'mamba3' (bidirectional Mamba-3; with rope_fraction, is_mimo, mimo_rank: see VisionMamba).
    """

    def __init__(self, num_classes: int = 527, sample_rate: int = 16000, n_mels: int = 128, frames: int = 1024,
                 n_fft: int = 1024, win_length: int = 400, hop_length: int = 160, freq_mask: int = 24,
                 time_mask: int = 96, patch_size=16, stride=None, embed_dim: int = 192, depth: int = 24, d_state: int = 16,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "token",
                 mixer: str = "mamba", headdim: int = 64, rope_fraction: float = 0.5, is_mimo: bool = False,
                 mimo_rank: int = 4):
        super().__init__()
        self.frontend = AudioFrontend(sample_rate, n_mels, frames, n_fft, win_length, hop_length, freq_mask,
                                      time_mask)
        self.backbone = VisionMamba(
            img_size=(n_mels, frames), patch_size=patch_size, stride=stride, in_chans=1,
            num_classes=num_classes, embed_dim=embed_dim, depth=depth, d_state=d_state,
            drop_rate=drop_rate, drop_path_rate=drop_path_rate, global_pool=global_pool, mixer=mixer, headdim=headdim,
            rope_fraction=rope_fraction, is_mimo=is_mimo, mimo_rank=mimo_rank)
        self.num_classes, self.sample_rate = num_classes, sample_rate

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.backbone.reset_classifier(num_classes, global_pool)
        self.num_classes = num_classes

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def load_pretrained(self, path) -> None:
        """Load a local weights file (see mambazoo.vim.weights.load_weights); a head of another size stays fresh."""
        from mambazoo.vim.weights import load_weights

        load_weights(self, path, fresh=("backbone.head.weight", "backbone.head.bias"))

    # -- timm conventions (the backbone's, with the parameter names under backbone.) ------------------
    @property
    def feature_info(self) -> list[dict]:
        return [{**f, "module": f"backbone.{f['module']}"} for f in self.backbone.feature_info]

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block (see VisionMamba.set_grad_checkpointing)."""
        self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for timm's layer-wise LR decay: the front end and embeddings, block i, the final norm."""
        return dict(stem=r"^frontend|^backbone\.(cls_token|pos_embed|patch_embed)",
                    blocks=[(r"^backbone\.blocks\.(\d+)", None), (r"^backbone\.norm", (99999,))])

    def forward_intermediates(self, wave: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False,
                              sample_rate: int | None = None):
        """wave (batch, samples) -> the blocks' outputs as (batch, embed_dim, mel patches, time patches) maps
        (see VisionMamba.forward_intermediates)."""
        return self.backbone.forward_intermediates(self.spectrogram(wave, sample_rate), indices, norm, stop_early,
                                                   output_fmt, intermediates_only)

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of ``indices``; returns the kept indices."""
        take = self.backbone.prune_intermediate_layers(indices, prune_norm, prune_head)
        if prune_head:
            self.num_classes = 0
        return take

    def spectrogram(self, wave: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """wave (batch, samples) -> (batch, 1, n_mels, frames); masked in training mode."""
        return self.frontend(wave, sample_rate)

    def forward_features(self, wave: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """wave (batch, samples) -> normalized tokens (batch, 1 + num_patches, embed_dim)."""
        return self.backbone.forward_features(self.spectrogram(wave, sample_rate))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.backbone.forward_head(x, pre_logits)

    def forward(self, wave: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(wave, sample_rate))
