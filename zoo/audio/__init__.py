"""AuM-style audio classifier: log-mel patches read by the bidirectional Vision Mamba backbone.

Registers aum-tiny / aum-small / aum-base and aum-digits (``mambazoo.create_model('aum-digits')``)."""

from __future__ import annotations

from functools import partial

from mambazoo.audio.configs import AUM_CONFIGS, DESCRIPTIONS
from mambazoo.audio.frontend import AudioFrontend, check_waveform
from mambazoo.audio.model import AudioMamba
from mambazoo.registry import register_model


def build_aum(name: str, **overrides) -> AudioMamba:
    """The named config ``name`` with keyword ``overrides`` of AudioMamba's arguments."""
    return AudioMamba(**{**AUM_CONFIGS[name], **overrides})


for _name in AUM_CONFIGS:
    register_model(_name, DESCRIPTIONS[_name])(partial(build_aum, _name))

__all__ = ["AudioFrontend", "AudioMamba", "build_aum", "check_waveform"]
