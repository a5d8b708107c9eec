"""The Mamba mixer: in_proj -> causal depthwise conv1d -> SiLU -> x_proj -> (dt, B, C) -> selective scan
-> SiLU(z) gate -> out_proj, with a one-token decode step, a bidirectional "v2" mode (Vision Mamba)
and an LTI mode (the same block with a non-selective S4D-style SSM in place of S6)."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from mambazoo.core.cache import MambaState
from mambazoo.core.decode import conv_step_ref, fused_decode_enabled
from mambazoo.core.norm import RMSNorm
from mambazoo.core.scan import scan_backend, selective_scan, selective_scan_bidirectional, selective_state_update_ref


def conv_backend(device: torch.device) -> str:
    """The mixer's conv1d: mambazoo.kernels.conv1d ('triton') on CUDA unless MAMBAZOO_CONV=torch; PyTorch's on the CPU
    unless MAMBAZOO_CONV=triton asks for the interpreter (see mambazoo.kernels.conv1d.conv_backend)."""
    want = os.environ.get("MAMBAZOO_CONV", "").strip().lower()
    if want == "torch" or (device.type != "cuda" and want != "triton"):
        return "torch"
    from mambazoo.kernels.conv1d import conv_backend as kernel_conv_backend

    return kernel_conv_backend(device)


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


class _WeightCache:
    """Values derived from a module's weights (casts, products), kept until the weights change."""

    def _cached(self, name: str, build, tensors, extra=()):
        """build(*tensors), kept in attribute ``name`` until one of the tensors changes (version, storage, dtype or
        device) or ``extra`` does. Not cached while autograd records (the result must stay in the graph) or under
        torch.compile."""
        # inference tensors (weights made under torch.inference_mode) have no version counter: no cache then
        cache = (not torch.compiler.is_compiling() and not any(t.is_inference() for t in tensors)
                 and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))
        if cache:
            key = (tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors), extra)
            cached = getattr(self, name, None)
            if cached is not None and cached[0] == key:
                return cached[1]
        value = build(*tensors)
        if cache:
            setattr(self, name, (key, value))
        return value


