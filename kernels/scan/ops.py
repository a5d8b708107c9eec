"""Launchers and torch.library registration of the selective-scan kernels.

``torch.ops.mambazoo.scan_fwd`` / ``scan_bwd`` are custom ops with fake (meta) implementations and
an autograd formula, so ``torch.compile`` traces models that call them without graph breaks.
``selective_scan_triton`` in kernels/__init__.py is the public entry point.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mambazoo.kernels._args import low_rank_delta, low_rank_dtype
from mambazoo.kernels._host import cdiv, interpreting, next_power_of_2
from mambazoo.kernels.scan.infer import scan_bidir_infer_kernel, scan_fwd_infer_kernel
from mambazoo.kernels.scan.train import scan_bwd_kernel, scan_fwd_kernel

# Tile sizes (steps per tile block_l, channels per program block_d, warps), per pass.  The forward
# stores the state every `chunk` steps for the backward; block_l of either pass must divide it.  GPU
# values from `scripts/bench_scan.py --probe` on an H100 (docs/kernel_notes.md).  L is split into
# stretches only when fewer than `split_below` programs would run, aiming at `min_programs`.  The CPU
# interpreter uses small tiles so that tests cross several tiles, chunks and stretches at tiny lengths.
# fwd_stages: the forward's software pipeline depth (inputs of the next tiles copied ahead to shared memory).
# bc_fp32: variable half-precision B / C handed to the kernels as fp32 copies (_bc_layout: faster, see
# docs/kernel_notes.md, "Tile choices").
# pair_reduce: the backward sums dB and dC over the channels together, starting with a lane shuffle in
# inline PTX (GPU only; the interpreter runs the plain reductions).
# bwd_tiles: when bwd_block_l / bwd_block_d are None, the backward takes the first (block_l, block_d) whose
# programs fit in one wave (SMs x the warps per SM its registers allow), else the last.  Registers at sm_90:
# (4, 8) 168 -> 12 warps per SM, (4, 16) 254 and (8, 8) 237 -> 8 (timings: docs/kernel_notes.md, "Tile choices").
# The backward is persistent: at most the programs that fit at once
# (bwd_programs where bwd_block_l is given; the CPU's 3 makes the tests walk several work items per program).
# infer: the inference forward for B / C pairs (kernels/scan/infer.py; the Vim fold's layout) with one stretch of L,
# no tile states, initial state or packed sequences: block_d channels per program (32 / block_d lane slices of N),
# block_l steps per tile, stages, poly (softplus as ex2 + polynomial), tanh (the gate through tanh.approx, for
# half-precision outputs); None turns it off (the general forward with inf_tiles then).
CONFIG = {
    "cuda": dict(fwd_block_l=8, block_d=16, fwd_warps=1, fwd_stages=3, bwd_block_l=None, bwd_block_d=None, bwd_warps=1, chunk=64,
                 bwd_tiles=((4, 8, 12), (4, 16, 8), (8, 8, 8)),
                 min_programs=3072, split_below=512, nsplit=0, pair_reduce=True, bc_fp32=True,
                 # (block_l, stages, softplus polynomial) of inference scans reading B/C pairs, per direction
                 inf_tiles=dict(fwd=(16, 4, True), rev=(16, 4, False)),
                 # the inference kernel for B/C pairs (kernels/scan/infer.py; bench_scan.py --tune-infer)
                 infer=dict(block_d=16, block_l=16, stages=3, poly=True, tanh=True)),
    "cpu": dict(fwd_block_l=8, block_d=4, fwd_warps=1, fwd_stages=1, bwd_block_l=8, bwd_block_d=4, bwd_warps=1, chunk=16,
                bwd_programs=3, min_programs=1, split_below=1, nsplit=0, bc_fp32=True,
                infer=dict(block_d=8, block_l=8, stages=1, poly=True, tanh=False)),
}


def _cfg(device: torch.device) -> dict:
    return CONFIG["cuda" if device.type == "cuda" else "cpu"]


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap that divides n."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def _bc_layout(X: Tensor, dim: int, fp32: bool = True):
    """(tensor as (b, G, N, L) (any strides) or (d, N), G, channels per group, invariant?).

    A variable B or C in half precision is handed to the kernels as an fp32 copy (L contiguous): a program
    broadcasts each B/C value over its channel lanes, and Triton converts bf16 after that broadcast, once per
    lane. The copy is 1/(d/N) the size of u; it cuts the forward's tile loop from 860 to 679 SASS
    instructions and the backward's from 1,032 to 952 (sm_90, (4, 8) tile)."""
    if X.dim() == 2:
        return X.contiguous(), 1, dim, True
    if X.dtype != torch.float32 and fp32:
        X = X.float()
    if X.dim() == 3:
        X = X.unsqueeze(1)
    G = X.shape[1]
    return X, G, dim // G, False


