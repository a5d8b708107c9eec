"""The Mamba-3 mixer: in_proj -> (z, x, B, C, dt, A, trap, angles) -> RMSNorm'd B / C -> Mamba-3 scan
(core/mamba3_scan.py: exponential-trapezoidal rule, data-dependent rotary state, MIMO rank R) -> SiLU(z) gate
(or a gated RMSNorm per head) -> out_proj, with a one-token decode step whose state carries the SSM state,
the last rotated key, the last x and the accumulated rotation angle.

Shapes (d_inner = expand * d_model, H = d_inner / headdim heads of P = headdim, N = d_state, G = ngroups,
R = mimo_rank (1 unless is_mimo), S = num_rope_angles = floor(N * rope_fraction / 2)):
    in_proj: d_model -> 2 d_inner + 2 R G N + 3 H + S, split in this order:
        z (d_inner), x (d_inner), B (R G N), C (R G N), dd_dt (H), dd_A (H), trap (H), angles (S)
    dt = softplus(dd_dt + dt_bias)                                                        (b, L, H)
    A = -max(act(dd_A), A_floor), act = softplus (the published module) or the heavy tail
        (1 + a for a >= 0, 1 / (1 - a) below); adt = A * dt                              (b, L, H)
    trap = sigmoid(trap);  B, C = RMSNorm_N(B), RMSNorm_N(C)  (b, L, R, G, N); angles shared by the heads
    y_r = scan(...)                                                                       (b, L, R, H, P)
    SISO: y = y_1 * silu(z), or norm(y_1, z) = RMSNorm_P(y_1) * w * silu(z) with is_outproj_norm
    MIMO: z_r = z * mimo_z_r; y = sum_r mimo_o_r * (y_r * silu(z_r)) (or the norm with z_r)
    out = out_proj(y)                                                                     (b, L, d_model)

Parameter names and shapes are those of mamba-ssm's ``Mamba3`` (modules/mamba3.py, read at commit 0348a3d), so
its state dicts load as they are: in_proj.weight, dt_bias (H,), B_bias / C_bias (H, R, N), B_norm.weight /
C_norm.weight (N,), D (H,), [mimo_x, mimo_z, mimo_o (H, R, P)], [norm.weight (d_inner,)], out_proj.weight.

bidirectional=True (Vision Mamba / AuM, like core.mamba2.Mamba2's): the scan's own parameters are per direction,
the rest is shared. The reversed direction has dt_bias_b, B_bias_b, C_bias_b, D_b [and mimo_x_b], initialized as
their forward twins; in_proj, the B / C RMSNorms, the output gate (mimo_z, mimo_o, norm) and out_proj are shared.
The projected sequence (x, B, C, dd_dt, dd_A, trap, angles) is flipped along L, scanned with the _b parameters,
flipped back and averaged with the forward scan before the gate; not causal: no state, no step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mambazoo.core.mamba3_scan import mamba3_scan, mamba3_step
from mambazoo.core.norm import RMSNorm

A_ACTIVATIONS = ("softplus", "heavy_tail")


def heavy_tail(a: torch.Tensor) -> torch.Tensor:
    """1 + a for a >= 0, 1 / (1 - a) below: positive, continuous with slope 1 at 0, decaying as 1 / |a|."""
    return torch.where(a >= 0, 1 + a, 1 / (1 - a.clamp(max=0)))


def mamba3_decay(dd_A: torch.Tensor, dt: torch.Tensor, A_floor: float, activation: str = "softplus") -> torch.Tensor:
    """adt = A * dt with A = -max(act(dd_A), A_floor), in fp32 (or wider). dd_A, dt (..., H) -> (..., H)."""
    a = dd_A.to(torch.promote_types(dd_A.dtype, torch.float32))
    rate = F.softplus(a) if activation == "softplus" else heavy_tail(a)
    return -rate.clamp(min=A_floor) * dt


@dataclass
class Mamba3State:
    """Decode state of one Mamba-3 mixer.

    angle (batch, H, S) fp32, the accumulated rotation (mod 2 pi); ssm (batch, H, P, N) fp32;
    k (batch, R, H, N) the last rotated key (B + bias); v (batch, H, P) the last x (model dtype)."""

    angle: torch.Tensor
    ssm: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.angle, self.ssm, self.k, self.v

    def update(self, states) -> None:
        """Copy new (angle, ssm, k, v) into the state's tensors (in place: decoding keeps its buffers)."""
        for dst, src in zip(self.tensors(), states):
            dst.copy_(src.detach())

    def reset(self) -> None:
        for t in self.tensors():
            t.zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class GatedRMSNorm(nn.Module):
    """RMSNorm per group of ``group_size`` channels, then the SiLU(z) gate: (norm(y) * weight) * silu(z).
    y, z (..., dim) -> (..., dim) fp32. The published module's output norm (norm_before_gate=True)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        if dim % group_size:
            raise ValueError(f"group_size: expected a divisor of dim={dim}, got {group_size}")
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        shape = y.shape
        g = y.float().reshape(*shape[:-1], -1, self.group_size)
        g = g * torch.rsqrt(g.square().mean(-1, keepdim=True) + self.eps)
        return g.reshape(shape) * self.weight.float() * F.silu(z.float())

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.eps}"


class Mamba3(nn.Module):
    """The Mamba-3 mixer (module docstring). Defaults are the published ones.

    forward(x (batch, L, d_model), state=None, seq_idx=None, cu_seqlens=None) -> (batch, L, d_model);
    step(x (batch, d_model), state) -> (batch, d_model); allocate_state(batch) -> Mamba3State.
    bidirectional=True: both scan directions averaged (module docstring); forward without state, no step."""

    def __init__(self, d_model: int, d_state: int = 128, expand: int = 2, headdim: int = 64, ngroups: int = 1,
                 rope_fraction: float = 0.5, dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4,
                 A_floor: float = 1e-4, is_outproj_norm: bool = False, is_mimo: bool = False, mimo_rank: int = 4,
                 chunk_size: int = 64, a_activation: str = "softplus", bidirectional: bool = False,
                 layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        d_inner = int(expand * d_model)
        if d_inner % headdim:
            raise ValueError(f"headdim: expected a divisor of d_inner = expand * d_model = {d_inner}, got {headdim}")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"ngroups: expected a divisor of nheads={nheads}, got {ngroups}")
        if rope_fraction not in (0.5, 1.0):
            raise ValueError(f"rope_fraction: expected 0.5 or 1.0, got {rope_fraction}")
        if a_activation not in A_ACTIVATIONS:
            raise ValueError(f"a_activation: expected one of {A_ACTIVATIONS}, got {a_activation!r}")
        if d_state % 2:
            raise ValueError(f"d_state: expected an even size (rotation pairs), got {d_state}")
        rotary = int(d_state * rope_fraction)
        rotary -= rotary % 2
        if rotary < 2:
            raise ValueError(f"d_state * rope_fraction: expected at least 2 rotated dims, "
                             f"got {d_state} * {rope_fraction}")
        R = mimo_rank if is_mimo else 1
        if R < 1:
            raise ValueError(f"mimo_rank: expected >= 1, got {mimo_rank}")
        self.d_model, self.d_state, self.expand, self.headdim, self.ngroups = d_model, d_state, expand, headdim, ngroups
        self.d_inner, self.nheads, self.mimo_rank, self.is_mimo = d_inner, nheads, R, is_mimo
        self.rope_fraction, self.num_rope_angles = rope_fraction, rotary // 2
        self.A_floor, self.a_activation, self.chunk_size = A_floor, a_activation, chunk_size
        self.is_outproj_norm, self.layer_idx = is_outproj_norm, layer_idx
        # the published kernels pair state dims (2i, 2i+1) for SISO and (i, i + N/2) for MIMO
        self.pairwise = not is_mimo
        fk = dict(device=device, dtype=dtype)
        d_bc = d_state * ngroups * R
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * d_bc + 3 * nheads + self.num_rope_angles, bias=False, **fk)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.bidirectional = bidirectional
        self.dt_bias = nn.Parameter(torch.empty(nheads, device=device))  # softplus(dt_bias) = dt ~ logU[dt_min, dt_max]
        self.B_bias = nn.Parameter(torch.empty(nheads, R, d_state, device=device))
        self.C_bias = nn.Parameter(torch.empty(nheads, R, d_state, device=device))
        self.B_norm = RMSNorm(d_state, eps=1e-5).to(device=device)
        self.C_norm = RMSNorm(d_state, eps=1e-5).to(device=device)
        if is_mimo:
            self.mimo_x = nn.Parameter(torch.empty(nheads, R, headdim, device=device))
            self.mimo_z = nn.Parameter(torch.empty(nheads, R, headdim, device=device))
            self.mimo_o = nn.Parameter(torch.empty(nheads, R, headdim, device=device))
        self.D = nn.Parameter(torch.empty(nheads, device=device))
        if bidirectional:  # the reversed direction's scan parameters (class docstring); registered after D, so the
            # unidirectional mixer's state-dict keys and order stay mamba-ssm's
            self.dt_bias_b = nn.Parameter(torch.empty(nheads, device=device))
            self.B_bias_b = nn.Parameter(torch.empty(nheads, R, d_state, device=device))
            self.C_bias_b = nn.Parameter(torch.empty(nheads, R, d_state, device=device))
            self.D_b = nn.Parameter(torch.empty(nheads, device=device))
            if is_mimo:
                self.mimo_x_b = nn.Parameter(torch.empty(nheads, R, headdim, device=device))
        if is_outproj_norm:
            self.norm = GatedRMSNorm(d_inner, group_size=headdim, eps=1e-5).to(device=device)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False, **fk)
        self.reset_parameters()

    def _directions(self) -> list[str]:
        return ["", "_b"] if self.bidirectional else [""]

    def reset_parameters(self) -> None:
        """The published init of the mixer's own parameters (in_proj, out_proj and the norms keep their modules'
        reset_parameters): dt_bias = softplus^-1 of dt ~ logU[dt_min, dt_max] floored at dt_init_floor, B / C
        biases 1, D 1, mimo_x and mimo_o 1 / R, mimo_z 1; each direction's alike (independent dt draws). Also what
        a model built on the meta device runs after to_empty() (mambazoo.core.init.reset_parameters)."""
        R = self.mimo_rank
        with torch.no_grad():
            for sfx in self._directions():
                dt_bias, D = getattr(self, "dt_bias" + sfx), getattr(self, "D" + sfx)
                lo, hi = math.log(self.dt_min), math.log(self.dt_max)
                dt = torch.exp(torch.rand(self.nheads, device=dt_bias.device) * (hi - lo) + lo)
                dt = dt.clamp(min=self.dt_init_floor)
                dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
                getattr(self, "B_bias" + sfx).fill_(1.0)
                getattr(self, "C_bias" + sfx).fill_(1.0)
                D.fill_(1.0)
                # marks on the parameter objects (to_empty() makes new ones): out of weight decay
                dt_bias._no_weight_decay = D._no_weight_decay = True
                if self.is_mimo:
                    getattr(self, "mimo_x" + sfx).fill_(1.0 / R)
            if self.is_mimo:
                self.mimo_z.fill_(1.0)
                self.mimo_o.fill_(1.0 / R)

    # -- shared pieces --------------------------------------------------------------------------
    def _split(self, proj: torch.Tensor):
        H, R, G, N = self.nheads, self.mimo_rank, self.ngroups, self.d_state
        d_bc = R * G * N
        z, x, B, C, dd_dt, dd_A, trap, ang = torch.split(
            proj, [self.d_inner, self.d_inner, d_bc, d_bc, H, H, H, self.num_rope_angles], dim=-1)
        lead = proj.shape[:-1]
        z = z.reshape(*lead, H, self.headdim)
        x = x.reshape(*lead, H, self.headdim)
        B = self.B_norm(B.reshape(*lead, R, G, N))
        C = self.C_norm(C.reshape(*lead, R, G, N))
        trap = torch.sigmoid(trap.float())
        angles = ang.float().unsqueeze(-2).expand(*lead, H, self.num_rope_angles)
        return z, x, B, C, dd_dt, dd_A, trap, angles

    def _decay(self, dd_dt: torch.Tensor, dd_A: torch.Tensor, dt_bias: torch.Tensor):
        """dd_dt, dd_A (..., H) and one direction's dt_bias (H,) -> dt = softplus(dd_dt + dt_bias), adt (..., H)
        fp32."""
        dt = F.softplus(dd_dt.float() + dt_bias.float())
        return dt, mamba3_decay(dd_A, dt, self.A_floor, self.a_activation)

    def _mimo_x(self, sfx: str = ""):
        return getattr(self, "mimo_x" + sfx) if self.is_mimo else None

    def _scan(self, sfx: str, xs, dd_dt, dd_A, trap, B, C, angles, **kw):
        """One direction's scan ('' forward, '_b' the reversed direction's parameters) of the split projection
        (b, L, ...) -> y (b, L, R, H, P) [, final states] (mamba3_scan's keywords in kw)."""
        dt, adt = self._decay(dd_dt, dd_A, getattr(self, "dt_bias" + sfx))
        return mamba3_scan(xs, dt, adt, trap, B, C, angles, getattr(self, "B_bias" + sfx),
                           getattr(self, "C_bias" + sfx), getattr(self, "D" + sfx), self._mimo_x(sfx),
                           pairwise=self.pairwise, chunk_size=self.chunk_size, **kw)

    def _output(self, y: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """y (..., R, H, P), z (..., H, P) -> out_proj of the gated (and contracted) output: (..., d_model)."""
        lead = z.shape[:-2]
        if self.is_mimo:
            zr = z.float().unsqueeze(-3) * self.mimo_z.float().transpose(0, 1)  # (..., R, H, P)
        else:
            zr = z.float().unsqueeze(-3)
        if self.is_outproj_norm:
            g = self.norm(y.float().flatten(-2), zr.flatten(-2)).unflatten(-1, (self.nheads, self.headdim))
        else:
            g = y.float() * F.silu(zr)
        if self.is_mimo:
            g = (g * self.mimo_o.float().transpose(0, 1)).sum(-3)
        else:
            g = g.squeeze(-3)
        return self.out_proj(g.reshape(*lead, self.d_inner).to(dtype))

    # -- full sequences -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: Mamba3State | None = None, seq_idx: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """x (batch, L, d_model) -> (batch, L, d_model). With ``state`` (from allocate_state, or after earlier
        calls) the sequence continues from it and the state advances in place (prefill). seq_idx (batch, L):
        packed sequences, restarting where it changes; cu_seqlens (nseq + 1,) with batch 1, then ``state``
        holds nseq rows."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected (batch, L, d_model={self.d_model}), got {tuple(x.shape)}")
        if self.bidirectional and state is not None:
            raise ValueError("state: expected None, a bidirectional mixer is not causal: it has no recurrent state")
        z, xs, B, C, dd_dt, dd_A, trap, angles = self._split(self.in_proj(x))
        init = None if state is None else state.tensors()
        out = self._scan("", xs, dd_dt, dd_A, trap, B, C, angles, initial_states=init, seq_idx=seq_idx,
                         cu_seqlens=cu_seqlens, return_final_states=state is not None)
        if state is not None:
            out, final = out
            state.update(final)
        if self.bidirectional:  # the reversed sequence through the _b parameters, flipped back, averaged
            L = x.shape[1]
            rev = self._scan("_b", *(t.flip(1) for t in (xs, dd_dt, dd_A, trap, B, C, angles)),
                             seq_idx=None if seq_idx is None else seq_idx.flip(1),
                             cu_seqlens=None if cu_seqlens is None else L - cu_seqlens.flip(0))
            out = (out + rev.flip(1)) * 0.5
        return self._output(out, z, x.dtype)

    # -- decoding -------------------------------------------------------------------------------
    def allocate_state(self, batch: int, device=None, dtype=None) -> Mamba3State:
        """Zero state for ``step``: angle (batch, H, S) and ssm (batch, H, P, N) fp32, k (batch, R, H, N) and
        v (batch, H, P) in ``dtype`` (default: the weights')."""
        if self.bidirectional:
            raise ValueError("allocate_state: a bidirectional mixer is not causal: it cannot decode step by step")
        w = self.in_proj.weight
        device = device or w.device
        dtype = dtype or w.dtype
        H, P, N, R = self.nheads, self.headdim, self.d_state, self.mimo_rank
        f32 = dict(device=device, dtype=torch.float32)
        return Mamba3State(torch.zeros(batch, H, self.num_rope_angles, **f32), torch.zeros(batch, H, P, N, **f32),
                           torch.zeros(batch, R, H, N, device=device, dtype=dtype),
                           torch.zeros(batch, H, P, device=device, dtype=dtype))

    def step(self, x: torch.Tensor, state: Mamba3State) -> torch.Tensor:
        """One token: x (batch, d_model) -> (batch, d_model); advances ``state`` in place."""
        if self.bidirectional:
            raise ValueError("step: a bidirectional mixer is not causal: it cannot decode step by step")
        if x.dim() != 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected (batch, d_model={self.d_model}), got {tuple(x.shape)}")
        b = x.shape[0]
        if state.ssm.shape != (b, self.nheads, self.headdim, self.d_state):
            raise ValueError(f"state.ssm: expected ({b}, {self.nheads}, {self.headdim}, {self.d_state}), "
                             f"got {tuple(state.ssm.shape)}")
        z, xs, B, C, dd_dt, dd_A, trap, angles = self._split(self.in_proj(x))
        dt, adt = self._decay(dd_dt, dd_A, self.dt_bias)
        y = mamba3_step(xs, dt, adt, trap, B, C, angles, self.B_bias, self.C_bias, self.D, self._mimo_x(),
                        state.tensors(), self.pairwise)  # advances the state in place
        return self._output(y, z, x.dtype)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, nheads={self.nheads}, headdim={self.headdim}, "
                f"ngroups={self.ngroups}, mimo_rank={self.mimo_rank}, rope_fraction={self.rope_fraction}, "
                f"a_activation={self.a_activation!r}, outproj_norm={self.is_outproj_norm}, "
                f"bidirectional={self.bidirectional}")


