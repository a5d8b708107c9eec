"""The Mamba-2 mixer (Gu & Dao, 2024): one in_proj to (z, x, B, C, dt) -> causal depthwise conv1d + SiLU over
(x, B, C) -> SSD (mambazoo.core.ssd) -> gated RMSNorm (gate first, then RMSNorm per group) -> out_proj, with a
one-token decode step on a constant-size cache and chunked prefill that continues from it.

Parameter names and shapes follow mamba_ssm's ``Mamba2`` and transformers' ``Mamba2Mixer`` (in_proj, conv1d,
dt_bias, A_log, D, norm.weight, out_proj), so checkpoints load by renaming the prefix only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mambazoo.core.cache import MambaState
from mambazoo.core.dispatch import conv_step, fused_step
from mambazoo.core.mamba import dt_bias_init
from mambazoo.core.ssd import INF, ssd, ssd_step

__all__ = ["GatedRMSNorm", "Mamba2", "causal_conv1d_packed"]


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) over groups of ``group_size`` channels (mamba_ssm's RMSNormGated with
    norm_before_gate=False, group_size = d_inner / ngroups). norm_before_gate=True: RMSNorm(y) * silu(z).
    y, z (..., dim) -> (..., dim) in y's dtype; the arithmetic in fp32."""

    def __init__(self, dim: int, group_size: int | None = None, eps: float = 1e-5, norm_before_gate: bool = False):
        super().__init__()
        group_size = group_size or dim
        if dim % group_size:
            raise ValueError(f"group_size: expected a divisor of dim = {dim}, got {group_size}")
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps, self.norm_before_gate = group_size, eps, norm_before_gate

    def forward(self, y: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        h = y.float()
        if z is not None and not self.norm_before_gate:
            h = h * F.silu(z.float())
        g = h.unflatten(-1, (-1, self.group_size))
        h = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2) * self.weight.float()
        if z is not None and self.norm_before_gate:
            h = h * F.silu(z.float())
        return h.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.eps}"


def causal_conv1d_packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         seq_idx: torch.Tensor) -> torch.Tensor:
    """Causal depthwise conv1d of packed sequences: x (b, d, L), weight (d, 1, W), seq_idx (b, L) -> (b, d, L).
    Tap k of output t reads x[t - k] only when it belongs to the same sequence as t (zero otherwise), so each
    sequence is convolved as if it started from zero padding."""
    W = weight.shape[-1]
    windows = F.pad(x, (W - 1, 0)).unfold(-1, W, 1)  # (b, d, L, W): window t holds x[t-W+1 .. t]
    s = F.pad(seq_idx.long(), (W - 1, 0), value=-1).unfold(-1, W, 1)  # (b, L, W)
    keep = (s == seq_idx.long()[..., None]).to(x.dtype)[:, None]
    y = (windows * keep * weight[:, 0].to(x.dtype)[None, :, None, :]).sum(-1)
    return y + bias.to(y.dtype)[:, None] if bias is not None else y