def bc_pairs(B: Tensor, C: Tensor, dtype: torch.dtype = torch.bfloat16) -> bool:
    """True when variable B and C (b, N, L) are ``dtype`` views that interleave in one buffer, B[.., n, t] and
    C[.., n, t] adjacent (a (b, L, 2 N) projection output whose B / C columns alternate: the Vim mixer's x_proj).
    bf16 pairs: the forwards read each (B, C) pair as one int32 word (BC_PAIRS) and make no fp32 copies; fp32 pairs
    (the low-rank projection's fp32 output): the inference kernel reads each as one int64 word."""
    e = torch.empty((), dtype=dtype).element_size()
    return (B.dim() == 3 and B.dtype == dtype and C.dtype == dtype and B.shape == C.shape
            and B.stride() == C.stride() and B.stride(1) == 2 and B.stride(0) % 2 == 0 and B.stride(2) % 2 == 0
            and C.data_ptr() == B.data_ptr() + e and B.data_ptr() % (2 * e) == 0 and B.device == C.device)


def _st3(t: Optional[Tensor]) -> tuple:
    """Strides of a (batch, dim, L) tensor (the kernels read and write through them: no copies)."""
    return tuple(t.stride()) if t is not None else (0, 0, 0)


def _check_row_extent(**tensors) -> None:
    """The kernels address inside one batch row with 32-bit offsets (the row base is 64-bit)."""
    for name, t in tensors.items():
        if t is None or t.dim() < 3:
            continue
        extent = sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:]))
        if extent >= 2 ** 31:
            raise ValueError(f"{name}: one batch row spans {extent} elements (shape {tuple(t.shape)}, strides "
                             f"{tuple(t.stride())}); the Triton scan needs under 2^31: split the sequence and "
                             f"carry the state (initial_state / return_last_state)")


def _as_input(grad: Tensor, x: Tensor) -> Tensor:
    """grad in x's dtype and in the layout torch.empty_like(x) gives (what the fake implementation promises:
    torch.compile checks the strides of every custom-op output against it)."""
    out = torch.empty_like(x)
    out.copy_(grad)
    return out


def _st_bc(X: Tensor, inv: bool) -> tuple:
    return (0, 0, 0, 0) if inv else tuple(X.stride())


def new_output(u: Tensor, z: Optional[Tensor]) -> Tensor:
    """y (batch, dim, L) in u's dtype. It takes the gate's layout when z is a (batch, L, dim) view (the
    in_proj output of a Mamba mixer), so that out_proj reads y without a transposing copy."""
    if z is not None and z.stride(1) == 1 and z.stride(2) != 1:
        return u.new_empty(u.shape[0], u.shape[2], u.shape[1]).transpose(1, 2)
    return u.new_empty(u.shape)


def output_fits(y: Tensor, u: Tensor) -> bool:
    """True when y can take the scan's output: u's shape, dtype and device, unit stride along dim or L (the kernel
    stores through y's strides)."""
    return y.shape == u.shape and y.dtype == u.dtype and y.device == u.device and 1 in (y.stride(1), y.stride(2))