def mamba3_config_from_state_dict(sd: dict, prefix: str = "") -> dict:
    """The Mamba3 constructor arguments that a state dict with mamba-ssm's ``Mamba3`` key names implies:
    d_model, d_state, expand, headdim, ngroups, rope_fraction, is_mimo, mimo_rank, is_outproj_norm.
    Raises ValueError when a key is missing or the shapes fit no configuration."""
    need = ("in_proj.weight", "out_proj.weight", "B_bias", "dt_bias")
    missing = [prefix + k for k in need if prefix + k not in sd]
    if missing:
        raise ValueError(f"state dict: expected the keys {missing} of a mamba-ssm Mamba3 module, got none of them")
    d_model, d_inner = sd[prefix + "out_proj.weight"].shape
    H, R, N = sd[prefix + "B_bias"].shape
    if d_inner % H:
        raise ValueError(f"out_proj.weight: expected d_inner divisible by nheads={H}, got {d_inner}")
    is_mimo = prefix + "mimo_x" in sd
    rest = sd[prefix + "in_proj.weight"].shape[0] - 2 * d_inner - 3 * H
    for rope_fraction in (0.5, 1.0):
        rotary = int(N * rope_fraction)
        S = (rotary - rotary % 2) // 2
        if S > 0 and rest > S and (rest - S) % (2 * N * R) == 0:
            expand = d_inner / d_model if d_inner % d_model else d_inner // d_model
            return dict(d_model=d_model, d_state=N, expand=expand,
                        headdim=d_inner // H, ngroups=(rest - S) // (2 * N * R), rope_fraction=rope_fraction,
                        is_mimo=is_mimo, mimo_rank=R if is_mimo else 4,
                        is_outproj_norm=prefix + "norm.weight" in sd)
    raise ValueError(f"in_proj.weight: expected 2 d_inner + 2 N G R + 3 H + S rows with d_inner={d_inner}, N={N}, "
                     f"R={R}, H={H}, got {sd[prefix + 'in_proj.weight'].shape[0]}")


def mamba3_from_state_dict(sd: dict, prefix: str = "", **kwargs) -> Mamba3:
    """A Mamba3 mixer built from, and loaded strictly with, a state dict in mamba-ssm's ``Mamba3`` key names
    (``prefix`` selects one layer's keys, e.g. 'backbone.layers.0.mixer.'). kwargs override the inferred
    configuration (chunk_size, a_activation, dtype, ...)."""
    cfg = {**mamba3_config_from_state_dict(sd, prefix), **kwargs}
    mixer = Mamba3(**cfg)
    own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    mixer.load_state_dict(own, strict=True)
    return mixer
