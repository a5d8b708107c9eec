"""AuM-style audio classifier: log-mel patches read by the bidirectional Vision Mamba backbone.

Registers aum-tiny / aum-small / aum-base and aum-digits (``mambazoo.create_model('aum-digits')``)."""

from __future__ import annotations

from mambazoo.audio.configs import AUM_CONFIGS, DESCRIPTIONS
from mambazoo.audio.frontend import AudioFrontend, check_waveform
from mambazoo.audio.model import AudioMamba
from mambazoo.registry import register_configs


def build_aum(name: str, **overrides) -> AudioMamba:
    """The named config ``name`` with keyword ``overrides`` of AudioMamba's arguments."""
    return AudioMamba(**{**AUM_CONFIGS[name], **overrides})


def _build(config: dict, **overrides) -> AudioMamba:
    return AudioMamba(**{**config, **overrides})


register_configs(AUM_CONFIGS, DESCRIPTIONS, _build)

__all__ = ["AudioFrontend", "AudioMamba", "build_aum", "check_waveform"]