class Mamba2(nn.Module):
    """The Mamba-2 mixer. x (batch, L, d_model) -> (batch, L, d_model).

    d_inner = expand * d_model = nheads * headdim; B and C have ngroups groups of d_state; the conv runs over
    conv_dim = d_inner + 2 * ngroups * d_state channels. Published init: A = -U[A_init_range] per head (stored as
    A_log), dt = logU[dt_min, dt_max] stored as the softplus-inverse bias dt_bias, D = 1.

    bidirectional=True (for Vision Mamba / AuM, like Vim's "v2" Mamba-1 mixer): in_proj, the gated norm and
    out_proj are shared; a second conv1d_b, dt_bias_b, A_b_log, D_b run the SSD over the reversed sequence; the two
    SSD outputs are averaged before the gated norm. Not causal: no state, no step.
    """

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, A_init_range: tuple[float, float] = (1.0, 16.0), D_has_hdim: bool = False,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4,
                 dt_limit: tuple[float, float] = (0.0, INF), conv_bias: bool = True, bias: bool = False,
                 chunk_size: int = 256, norm_eps: float = 1e-5, norm_before_gate: bool = False,
                 bidirectional: bool = False, layer_idx: int | None = None):
        super().__init__()
        for name, v in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand),
                        ("headdim", headdim), ("ngroups", ngroups), ("chunk_size", chunk_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"headdim: expected a divisor of d_inner = expand * d_model = {d_inner}, got {headdim}")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"ngroups: expected a divisor of nheads = {nheads}, got {ngroups}")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range: expected 0 < lo <= hi, got {A_init_range}")
        self.d_model, self.d_state, self.d_conv, self.d_inner = d_model, d_state, d_conv, d_inner
        self.headdim, self.nheads, self.ngroups, self.chunk_size = headdim, nheads, ngroups, chunk_size
        self.dt_limit, self.layer_idx = tuple(dt_limit), layer_idx
        self.conv_dim = d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, d_inner + self.conv_dim + nheads, bias=bias)  # [z | x B C | dt]
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=conv_bias)
        self.dt_bias = nn.Parameter(dt_bias_init(nheads, dt_min, dt_max, dt_init_floor))
        self.A_log = nn.Parameter(torch.empty(nheads).uniform_(*A_init_range).log())
        self.D = nn.Parameter(torch.ones(d_inner if D_has_hdim else nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.bidirectional = bidirectional
        if bidirectional:  # the reversed direction's own conv and SSD parameters, initialized alike
            self.conv1d_b = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=conv_bias)
            self.dt_bias_b = nn.Parameter(dt_bias_init(nheads, dt_min, dt_max, dt_init_floor))
            self.A_b_log = nn.Parameter(torch.empty(nheads).uniform_(*A_init_range).log())
            self.D_b = nn.Parameter(torch.ones(d_inner if D_has_hdim else nheads))
            for p in (self.dt_bias_b, self.A_b_log, self.D_b):
                p._no_weight_decay = True
        self.norm = GatedRMSNorm(d_inner, d_inner // ngroups, eps=norm_eps, norm_before_gate=norm_before_gate)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def _D(self, D: torch.Tensor | None = None) -> torch.Tensor:
        """D (or the given D_b) as the SSD takes it: (nheads,) or (nheads, headdim)."""
        D = self.D if D is None else D
        return D if D.shape[0] == self.nheads else D.view(self.nheads, self.headdim)

    def _conv_ssd(self, xbc, dt, conv1d, dt_bias, A_log, D, seq_idx=None, state=None):
        """One direction: xbc (b, conv_dim, L), dt (b, L, h) -> SSD output (b, L, h, p) [, final state]."""
        w = conv1d.weight
        if state is not None:
            xc = F.conv1d(torch.cat([state.conv[..., 1:].to(xbc.dtype), xbc], -1), w, conv1d.bias,
                          groups=self.conv_dim)
        elif seq_idx is not None:
            xc = causal_conv1d_packed(xbc, w, conv1d.bias, seq_idx)
        else:
            xc = F.conv1d(F.pad(xbc, (self.d_conv - 1, 0)), w, conv1d.bias, groups=self.conv_dim)
        xs, B, C = F.silu(xc).transpose(1, 2).split([self.d_inner, self.ngroups * self.d_state,
                                                     self.ngroups * self.d_state], dim=-1)
        return ssd(xs.unflatten(-1, (self.nheads, self.headdim)), dt, -torch.exp(A_log.float()),
                   B.unflatten(-1, (self.ngroups, self.d_state)), C.unflatten(-1, (self.ngroups, self.d_state)),
                   chunk_size=self.chunk_size, D=self._D(D), dt_bias=dt_bias, dt_softplus=True,
                   dt_limit=self.dt_limit, initial_states=None if state is None else state.ssm, seq_idx=seq_idx,
                   return_final_states=state is not None)

    def forward(self, x: torch.Tensor, state: MambaState | None = None, seq_idx: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x (batch, L, d_model) -> (batch, L, d_model). With ``state`` (from allocate_state) the sequence
        continues from it and the state is advanced past x (chunked prefill). seq_idx (batch, L) int: packed
        sequences, neither the conv nor the SSD carries anything across a boundary (not with ``state``)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected (batch, L, d_model={self.d_model}), got {tuple(x.shape)}")
        if state is not None and seq_idx is not None:
            raise ValueError("seq_idx: expected None when continuing from a state (one sequence per row)")
        if state is not None and self.bidirectional:
            raise ValueError("a bidirectional mixer is not causal: it has no recurrent state")
        b, L, _ = x.shape
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xbc = xbc.transpose(1, 2)  # (b, conv_dim, L)
        out = self._conv_ssd(xbc, dt, self.conv1d, self.dt_bias, self.A_log, None, seq_idx, state)
        if state is not None:
            out, last = out
            state.conv.copy_(torch.cat([state.conv.to(xbc.dtype), xbc], dim=-1)[..., -self.d_conv:])
            state.ssm.copy_(last)
        if self.bidirectional:  # the reversed sequence through the second direction, flipped back, averaged
            rev = self._conv_ssd(xbc.flip(-1), dt.flip(1), self.conv1d_b, self.dt_bias_b, self.A_b_log, self.D_b,
                                 None if seq_idx is None else seq_idx.flip(1))
            out = (out + rev.flip(1)) * 0.5
        y = self.norm(out.reshape(b, L, self.d_inner), z)
        return self.out_proj(y)

    # -- decoding --------------------------------------------------------------------------------
    def allocate_state(self, batch: int, device=None, dtype=None) -> MambaState:
        """Zero state for ``step``: conv (batch, conv_dim, d_conv) in ``dtype``, ssm (batch, nheads, headdim,
        d_state) fp32. Its size does not depend on the sequence length."""
        if self.bidirectional:
            raise ValueError("a bidirectional mixer is not causal: it cannot decode step by step")
        w = self.in_proj.weight
        device, dtype = device or w.device, dtype or w.dtype
        return MambaState(torch.zeros(batch, self.conv_dim, self.d_conv, device=device, dtype=dtype),
                          torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device,
                                      dtype=torch.float32))

    def step(self, x: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One token: x (batch, d_model) -> (batch, d_model); advances ``state`` in place (constant memory)."""
        if self.bidirectional:
            raise ValueError("a bidirectional mixer is not causal: it cannot decode step by step")
        if x.dim() != 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected (batch, d_model={self.d_model}), got {tuple(x.shape)}")
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        # fused (CUDA, inference): one kernel for shift + append + depthwise conv + bias + SiLU
        xc = conv_step(state.conv, xbc, self.conv1d.weight, self.conv1d.bias, fused=fused_step(state.ssm))
        xs, B, C = xc.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        b = x.shape[0]
        y = ssd_step(state.ssm, xs.reshape(b, self.nheads, self.headdim), dt, -torch.exp(self.A_log.float()),
                         B.reshape(b, self.ngroups, self.d_state), C.reshape(b, self.ngroups, self.d_state),
                         D=self._D(), dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit)
        return self.out_proj(self.norm(y.reshape(b, self.d_inner), z))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, nheads={self.nheads}, headdim={self.headdim}, "
                f"ngroups={self.ngroups}, chunk_size={self.chunk_size}")