def _plan(u: Tensor, B: Tensor, C: Tensor, block_d: int, block_l: int, cfg: dict):
    """(block_d, tiles, stretches, tiles per stretch, K tiles per checkpoint, checkpoints).

    block_d shrinks to divide the channels of a group; stretches hold whole checkpoint chunks."""
    batch, dim, L = u.shape
    for X in (B, C):
        if X.dim() == 4 and X.shape[1] > 1:
            block_d = _pow2_divisor(dim // X.shape[1], block_d)
    K = max(1, cfg["chunk"] // block_l)
    n_tiles = max(1, cdiv(L, block_l))
    n_chunks = cdiv(n_tiles, K)
    progs = batch * cdiv(dim, block_d)
    nsplit = cfg["nsplit"]
    if not nsplit:  # split L only where the channels alone cannot fill the GPU (long single sequences)
        nsplit = cdiv(cfg["min_programs"], progs) if progs < cfg["split_below"] else 1
        nsplit = max(1, min(n_chunks, nsplit))
    chunks_per_split = cdiv(n_chunks, nsplit)
    nsplit = cdiv(n_chunks, chunks_per_split)
    return block_d, n_tiles, nsplit, chunks_per_split * K, K, n_chunks


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _bwd_tile(batch: int, dim: int, device: torch.device, cfg: dict) -> tuple[int, int, int]:
    """(block_l, block_d, programs) of the backward: the configured pair, or by occupancy (cfg["bwd_tiles"]):
    a program is one warp walking the whole sequence, so a second partial wave costs nearly a whole one.
    programs: how many programs run at once (SMs x warps per SM; cfg["bwd_programs"] where given); the
    persistent backward launches no more than that, so its scratch does not grow with the work."""
    if cfg["bwd_block_l"] is not None:
        return cfg["bwd_block_l"], cfg["bwd_block_d"], cfg.get("bwd_programs") or batch * dim
    tiles = cfg["bwd_tiles"]
    for block_l, block_d, warps_per_sm in tiles:
        if batch * cdiv(dim, block_d) <= _sm_count(device) * warps_per_sm:
            return block_l, block_d, _sm_count(device) * warps_per_sm
    block_l, block_d, warps_per_sm = tiles[-1]
    return block_l, block_d, _sm_count(device) * warps_per_sm


def _n_chunks(L: int, device: torch.device) -> int:
    cfg = _cfg(device)
    bl = cfg["fwd_block_l"]
    K = max(1, cfg["chunk"] // bl)
    return cdiv(max(1, cdiv(L, bl)), K)


def _flags(D, z, delta_bias, seq_idx, softplus, B_inv, C_inv, reverse):
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                HAS_SEQ=seq_idx is not None, SOFTPLUS=softplus, B_INV=B_inv, C_INV=C_inv, REVERSE=reverse,
                FAST=not interpreting())


def _outputs(u: Tensor, z: Optional[Tensor], y_out: Optional[Tensor], y_other: Optional[Tensor]):
    """(y, y_other) of a forward: y_out or a new output; y_other (the output to average with) as it is when it is y
    or has y's strides (the kernels read it through them), else a copy in y's strides."""
    y = y_out if y_out is not None else new_output(u, z)
    if y_other is not None and y_other is not y and y_other.stride() != y.stride():
        y_other = torch.empty_strided(y.shape, y.stride(), dtype=y.dtype, device=y.device).copy_(y_other)
    return y, y_other


def scan_forward(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, softplus, reverse=False,
                 y_other=None, store_states=True, y_out=None, dt_weight=None):
    """Returns y (b, d, L) in u's dtype, the last state (b, d, N) fp32, tile states (b, d, T, N) fp32.
    reverse: scan from position L-1 down to 0 (as if every input and the output were flipped along L).
    y_other (b, d, L): y is returned as (y_other + y) / 2, averaged in the kernel's store (a bidirectional
    mixer's two directions). store_states=False: no tile states (T = 0), for calls that need no backward.
    y_out: y is stored there (any strides ``output_fits`` accepts; it may be y_other itself: each element is read
    and written by the same thread; it must not overlap the inputs) and returned; only for calls no autograd records.
    dt_weight (d, R): delta is low-rank dt (b, R, L), delta = dt_weight @ dt; the inference kernel forms it per tile
    where it takes the call (_rank_fits), else it is formed here first (no autograd: store_states=False only)."""
    cfg = _cfg(u.device)
    batch, dim, L = u.shape
    N = A.shape[1]
    A = A.contiguous()
    seq_idx = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    pairs = cfg.get("bc_pairs", True) and bc_pairs(B, C)
    pairs32 = cfg.get("bc_pairs", True) and bc_pairs(B, C, torch.float32)  # the inference kernel's only
    if pairs:  # one int32 word per (step, state): n's and t's strides in words, the batch row's in bf16 elements
        Bk = Ck = B.unsqueeze(1)
        GB, GC, dpg_b, dpg_c, B_inv, C_inv = 1, 1, dim, dim, False, False
        st_b = st_c = (B.stride(0), 0, 1, B.stride(2) // 2)
    else:
        Bk, GB, dpg_b, B_inv = _bc_layout(B, dim, cfg["bc_fp32"])
        Ck, GC, dpg_c, C_inv = _bc_layout(C, dim, cfg["bc_fp32"])
        st_b, st_c = _st_bc(Bk, B_inv), _st_bc(Ck, C_inv)
    infer = ((pairs or pairs32) and not store_states and initial_state is None and seq_idx is None
             and _infer_fits(u, N, cfg))
    if dt_weight is not None:
        if infer and _rank_fits(delta, dt_weight):
            return _scan_forward_infer(u, delta, A, B, D, z, delta_bias, softplus, reverse, y_other, y_out, cfg,
                                       dt_weight)
        delta = low_rank_delta(delta, dt_weight)
    if infer:
        return _scan_forward_infer(u, delta, A, B, D, z, delta_bias, softplus, reverse, y_other, y_out, cfg)
    # Vim-style inference (B/C pairs, no tile states) has its own tiles per direction (cfg["inf_tiles"])
    block_l, stages, poly = cfg["fwd_block_l"], cfg["fwd_stages"], False
    if pairs and not store_states and cfg.get("inf_tiles"):
        block_l, stages, poly = cfg["inf_tiles"]["rev" if reverse else "fwd"]
    block_d, n_tiles, nsplit, tiles_per_split, K, n_chunks = _plan(u, B, C, cfg["block_d"], block_l, cfg)
    block_n = next_power_of_2(N)
    y, y_other = _outputs(u, z, y_out, y_other)
    _check_row_extent(u=u, delta=delta, z=z, y=y, B=B, C=C)
    hs = u.new_empty(batch, dim, n_chunks if store_states else 0, N, dtype=torch.float32)
    hend = u.new_empty(batch, dim, nsplit, N, dtype=torch.float32)
    grid = (batch * cdiv(dim, block_d), nsplit)
    common = dict(BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=block_l, num_warps=cfg["fwd_warps"],
                  STAGES=stages, BC_PAIRS=pairs, SOFTPLUS_POLY=poly,
                  **_flags(D, z, delta_bias, seq_idx, softplus, B_inv, C_inv, reverse))
    sizes = (*_st3(u), *_st3(delta), *_st3(z), *_st3(y), *st_b, *st_c,
             dim, L, N, GB, GC, dpg_b, dpg_c, tiles_per_split, n_tiles, nsplit, n_chunks, K)
    h0 = initial_state.float().contiguous().unsqueeze(2) if initial_state is not None else None
    if nsplit > 1:
        # pass 1: each stretch from a zero state; then chain the stretches
        pend = torch.empty_like(hend)
        scan_fwd_kernel[grid](u, delta, A, Bk, Ck, D, z, delta_bias, seq_idx, None, None, None, hend, pend,
                              *sizes, HAS_H0=False, STATE_ONLY=True, **common)
        h = h0[:, :, 0] if h0 is not None else u.new_zeros(batch, dim, N, dtype=torch.float32)
        starts = [h]
        for s in range(nsplit - 1):
            h = pend[:, :, s] * h + hend[:, :, s]
            starts.append(h)
        h0 = torch.stack(starts, dim=2).contiguous()
    scan_fwd_kernel[grid](u, delta, A, Bk, Ck, D, z, delta_bias, seq_idx, h0, y, hs, hend, None,
                          *sizes, HAS_H0=h0 is not None, STATE_ONLY=False, STORE_STATES=store_states,
                          HAS_YO=y_other is not None, yo_ptr=y_other, **common)
    return y, hend[:, :, -1].contiguous(), hs


def _infer_fits(u: Tensor, N: int, cfg: dict) -> bool:
    """The inference kernel's conditions beyond the caller's: configured, N a power of two and block_l both divided
    by the lane slices, and enough programs without splitting L (cfg["split_below"])."""
    infer = cfg.get("infer")
    if not infer:
        return False
    lanes = 32 // infer["block_d"]
    return (N == next_power_of_2(N) and N % lanes == 0 and infer["block_l"] % lanes == 0
            and u.shape[0] * cdiv(u.shape[1], infer["block_d"]) >= cfg["split_below"])


def _rank_fits(dt: Tensor, dt_weight: Tensor) -> bool:
    """Low-rank dt (b, R, L) the inference kernel takes: R a power of two >= 16 (one tl.dot per tile)."""
    R, infer = dt_weight.shape[1], _cfg(dt.device)["infer"]
    tiles_ok = interpreting() or min(infer["block_l"], infer["block_d"]) >= 16  # the GPU's smallest dot is 16 x 16
    return (R >= 16 and R == next_power_of_2(R) and tiles_ok
            and dt.dtype in (torch.float32, torch.float16, torch.bfloat16))


def _scan_forward_infer(u, delta, A, B, D, z, delta_bias, softplus, reverse, y_other, y_out, cfg, dt_weight=None):
    """scan_forward for inference with B / C as bf16 or fp32 pairs (see scan_forward): kernels/scan/infer.py. With
    dt_weight (d, R), delta is low-rank dt (b, R, L); the kernel's product runs in the narrower dtype of the two (as
    kernels/_args.py's low_rank_delta)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    infer = cfg["infer"]
    block_d, block_l = infer["block_d"], infer["block_l"]
    lanes = 32 // block_d
    y, y_other = _outputs(u, z, y_out, y_other)
    _check_row_extent(u=u, delta=delta, z=z, y=y, B=B)
    hend = u.new_empty(batch, dim, N, dtype=torch.float32)
    flags = _flags(D, z, delta_bias, None, softplus, False, False, reverse)
    tanh = infer["tanh"] and flags["FAST"] and y.dtype in (torch.float16, torch.bfloat16)
    wdt = None
    if dt_weight is not None:
        wdt = dt_weight.to(low_rank_dtype(delta, dt_weight)).contiguous()
    scan_fwd_infer_kernel[(batch * cdiv(dim, block_d),)](
        u, delta, A.contiguous(), B, D, z, delta_bias, y, y_other, hend, wdt,
        *_st3(u), *_st3(delta), *_st3(z), *_st3(y), B.stride(0), B.stride(2) // 2, dim, L, N, cdiv(L, block_l),
        HAS_D=flags["HAS_D"], HAS_Z=flags["HAS_Z"], HAS_BIAS=flags["HAS_BIAS"], SOFTPLUS=softplus, REVERSE=reverse,
        HAS_YO=y_other is not None, SOFTPLUS_POLY=infer["poly"], TANH_GATE=tanh, BLOCK_L=block_l, BLOCK_I=N // lanes,
        BLOCK_J=lanes, BLOCK_D=block_d, STAGES=infer["stages"], FAST=flags["FAST"],
        RANK=wdt.shape[1] if wdt is not None else 0, BC_WORD=8 * 2 * B.element_size(),
        DOT_PRECISION="ieee" if wdt is not None and wdt.dtype == torch.float32 else "tf32", num_warps=1)
    return y, hend, u.new_empty(batch, dim, 0, N, dtype=torch.float32)


def scan_bidirectional_infer(u, delta, A, B, C, D, z, delta_bias, softplus: bool, dt_weight, y_out=None):
    """Both directions of a bidirectional mixer's inference scan in two launches of kernels/scan/infer.py's
    scan_bidir_infer_kernel, or None where it does not take the call (then: scan_forward per direction).

    u, delta, A, B, C, D, delta_bias, dt_weight: (forward, backward) pairs of what _scan_forward_infer takes per
    direction (the backward one scans from position L - 1 down); z (b, d, L) or None, shared. Returns y (b, d, L) in
    u's dtype, (gated y_fwd + gated y_bwd) / 2, stored into y_out when given. Takes calls whose two directions each
    fit the one-direction inference kernel (B / C pairs of one dtype, no states, _infer_fits, _rank_fits) and share
    their layouts: u, delta and B with the same shapes, dtypes and strides. Each launch runs both directions' grids,
    twice the warps per SM where one direction's grid leaves the GPU part-empty (docs/kernel_notes.md, "Tile
    choices"). y_out must not overlap the inputs."""
    cfg = _cfg(u[0].device)
    infer = cfg.get("infer")
    if not infer or (dt_weight[0] is None) != (dt_weight[1] is None) or (D[0] is None) != (D[1] is None) \
            or (delta_bias[0] is None) != (delta_bias[1] is None):
        return None
    uf, ub = u
    batch, dim, L = uf.shape
    N = A[0].shape[1]
    if ub.shape != uf.shape or ub.stride() != uf.stride() or ub.dtype != uf.dtype or A[1].shape != A[0].shape \
            or delta[1].shape != delta[0].shape or delta[1].stride() != delta[0].stride() \
            or delta[1].dtype != delta[0].dtype or B[1].stride() != B[0].stride():
        return None
    kinds = [torch.bfloat16 if bc_pairs(b, c) else torch.float32 if bc_pairs(b, c, torch.float32) else None
             for b, c in zip(B, C)]
    if kinds[0] is None or kinds[0] != kinds[1] or not _infer_fits(uf, N, cfg):
        return None
    wdt = (None, None)
    if dt_weight[0] is not None:
        if dt_weight[1].shape != dt_weight[0].shape or not all(_rank_fits(d, w) for d, w in zip(delta, dt_weight)):
            return None
        wdt = tuple(w.to(low_rank_dtype(d, w)).contiguous() for d, w in zip(delta, dt_weight))
        if wdt[0].dtype != wdt[1].dtype:
            return None
    block_d, block_l = infer["block_d"], infer["block_l"]
    lanes = 32 // block_d
    y, _ = _outputs(uf, z, y_out, None)
    _check_row_extent(u=uf, delta=delta[0], z=z, y=y, B=B[0])
    hmid = uf.new_empty(2, batch, dim, N, dtype=torch.float32)
    flags = _flags(D[0], z, delta_bias[0], None, softplus, False, False, False)
    tanh = infer["tanh"] and flags["FAST"] and y.dtype in (torch.float16, torch.bfloat16)
    Af, Ab = (a.contiguous() for a in A)
    for phase in (1, 2):
        scan_bidir_infer_kernel[(2 * batch * cdiv(dim, block_d),)](
            uf, ub, *delta, Af, Ab, *B, *D, *delta_bias, *wdt, z, y, hmid,
            *_st3(uf), *_st3(delta[0]), *_st3(z), *_st3(y), B[0].stride(0), B[0].stride(2) // 2,
            batch, dim, L, N, L // 2, PHASE=phase, HAS_D=flags["HAS_D"], HAS_Z=flags["HAS_Z"],
            HAS_BIAS=flags["HAS_BIAS"], SOFTPLUS=softplus, SOFTPLUS_POLY=infer["poly"], TANH_GATE=tanh,
            BLOCK_L=block_l, BLOCK_I=N // lanes, BLOCK_J=lanes, BLOCK_D=block_d, STAGES=infer["stages"],
            FAST=flags["FAST"], RANK=wdt[0].shape[1] if wdt[0] is not None else 0, BC_WORD=8 * 2 * B[0].element_size(),
            DOT_PRECISION="ieee" if wdt[0] is not None and wdt[0].dtype == torch.float32 else "tf32", num_warps=1)
    return y


def scan_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, seq_idx, hs, softplus, has_h0, reverse=False):
    """Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0); absent inputs get empty tensors."""
    cfg = _cfg(u.device)
    batch, dim, L = u.shape
    N = A.shape[1]
    A = A.contiguous()
    seq_idx = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    Bk, GB, dpg_b, B_inv = _bc_layout(B, dim, cfg["bc_fp32"])
    Ck, GC, dpg_c, C_inv = _bc_layout(C, dim, cfg["bc_fp32"])
    block_l, block_d, programs = _bwd_tile(batch, dim, u.device, cfg)
    block_d, n_tiles, nsplit, tiles_per_split, K, n_chunks = _plan(u, B, C, block_d, block_l, cfg)
    n_work = batch * cdiv(dim, block_d)
    block_n = next_power_of_2(N)
    f32 = dict(dtype=torch.float32, device=u.device)
    du = torch.empty_like(u)
    ddelta = torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    dA = torch.zeros(dim, N, **f32)
    dB = torch.zeros(Bk.shape, **f32)
    dC = torch.zeros(Ck.shape, **f32)
    dD = torch.zeros(dim, **f32) if D is not None else None
    dbias = torch.zeros(dim, **f32) if delta_bias is not None else None
    dh0 = u.new_empty(batch, dim, N, dtype=torch.float32) if has_h0 else None
    grid = (min(n_work, programs), nsplit)
    scratch = u.new_empty(grid[0] * nsplit * K * block_n * block_d, dtype=torch.float32)
    common = dict(BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=block_l, num_warps=cfg["bwd_warps"],
                  PERSISTENT=n_work > grid[0], **_flags(D, z, delta_bias, seq_idx, softplus, B_inv, C_inv, reverse))
    sizes = (*_st3(u), *_st3(delta), *_st3(z), *_st3(dout), *_st3(du), *_st3(ddelta), *_st3(dz),
             *_st_bc(Bk, B_inv), *_st_bc(Ck, C_inv),
             dim, L, N, GB, GC, dpg_b, dpg_c, tiles_per_split, n_tiles, nsplit, n_chunks, K, n_work)
    qin = None
    if dlast is not None:
        qin = dlast.float().contiguous().unsqueeze(2)
    if nsplit > 1:
        qend = u.new_empty(batch, dim, nsplit, N, dtype=torch.float32)
        rend = torch.empty_like(qend)
        scan_bwd_kernel[grid](u, delta, A, Bk, Ck, D, z, delta_bias, seq_idx, hs, dout, None,
                              du, ddelta, dz, dA, dB, dC, dD, dbias, dh0, qend, rend, scratch,
                              *sizes, HAS_QIN=False, HAS_H0=False, STATE_ONLY=True, **common)
        q = qin[:, :, 0] if qin is not None else u.new_zeros(batch, dim, N, dtype=torch.float32)
        carries = [q]
        for s in range(nsplit - 1, 0, -1):
            q = qend[:, :, s] + rend[:, :, s] * q
            carries.append(q)
        qin = torch.stack(carries[::-1], dim=2).contiguous()
    scan_bwd_kernel[grid](u, delta, A, Bk, Ck, D, z, delta_bias, seq_idx, hs, dout, qin,
                          du, ddelta, dz, dA, dB, dC, dD, dbias, dh0, None, None, scratch,
                          *sizes, HAS_QIN=qin is not None, HAS_H0=has_h0, STATE_ONLY=False, PAIR_REDUCE=cfg.get("pair_reduce", False),
                          **common)
    def empty():  # a distinct tensor each time: custom-op outputs may not alias one another
        return u.new_empty(0)

    return (du, ddelta, dA.to(A.dtype), _as_input(dB.view(B.shape), B), _as_input(dC.view(C.shape), C),
            dD.to(D.dtype) if D is not None else empty(), dz if dz is not None else empty(),
            dbias.to(delta_bias.dtype) if delta_bias is not None else empty(),
            dh0 if dh0 is not None else empty())


# ---------------------------------------------------------------- torch.library registration

@torch.library.custom_op("mambazoo::scan_fwd", mutates_args=())
def scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
             seq_idx: Optional[Tensor], delta_softplus: bool, reverse: bool = False,
             y_other: Optional[Tensor] = None, store_states: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Fused forward: (y, last state, tile states); see scan_forward."""
    return scan_forward(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus, reverse,
                        y_other, store_states)


@scan_fwd.register_fake
def _scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus, reverse=False,
                   y_other=None, store_states=True):
    batch, dim, L = u.shape
    N = A.shape[1]
    return (new_output(u, z), u.new_empty(batch, dim, N, dtype=torch.float32),
            u.new_empty(batch, dim, _n_chunks(L, u.device) if store_states else 0, N, dtype=torch.float32))


@torch.library.custom_op("mambazoo::scan_bwd", mutates_args=())
def scan_bwd(dout: Tensor, dlast: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
             C: Tensor, D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
             seq_idx: Optional[Tensor], tile_states: Tensor, delta_softplus: bool,
             has_initial_state: bool, reverse: bool = False) -> list[Tensor]:
    """Recomputing backward: [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state]
    (an empty tensor for each input that was None)."""
    return list(scan_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, seq_idx, tile_states,
                              delta_softplus, has_initial_state, reverse))


@scan_bwd.register_fake
def _scan_bwd_fake(dout, dlast, u, delta, A, B, C, D, z, delta_bias, seq_idx, tile_states, delta_softplus,
                   has_initial_state, reverse=False):
    batch, dim, _ = u.shape
    like = lambda t: torch.empty_like(t) if t is not None else u.new_empty(0)  # noqa: E731
    return [torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), like(D), like(z), like(delta_bias),
            u.new_empty(batch, dim, A.shape[1], dtype=torch.float32) if has_initial_state else u.new_empty(0)]


def _setup_context(ctx, inputs, output):
    # Unused outputs get None, not zero-filled gradients: the tile states are never differentiated (a zero
    # tensor of their size, 25 MB at (8, 1536, 2048, 16), used to sit in memory for the whole backward) and
    # an unused last state needs no zero carry.
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)
    u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, softplus, *rest = inputs
    rest = rest + [False, None, True][len(rest):]  # reverse, y_other, store_states
    ctx.reverse, ctx.has_y_other, ctx.stored_states = bool(rest[0]), rest[1] is not None, bool(rest[2])
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, seq_idx, output[2])
    ctx.softplus = softplus
    ctx.has_h0 = initial_state is not None
    ctx.h0_dtype = initial_state.dtype if initial_state is not None else None


def _input_grads(ctx, dy, dlast, backward_fn):
    """The gradients of scan_fwd's inputs (None for absent ones) from backward_fn (scan_bwd or scan_backward)."""
    if not ctx.stored_states:
        raise RuntimeError("scan_fwd ran with store_states=False (no tile states): it cannot be differentiated")
    u, delta, A, B, C, D, z, delta_bias, seq_idx, hs = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(u)
    elif ctx.has_y_other:  # y = (y_other + scan) / 2: both get half of the gradient
        dy = dy * 0.5
    g = backward_fn(dy, dlast, u, delta, A, B, C, D, z, delta_bias, seq_idx, hs, ctx.softplus, ctx.has_h0,
                    ctx.reverse)
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = g
    return (du, ddelta, dA, dB, dC,
            dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None,
            dh0.to(ctx.h0_dtype) if ctx.has_h0 else None, None, None, None,
            dy if ctx.has_y_other else None, None)


def _backward(ctx, dy, dlast, _dtiles):
    return _input_grads(ctx, dy, dlast, scan_bwd)


scan_fwd.register_autograd(_backward, setup_context=_setup_context)


class EagerScan(torch.autograd.Function):
    """scan_fwd / scan_bwd without the custom-op dispatcher, for eager mode: the same launchers and the same
    autograd formula, minus the dispatcher's per-call work (schema checks, the autograd wrapper, output
    checks), which is host time the GPU waits on when a scan is short. torch.compile uses the custom ops."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, softplus, reverse,
                y_other=None, store_states=True):
        y, last, hs = scan_forward(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, softplus, reverse,
                                   y_other, store_states)
        _setup_context(ctx, (u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, softplus, reverse,
                             y_other, store_states), (y, last, hs))
        return y, last, hs

    @staticmethod
    def backward(ctx, dy, dlast, _dtiles):
        return _input_grads(ctx, dy, dlast, scan_backward)
