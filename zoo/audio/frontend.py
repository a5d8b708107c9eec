"""The audio front end: waveform -> (resample) -> log-mel spectrogram -> fixed number of frames ->
per-clip standardization -> SpecAugment-style masking (training only).

    wave (batch, samples) at ``input_rate`` -> spectrogram (batch, 1, n_mels, frames)

Frequency is the image's height and time its width, so patches are ordered frequency band by
frequency band, as in AST and AuM.
"""

from __future__ import annotations

import torch
from torch import nn

from mambazoo.optional import require


def torchaudio_module():
    """torchaudio, imported on first use (it comes with the `audio` extra)."""
    return require("torchaudio", "audio (resampling, mel spectrograms)")


SILENCE = 1e-8  # a clip whose peak |amplitude| is below this carries no signal


def check_waveform(wave: torch.Tensor) -> torch.Tensor:
    """Validate a batch of waveforms: (batch, samples) or (batch, 1, samples), finite, non-empty and
    not silent. Returns it as (batch, samples) float; raises ValueError otherwise."""
    if not isinstance(wave, torch.Tensor):
        raise ValueError(f"waveform: expected a tensor (batch, samples), got {type(wave).__name__}")
    if wave.dim() == 3 and wave.shape[1] == 1:
        wave = wave[:, 0]
    if wave.dim() != 2:
        raise ValueError(
            f"waveform: expected (batch, samples) or (batch, 1, samples) mono audio, got a {wave.dim()}-d "
            f"tensor {tuple(wave.shape)}; mix channels down and add a batch axis"
        )
    if wave.shape[1] == 0 or wave.shape[0] == 0:
        raise ValueError(f"waveform: empty audio {tuple(wave.shape)}: expected at least one sample per clip")
    if not wave.is_floating_point():
        raise ValueError(f"waveform: expected float samples in [-1, 1], got {wave.dtype}")
    if wave.device.type != "meta":
        if not torch.isfinite(wave).all():
            raise ValueError("waveform: contains NaN or infinite samples")
        peak = wave.detach().abs().amax(dim=1)
        silent = (peak < SILENCE).nonzero().flatten().tolist()
        if silent:
            raise ValueError(f"waveform: clip(s) {silent[:10]} of the batch are silent (peak < {SILENCE}): "
                             "no signal to classify")
    return wave


class AudioFrontend(nn.Module):
    """Waveform -> normalized log-mel spectrogram (batch, 1, n_mels, frames).

    Args:
        sample_rate: the rate the spectrogram is computed at; inputs at another rate are resampled.
        n_mels, n_fft, win_length, hop_length: log-mel geometry (defaults: 128 mel, a 25 ms Hann
            window zero-padded to 1024 points so that no mel filter is empty, 10 ms hop at 16 kHz).
        frames: clips are zero-padded or cut to this many frames (1024 = 10.24 s for AuM).
        freq_mask, time_mask: the widest SpecAugment masks (mel bins, frames), drawn per clip,
            ``n_masks`` of each, applied in training only; 0 disables them.
    """

    def __init__(self, sample_rate: int = 16000, n_mels: int = 128, frames: int = 1024, n_fft: int = 1024,
                 win_length: int = 400, hop_length: int = 160, freq_mask: int = 24, time_mask: int = 96,
                 n_masks: int = 2):
        super().__init__()
        if min(sample_rate, n_mels, frames, n_fft, win_length, hop_length) < 1 or win_length > n_fft:
            raise ValueError("sample_rate, n_mels, frames, n_fft, win_length, hop_length: expected positive "
                             "ints with win_length <= n_fft")
        self.sample_rate, self.n_mels, self.frames = sample_rate, n_mels, frames
        self.hop_length, self.n_masks = hop_length, n_masks
        with torch.device("cpu"):  # the filter bank is computed, so never on the meta device
            self.mel = torchaudio_module().transforms.MelSpectrogram(
                sample_rate=sample_rate, n_fft=n_fft, win_length=win_length, hop_length=hop_length,
                n_mels=n_mels, power=2.0)
        self.freq_masking = torchaudio_module().transforms.FrequencyMasking(freq_mask, iid_masks=True) if freq_mask else None
        self.time_masking = torchaudio_module().transforms.TimeMasking(time_mask, iid_masks=True) if time_mask else None

    def samples_for(self, seconds: float) -> int:
        """Number of samples at ``sample_rate`` that fill about ``seconds`` of audio."""
        return int(round(seconds * self.sample_rate))

    def forward(self, wave: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """wave (batch, samples) at ``sample_rate`` (default: the front end's) -> (batch, 1, n_mels, frames)."""
        wave = check_waveform(wave).float()
        if sample_rate is not None and sample_rate != self.sample_rate:
            wave = torchaudio_module().functional.resample(wave, int(sample_rate), self.sample_rate)
        spec = torch.log(self.mel(wave) + 1e-6)  # (batch, n_mels, time)
        spec = _fit_frames(spec, self.frames)
        mean = spec.mean(dim=(1, 2), keepdim=True)
        std = spec.std(dim=(1, 2), keepdim=True).clamp_min(1e-5)
        spec = ((spec - mean) / std)[:, None]  # (batch, 1, n_mels, frames)
        if self.training:
            for _ in range(self.n_masks):
                if self.freq_masking is not None:
                    spec = self.freq_masking(spec)
                if self.time_masking is not None:
                    spec = self.time_masking(spec)
        return spec


def _fit_frames(spec: torch.Tensor, frames: int) -> torch.Tensor:
    """(batch, n_mels, T) -> (batch, n_mels, frames): cut the end off or pad with the clip's
    minimum (its quietest level, i.e. silence)."""
    T = spec.shape[-1]
    if T >= frames:
        return spec[..., :frames]
    floor = spec.amin(dim=(1, 2), keepdim=True).expand(-1, spec.shape[1], frames - T)
    return torch.cat([spec, floor], dim=-1)
