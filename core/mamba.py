"""The Mamba (S6) mixer, as in the paper (Gu & Dao 2023, Algorithm 2):

    x (batch, L, d_model) --in_proj--> xs, z (batch, d_inner, L)
    xs --causal depthwise conv1d--> SiLU --x_proj--> dt (R), B, C (N) per step --dt_proj--> delta (d_inner)
    y = selective_scan(xs, delta, A = -exp(A_log), B, C, D, gate SiLU(z)) --out_proj--> (batch, L, d_model)

with a one-token decode step (``step``), a bidirectional "v2" mode (Vision Mamba: a second set of conv / x_proj /
dt_proj / A / D scans the reversed sequence, the two outputs averaged) and an LTI mode (a non-selective S4D-style
SSM in place of S6). Which implementation runs each op is mambazoo.core.dispatch's choice; the inference-only fast
paths of the bidirectional mixer are in mambazoo.core.mamba_infer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mambazoo.core import dispatch, mamba_infer
from mambazoo.core.cache import MambaState
from mambazoo.core.norm import RMSNorm

def dt_bias_init(d_inner: int, dt_min: float = 1e-3, dt_max: float = 1e-1, floor: float = 1e-4) -> torch.Tensor:
    """Mamba's dt initialization: dt log-uniform in [dt_min, dt_max], returned as the bias b with
    softplus(b) = dt, i.e. b = dt + log(-expm1(-dt)). Shape (d_inner,)."""
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"dt_min, dt_max: expected 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


def s4d_real_a_log(d_inner: int, d_state: int) -> torch.Tensor:
    """S4D-Real init used by Mamba: A[d, n] = -(n + 1); returns A_log = log(-A), shape (d_inner, d_state)."""
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)


class _Direction(nn.Module):
    """The per-direction parameters of a mixer: conv1d, x_proj, dt_proj, A_log, D (and inner norms)."""

    def __init__(self, d_inner, d_state, d_conv, dt_rank, conv_bias, dt_min, dt_max, dt_scale,
                 dt_init_floor, inner_norm, selective, a_init, norm_eps):
        super().__init__()
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=conv_bias)
        self.selective = selective
        self.dt_scale, self.dt_min, self.dt_max, self.dt_init_floor, self.a_init = (
            dt_scale, dt_min, dt_max, dt_init_floor, a_init)
        if selective:
            self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)  # -> dt (R), B (N), C (N)
            self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)  # dt (R) -> delta (d_inner)
            self.A_log = nn.Parameter(torch.empty(d_inner, d_state))  # A = -exp(A_log) (d_inner, N)
            self.D = nn.Parameter(torch.empty(d_inner))  # the skip connection y += D x
            if inner_norm:
                self.dt_norm = RMSNorm(dt_rank, eps=norm_eps)
                self.B_norm = RMSNorm(d_state, eps=norm_eps)
                self.C_norm = RMSNorm(d_state, eps=norm_eps)
        else:
            from mambazoo.core.ssm import LTISSM

            self.lti = LTISSM(d_inner, d_state, init=a_init, dt_min=dt_min, dt_max=dt_max)
        self.inner_norm = inner_norm and selective
        self.dt_rank, self.d_state = dt_rank, d_state
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Mamba's initialization of the selective parameters (the conv and x_proj keep nn's own, set by their
        modules' reset_parameters): dt_proj's weight uniform in +-dt_scale / sqrt(R), its bias softplus^-1 of a
        log-uniform dt (dt_bias_init), A_log S4D-Real (or a_init's), D = 1. Also what a model built on the meta
        device runs after to_empty()."""
        if not self.selective:
            return
        d_inner, d_state = self.A_log.shape
        # marks on the parameter objects (to_empty() makes new ones): out of weight decay; models must not zero
        # this bias in their own init
        self.A_log._no_weight_decay = self.D._no_weight_decay = True
        self.dt_proj.bias._no_reinit = True
        std = self.dt_rank ** -0.5 * self.dt_scale
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            self.dt_proj.bias.copy_(dt_bias_init(d_inner, self.dt_min, self.dt_max, self.dt_init_floor))
            self.A_log.copy_(s4d_real_a_log(d_inner, d_state) if self.a_init == "s4d-real"
                             else _a_log_from_ssm(d_inner, d_state, self.a_init))
            self.D.fill_(1.0)

    def ssm_inputs(self, x: torch.Tensor, fold: bool = False):
        """x (batch, L, d_inner) after conv and SiLU -> delta (batch, L, d_inner), B, C (batch, L, N).
        fold=True (the full-sequence path) lets inference take mamba_infer.folded_ssm_inputs (one GEMM)."""
        if fold:
            folded = mamba_infer.folded_ssm_inputs(self, x)
            if folded is not None:
                return folded
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.inner_norm:
            dt, B, C = self.dt_norm(dt), self.B_norm(B), self.C_norm(C)
        delta = F.linear(dt, self.dt_proj.weight)  # the bias is added in fp32 inside the scan
        return delta, B, C

    def low_rank_weights(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mamba_infer.low_rank_weights of this direction."""
        return mamba_infer.low_rank_weights(self, dtype)

    def scan_constants(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A = -exp(A_log), D, dt bias) in fp32 as the scan takes them: (d_inner, N), (d_inner,), (d_inner,). Cached
        without autograd (small kernels per direction and layer otherwise)."""
        def build(a_log, d, bias):
            return -torch.exp(a_log.float()), d.float(), bias.float()

        return mamba_infer.cached(self, "_constants", build, (self.A_log, self.D, self.dt_proj.bias))

    def scan(self, x: torch.Tensor, z: torch.Tensor, initial_state=None, return_last_state=False,
             reverse: bool = False, average_with: torch.Tensor | None = None, out: torch.Tensor | None = None):
        """x, z (batch, d_inner, L) -> y (batch, d_inner, L) [, final state (batch, d_inner, N)].
        reverse=True scans from the last position to the first (no flipped copies on the selective path).
        average_with (batch, d_inner, L): y is returned as (average_with + y) / 2 (fused into the scan on CUDA),
        written over average_with where no gradient is recorded (the mixer's own buffer); out: where no gradient
        is recorded, y is stored in that (batch, d_inner, L) buffer (selective path)."""
        if not self.selective:
            if reverse:
                y = self._lti_scan(x.flip(-1), z.flip(-1), initial_state, return_last_state)
                y = (y[0].flip(-1), y[1]) if return_last_state else y.flip(-1)
            else:
                y = self._lti_scan(x, z, initial_state, return_last_state)
            if average_with is None:
                return y
            if return_last_state:
                return torch.lerp(average_with, y[0], 0.5), y[1]
            return torch.lerp(average_with, y, 0.5)
        delta, B, C = self.ssm_inputs(x.transpose(1, 2), fold=True)  # (batch, L, d_inner), (batch, L, N) x 2
        A, D, bias = self.scan_constants()
        return dispatch.selective_scan(
            x, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D, z=z,
            delta_bias=bias, delta_softplus=True,
            return_last_state=return_last_state, initial_state=initial_state, reverse=reverse,
            average_with=average_with, average_in_place=True, out=out,
        )

    def _lti_scan(self, x, z, initial_state, return_last_state):
        """The LTI path: convolution view from a zero state, the recurrent view from a given state."""
        if initial_state is None:
            y = self.lti(x.float(), mode="conv")
            h = None
            if return_last_state:
                h = x.new_zeros(x.shape[0], x.shape[1], self.d_state, dtype=torch.float32)
                for t in range(x.shape[-1]):
                    self.lti.step(x[..., t].float(), h)
        else:
            h = initial_state.clone()
            y = torch.stack([self.lti.step(x[..., t].float(), h) for t in range(x.shape[-1])], dim=-1)
        y = (y * F.silu(z.float())).to(x.dtype)
        return (y, h) if return_last_state else y


def _a_log_from_ssm(d_inner, d_state, a_init):
    from mambazoo.core.ssm import a_log_init

    return a_log_init(d_inner, d_state, a_init)


class Mamba(nn.Module):
    """The Mamba (S6) mixer. x (batch, L, d_model) -> (batch, L, d_model).

    bidirectional=True is Vision Mamba's "v2" mixer: in_proj and out_proj shared, a second set of
    conv1d / x_proj / dt_proj / A / D scans the reversed sequence; the two outputs are averaged.
    selective=False replaces S6 by a time-invariant diagonal SSM (the S4-vs-S6 comparison).
    inner_norm=True applies RMSNorm to dt, B and C (Jamba).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 bias: bool = False, bidirectional: bool = False, selective: bool = True,
                 inner_norm: bool = False, a_init: str = "s4d-real", norm_eps: float = 1e-5,
                 layer_idx: int | None = None):
        super().__init__()
        for name, v in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.bidirectional, self.selective, self.layer_idx = bidirectional, selective, layer_idx
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        args = (self.d_inner, d_state, d_conv, self.dt_rank, conv_bias, dt_min, dt_max, dt_scale,
                dt_init_floor, inner_norm, selective, a_init, norm_eps)
        self.fwd = _Direction(*args)
        self.bwd = _Direction(*args) if bidirectional else None
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    # -- full sequence ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: MambaState | None = None) -> torch.Tensor:
        """x (batch, L, d_model) -> (batch, L, d_model). With ``state`` (causal mixers only), the
        sequence continues from it and the state is advanced past x (chunked prefill)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected (batch, L, d_model={self.d_model}), got {tuple(x.shape)}")
        if state is not None and self.bidirectional:
            raise ValueError("a bidirectional mixer is not causal: it has no recurrent state")
        if self.bidirectional:  # inference on the fused kernels (None where they do not apply)
            y = mamba_infer.bidirectional_forward(self, x)
            if y is not None:
                return y
        xz = self.in_proj(x).transpose(1, 2)  # (batch, 2 * d_inner, L)
        xs, z = xz.chunk(2, dim=1)  # (batch, d_inner, L) each
        y = self._branch(self.fwd, xs, z, state)
        if self.bidirectional:  # (y + yb) / 2, averaged as the backward direction's scan stores yb
            y = self._branch(self.bwd, xs, z, None, reverse=True, average_with=y)
        return self.out_proj(y.transpose(1, 2))  # (batch, L, d_model)

    def _branch(self, direction: _Direction, x, z, state: MambaState | None, reverse: bool = False,
                average_with: torch.Tensor | None = None):
        """x, z (batch, d_inner, L) -> y (batch, d_inner, L), or (average_with + y) / 2; fills ``state`` if given.

        reverse=True runs the branch on the reversed sequence without flipping anything: the causal
        conv of the reversed sequence is the anti-causal conv (padding on the right, taps reversed) of
        this one, and the scan walks L backwards."""
        conv = direction.conv1d
        if state is None:
            xc = dispatch.causal_conv1d(x, conv.weight, conv.bias, reverse=reverse)  # SiLU(conv(x))
            return direction.scan(xc, z, reverse=reverse, average_with=average_with)
        # chunked prefill: the conv continues from the state's last d_conv - 1 inputs
        L = x.shape[-1]
        xc = torch.cat([state.conv[..., 1:].to(x.dtype), x], dim=-1)
        new_conv = torch.cat([state.conv.to(x.dtype), x], dim=-1)[..., -self.d_conv:]
        xc = F.silu(F.conv1d(xc, conv.weight, conv.bias, groups=self.d_inner))[..., :L]
        y, last = direction.scan(xc, z, initial_state=state.ssm, return_last_state=True, average_with=average_with)
        state.conv.copy_(new_conv)
        state.ssm.copy_(last)
        return y

    # -- decoding --------------------------------------------------------------------------------
    def allocate_state(self, batch: int, device=None, dtype=None) -> MambaState:
        """Zero state for ``step``: conv (batch, d_inner, d_conv) in ``dtype``, ssm (batch, d_inner, N) fp32."""
        if self.bidirectional:
            raise ValueError("a bidirectional mixer is not causal: it cannot decode step by step")
        w = self.in_proj.weight
        device = device or w.device
        dtype = dtype or w.dtype
        return MambaState(torch.zeros(batch, self.d_inner, self.d_conv, device=device, dtype=dtype),
                          torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=torch.float32))

    def step(self, x: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One token: x (batch, d_model) -> (batch, d_model); advances ``state`` in place (constant memory)."""
        if self.bidirectional:
            raise ValueError("a bidirectional mixer is not causal: it cannot decode step by step")
        if x.dim() != 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected (batch, d_model={self.d_model}), got {tuple(x.shape)}")
        d = self.fwd
        fused = dispatch.fused_step(state.ssm)
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (batch, d_inner) each, row-strided views
        xc = dispatch.conv_step(state.conv, xs, d.conv1d.weight, d.conv1d.bias, fused)  # SiLU(conv) (batch, d_inner)
        if not self.selective:
            y = d.lti.step(xc.float(), state.ssm) * F.silu(z.float())
            return self.out_proj(y.to(xs.dtype))
        delta, B, C = d.ssm_inputs(xc)  # (batch, d_inner), (batch, N), (batch, N)
        y = dispatch.ssm_step(state.ssm, xc, delta, d.A_log, B, C, d.D, z, d.dt_proj.bias, fused)
        return self.out_proj(y)