class _Direction(_WeightCache, nn.Module):
    """The per-direction parameters of a mixer: conv1d, x_proj, dt_proj, A_log, D (and inner norms)."""

    def __init__(self, d_inner, d_state, d_conv, dt_rank, conv_bias, dt_min, dt_max, dt_scale,
                 dt_init_floor, inner_norm, selective, a_init, norm_eps):
        super().__init__()
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=conv_bias)
        self.selective = selective
        if selective:
            self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
            self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
            std = dt_rank ** -0.5 * dt_scale
            with torch.no_grad():
                nn.init.uniform_(self.dt_proj.weight, -std, std)
                self.dt_proj.bias.copy_(dt_bias_init(d_inner, dt_min, dt_max, dt_init_floor))
            self.dt_proj.bias._no_reinit = True  # models must not zero this bias in their own init
            self.A_log = nn.Parameter(s4d_real_a_log(d_inner, d_state) if a_init == "s4d-real"
                                      else _a_log_from_ssm(d_inner, d_state, a_init))
            self.A_log._no_weight_decay = True
            self.D = nn.Parameter(torch.ones(d_inner))
            self.D._no_weight_decay = True
            if inner_norm:
                self.dt_norm = RMSNorm(dt_rank, eps=norm_eps)
                self.B_norm = RMSNorm(d_state, eps=norm_eps)
                self.C_norm = RMSNorm(d_state, eps=norm_eps)
        else:
            from mambazoo.core.ssm import LTISSM

            self.lti = LTISSM(d_inner, d_state, init=a_init, dt_min=dt_min, dt_max=dt_max)
        self.inner_norm = inner_norm and selective
        self.dt_rank, self.d_state = dt_rank, d_state

    def ssm_inputs(self, x: torch.Tensor, fold: bool = False):
        """x (batch, L, d_inner) after conv and SiLU -> delta (batch, L, d_inner), B, C (batch, L, N).

        fold (the full-sequence path): without autograd, without inner norms and for d_inner <= FOLD_DT_MAX_DIM,
        x_proj's dt rows and dt_proj run as one GEMM, delta = x (W_dt W_x,dt)^T (see _folded_weight); B and C
        are then views of alternating columns of its output (strides 2 along N), which the scan reads in pairs."""
        d_inner = self.dt_proj.weight.shape[0] if self.selective else 0
        if (fold and not self.inner_norm and d_inner <= FOLD_DT_MAX_DIM and not torch.is_grad_enabled()
                and _fold_dt_enabled()):
            out = F.linear(x, self._folded_weight())
            return out[..., :d_inner], out[..., d_inner::2], out[..., d_inner + 1::2]
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.inner_norm:
            dt, B, C = self.dt_norm(dt), self.B_norm(B), self.C_norm(C)
        delta = F.linear(dt, self.dt_proj.weight)  # the bias is added in fp32 inside the scan
        return delta, B, C

    def _folded_weight(self) -> torch.Tensor:
        """cat(W_dt W_x[:dt_rank], rows of B and C alternating): (d_inner + 2 N, d_inner), the product taken in
        fp32. One GEMM of the token stream instead of two (x_proj's output and dt_proj's (b, L, d_inner) result
        are memory bound: vim-tiny at 1248 px spent ~0.17 ms on each per call); B_n and C_n side by side let the
        scan load both with one 4-byte read (mambazoo.kernels.ops.bc_pairs) and skip their fp32 copies. Cached against
        the weights' versions."""
        def build(wx, wdt):
            return torch.cat([(wdt.float() @ wx[:self.dt_rank].float()).to(wx.dtype), self._bc_rows(wx)])

        return self._cached("_folded", build)

    def low_rank_weights(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(projection (2 N + R', d_inner), dt weight (d_inner, R')): x_proj's rows as B_0, C_0, B_1, C_1, ... then
        its R dt rows, zero rows up to R' = max(16, next power of two >= R); dt_proj's weight with R' - R zero
        columns. The projection's output is [B/C pairs | low-rank dt], which the inference scan reads as it is
        (selective_scan's dt_weight: delta = W_dt dt per tile, never stored). In ``dtype`` when given (the compute
        dtype: no cast per call under autocast). Cached against the weights' versions."""
        def build(wx, wdt):
            r = self.dt_rank
            rp = max(16, 1 << (r - 1).bit_length())
            proj = torch.cat([self._bc_rows(wx), wx[:r], wx.new_zeros(rp - r, wx.shape[1])])
            w = torch.cat([wdt, wdt.new_zeros(wdt.shape[0], rp - r)], dim=1)
            return (proj.to(dtype), w.to(dtype)) if dtype is not None else (proj, w)

        return self._cached("_low_rank", build, extra=dtype)

    def _bc_rows(self, wx: torch.Tensor) -> torch.Tensor:
        """x_proj's B and C rows interleaved: B_0, C_0, B_1, C_1, ... (2 N, d_inner)."""
        r, n = self.dt_rank, self.d_state
        return torch.stack([wx[r:r + n], wx[r + n:]], dim=1).reshape(2 * n, -1)

    def _cached(self, name: str, build, tensors=None, extra=()):
        """_WeightCache._cached with x_proj's and dt_proj's weights as the default tensors."""
        tensors = tensors if tensors is not None else (self.x_proj.weight, self.dt_proj.weight)
        return super()._cached(name, build, tensors, extra)

    def scan_constants(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A = -exp(A_log), D, dt bias) in fp32 as the scan takes them: (d_inner, N), (d_inner,), (d_inner,). Cached
        without autograd (vim-tiny ran 2-3 small kernels per direction and layer for them)."""
        def build(a_log, d, bias):
            return -torch.exp(a_log.float()), d.float(), bias.float()

        return self._cached("_constants", build, (self.A_log, self.D, self.dt_proj.bias))

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
        delta, B, C = self.ssm_inputs(x.transpose(1, 2), fold=True)
        A, D, bias = self.scan_constants()
        return selective_scan(
            x, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D, z=z,
            delta_bias=bias, delta_softplus=True,
            return_last_state=return_last_state, initial_state=initial_state, reverse=reverse,
            average_with=average_with, average_in_place=True, out=out,
        )

    def projected_inputs(self, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """B, C (batch, N, L) and low-rank dt (batch, R', L) as views of a projection by low_rank_weights()[0]:
        proj (batch, L, 2 N + R') (x's dtype or fp32: _pair_projection), B / C in interleaved pairs."""
        n = self.d_state
        return (proj[..., 0:2 * n:2].transpose(1, 2), proj[..., 1:2 * n:2].transpose(1, 2),
                proj[..., 2 * n:].transpose(1, 2))

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


def _pair_projection(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (batch, d_inner, L), a view of a (batch, L, d_inner) buffer, projected by low_rank_weights()[0]: (batch, L,
    2 N + R') [B/C pairs | low-rank dt], in fp32 from half-precision operands (cuBLAS's fp32 output on CUDA; the same
    fp32 sums elsewhere): the scan then reads each (B, C) pair as one 8-byte word with nothing to unpack, for 25 MB
    more written per call (vim-tiny, 1024 px). MAMBAZOO_BC_FP32=0: the projection in x's dtype (A/B timing)."""
    rows = x.transpose(1, 2)
    if os.environ.get("MAMBAZOO_BC_FP32", "1") == "0":
        return F.linear(rows, weight)
    if x.is_cuda:
        flat = rows.reshape(-1, rows.shape[-1])
        return torch.mm(flat, weight.t(), out_dtype=torch.float32).view(*rows.shape[:-1], weight.shape[0])
    return F.linear(rows.float(), weight.float())


# The fold trades dt_proj's (tokens, d_inner) write and read for d_inner^2 more multiply-adds per token: free
# while the folded GEMM stays memory bound (about d_inner / 2 FLOPs per byte; an H100's bf16 ridge is ~300).
# vim-tiny (d_inner 384) at 1024 / 1248 px: +4.6% / +4.4% images/s (H100, session 5). Decoding never folds.
FOLD_DT_MAX_DIM = 512


def _fold_dt_enabled() -> bool:
    """dt_proj folded into x_proj at inference unless MAMBAZOO_FOLD_DT=0 (for A/B timing)."""
    return os.environ.get("MAMBAZOO_FOLD_DT", "1") != "0"


def _a_log_from_ssm(d_inner, d_state, a_init):
    from mambazoo.core.ssm import a_log_init

    return a_log_init(d_inner, d_state, a_init)


class Mamba(_WeightCache, nn.Module):
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
    def _branch(self, direction: _Direction, x, z, state: MambaState | None, reverse: bool = False,
                average_with: torch.Tensor | None = None):
        """x, z (batch, d_inner, L) -> y (batch, d_inner, L), or (average_with + y) / 2; fills ``state`` if given.

        reverse=True runs the branch on the reversed sequence without flipping anything: the causal
        conv of the reversed sequence is the anti-causal conv (padding on the right, taps reversed) of
        this one, and the scan walks L backwards."""
        L = x.shape[-1]
        weight = direction.conv1d.weight
        if state is None and weight.shape[-1] <= 4 and conv_backend(x.device) == "triton":
            from mambazoo.kernels.conv1d import causal_conv1d

            xc = causal_conv1d(x, weight, direction.conv1d.bias, silu=True, reverse=reverse)
            return direction.scan(xc, z, reverse=reverse, average_with=average_with)
        if state is not None:
            xc = torch.cat([state.conv[..., 1:].to(x.dtype), x], dim=-1)
            new_conv = torch.cat([state.conv.to(x.dtype), x], dim=-1)[..., -self.d_conv:]
        elif reverse:
            xc = F.pad(x, (0, self.d_conv - 1))
            weight = weight.flip(-1)
        else:
            xc = F.pad(x, (self.d_conv - 1, 0))
        xc = F.silu(F.conv1d(xc, weight, direction.conv1d.bias, groups=self.d_inner))[..., :L]
        if state is None:
            return direction.scan(xc, z, reverse=reverse, average_with=average_with)
        y, last = direction.scan(xc, z, initial_state=state.ssm, return_last_state=True, average_with=average_with)
        state.conv.copy_(new_conv)
        state.ssm.copy_(last)
        return y

    def forward(self, x: torch.Tensor, state: MambaState | None = None) -> torch.Tensor:
        """x (batch, L, d_model) -> (batch, L, d_model). With ``state`` (causal mixers only), the
        sequence continues from it and the state is advanced past x (chunked prefill)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected (batch, L, d_model={self.d_model}), got {tuple(x.shape)}")
        if state is not None and self.bidirectional:
            raise ValueError("a bidirectional mixer is not causal: it has no recurrent state")
        if self.bidirectional and state is None and self._gate_in_out_proj(x):
            return self._forward_gated(x)
        xz = self.in_proj(x).transpose(1, 2)  # (batch, 2*d_inner, L)
        xs, z = xz.chunk(2, dim=1)
        if self.bidirectional and self._pair_conv(xs):  # inference: both directions' convs from one read of xs
            from mambazoo.kernels.conv1d import causal_conv1d_pair

            f, b = self.fwd.conv1d, self.bwd.conv1d
            xf, xb = causal_conv1d_pair(xs, f.weight, f.bias, b.weight, b.bias, silu=True)
            if self._low_rank_dt(xs):
                return self.out_proj(self._scan_projected(xf, xb, z, out=xs).transpose(1, 2))
            y = self.fwd.scan(xf, z, out=xs)  # xs is read no more: y (then the average) takes its memory
            del xf
            y = self.bwd.scan(xb, z, reverse=True, average_with=y)
            return self.out_proj(y.transpose(1, 2))
        y = self._branch(self.fwd, xs, z, state)
        if self.bidirectional:  # (y + yb) / 2, averaged as the backward direction's scan stores yb
            y = self._branch(self.bwd, xs, z, None, reverse=True, average_with=y)
        return self.out_proj(y.transpose(1, 2))

    def _scan_projected(self, xf: torch.Tensor, xb: torch.Tensor, z: torch.Tensor | None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """Both directions' scans on the low-rank path, inference: xf, xb (batch, d_inner, L) the two convs' outputs,
        each projected to [B/C pairs | low-rank dt] (_pair_projection) with dt_proj left to the scan; returns their
        mean (batch, d_inner, L) (gated by z unless None), stored into out when given (selective_scan_bidirectional:
        both directions in the same launches on CUDA)."""
        (pf, wf), (pb, wb) = self.fwd.low_rank_weights(xf.dtype), self.bwd.low_rank_weights(xf.dtype)
        (Bf, Cf, dtf), (Bb, Cb, dtb) = (self.fwd.projected_inputs(_pair_projection(xf, pf)),
                                        self.bwd.projected_inputs(_pair_projection(xb, pb)))
        (Af, Df, bf), (Ab, Db, bb) = self.fwd.scan_constants(), self.bwd.scan_constants()
        return selective_scan_bidirectional((xf, xb), (dtf, dtb), (Af, Ab), (Bf, Bb), (Cf, Cb), (Df, Db), z=z,
                                            delta_bias=(bf, bb), delta_softplus=True, out=out, dt_weight=(wf, wb))

    def _gate_in_out_proj(self, x: torch.Tensor) -> bool:
        """The bidirectional inference path with the gate in out_proj's kernel (kernels/gated_proj.py): in_proj makes
        only xs, the scans store y ungated (both directions share z, so silu(z) factors out of their mean), and
        out_proj forms z from the mixer's input rows on chip. Half-precision input (the autocast dtype) on the
        pair-conv, low-rank path; MAMBAZOO_GATE_OUT_PROJ=0 turns it off (A/B timing)."""
        from mambazoo.kernels.gated_proj import gated_out_proj_fits

        return (x.dtype in (torch.bfloat16, torch.float16) and self._pair_conv(x) and self._low_rank_dt(x)
                and gated_out_proj_fits(self.d_model, self.d_inner)
                and os.environ.get("MAMBAZOO_GATE_OUT_PROJ", "1") != "0")

    def _gate_weights(self, dtype: torch.dtype):
        """(in_proj's x rows, their bias, its z rows, their bias, out_proj's weight, its bias) in ``dtype`` (biases
        None where absent), cached without autograd."""
        d = self.d_inner
        b_in, b_out = self.in_proj.bias, self.out_proj.bias

        def build(w_in, w_out, *_biases):  # the biases are in the key; read from the modules
            w_in = w_in.to(dtype)
            bi = b_in.to(dtype) if b_in is not None else None
            return (w_in[:d], bi[:d] if bi is not None else None, w_in[d:], bi[d:] if bi is not None else None,
                    w_out.to(dtype), b_out.to(dtype) if b_out is not None else None)

        tensors = (self.in_proj.weight, self.out_proj.weight) + tuple(b for b in (b_in, b_out) if b is not None)
        return self._cached("_gate", build, tensors, extra=dtype)

    def _forward_gated(self, x: torch.Tensor) -> torch.Tensor:
        """forward of the bidirectional mixer at inference with the gate in out_proj's kernel (_gate_in_out_proj):
        x (batch, L, d_model) half precision -> (batch, L, d_model)."""
        from mambazoo.kernels.conv1d import causal_conv1d_pair
        from mambazoo.kernels.gated_proj import gated_out_proj

        batch, L, _ = x.shape
        wx, bx, wz, bz, wo, bo = self._gate_weights(x.dtype)
        xs = F.linear(x, wx, bx).transpose(1, 2)  # (batch, d_inner, L) in (batch, L, d_inner) memory
        f, b = self.fwd.conv1d, self.bwd.conv1d
        xf, xb = causal_conv1d_pair(xs, f.weight, f.bias, b.weight, b.bias, silu=True)
        y = self._scan_projected(xf, xb, None, out=xs)  # ungated, into xs's memory
        rows = y.transpose(1, 2).reshape(batch * L, self.d_inner)
        return gated_out_proj(rows, x.reshape(batch * L, self.d_model), wz, wo, bz, bo).view(batch, L, self.d_model)

    def _pair_conv(self, xs: torch.Tensor) -> bool:
        """The bidirectional full-sequence path without autograd on the Triton conv (widths <= 4): one conv kernel
        for both directions (vim-tiny reads its (batch, L, d_inner) input once instead of twice per layer).
        MAMBAZOO_CONV_PAIR=0 turns it off (A/B timing)."""
        f, b = self.fwd.conv1d, self.bwd.conv1d
        return (not torch.is_grad_enabled() and not torch.compiler.is_compiling() and f.weight.shape[-1] <= 4
                and (f.bias is None) == (b.bias is None) and os.environ.get("MAMBAZOO_CONV_PAIR", "1") != "0"
                and conv_backend(xs.device) == "triton")

    def _low_rank_dt(self, xs: torch.Tensor) -> bool:
        """On the pair-conv path, x_proj as a GEMM to [B/C pairs | low-rank dt] (2 N + R' columns) and dt_proj inside
        the scan (selective_scan's dt_weight) instead of the folded GEMM's (b, L, d_inner) delta, written and read
        back per direction. Selective S6 without inner norms, in half precision (the scan reads B / C as bf16 pairs);
        MAMBAZOO_LOW_RANK_DT=0 turns it off (the folded GEMM, for A/B timing)."""
        return (self.selective and not self.fwd.inner_norm and xs.dtype in (torch.bfloat16, torch.float16)
                and os.environ.get("MAMBAZOO_LOW_RANK_DT", "1") != "0")

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
        fused = fused_decode_enabled(x.device) and _fusable_state(state)
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (batch, d_inner) each, row-strided views
        if fused:  # one kernel: shift + append + depthwise conv + bias + SiLU
            from mambazoo.kernels.decode import conv_state_update

            xc = conv_state_update(state.conv, xs, d.conv1d.weight, d.conv1d.bias)
        else:
            xc = conv_step_ref(state.conv, xs, d.conv1d.weight, d.conv1d.bias)
        if not self.selective:
            y = d.lti.step(xc.float(), state.ssm) * F.silu(z.float())
            return self.out_proj(y.to(xs.dtype))
        delta, B, C = d.ssm_inputs(xc)
        if fused:  # A_log, D, dt bias as stored (any dtype): no per-step cast / exp kernels
            from mambazoo.kernels.state_update import launch_state_update

            y = launch_state_update(state.ssm, xc, delta, d.A_log, B, C, d.D, z, d.dt_proj.bias,
                                    True, A_is_log=True)
            return self.out_proj(y)
        A = -torch.exp(d.A_log.float())
        update = _state_update_fn(x.device)
        y = update(state.ssm, xc, delta, A, B, C, D=d.D.float(), z=z, dt_bias=d.dt_proj.bias.float(),
                   dt_softplus=True)
        return self.out_proj(y)


def _fusable_state(state: MambaState) -> bool:
    """The fused step needs what allocate_state makes: a contiguous fp32 ssm state."""
    return state.ssm.dtype == torch.float32 and state.ssm.is_contiguous()


def _state_update_fn(device: torch.device):
    """The fused decode-step kernel on CUDA, the reference elsewhere (same contract)."""
    if scan_backend(device) == "triton":
        from mambazoo.kernels import selective_state_update

        return selective_state_update
    return selective_state_update_ref
