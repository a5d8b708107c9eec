"""Inference forward of the selective scan for B / C pairs: the state axis split in two, (BLOCK_L, I, J, BLOCK_D) tiles.

The general forward (selective_scan.scan_fwd_kernel) holds (BLOCK_L, N, BLOCK_D) tiles; Triton's default layout
then gives the lanes of a warp BLOCK_D channels and J = 32 / BLOCK_D slices of N, and each thread every J-th state,
so B and C of a step reach a thread as scalar shared-memory loads, and every per-(step, channel) value (softplus,
D, the gate) is computed on each of the J lanes of its channel. Here:
  - the state index is n = j * I + i (I = N / J states per thread, i inside the thread): a thread's states are
    contiguous, one 16-byte shared-memory load brings four (step, state) words of B / C pairs;
  - delta and its softplus are computed once per (step, channel), each of the J lanes of a channel taking
    BLOCK_L / J steps ((S, J, BLOCK_D) tiles), then handed to all of them (_full_steps); the output epilogue
    (D u, gate, average, store) runs on the same compact tiles;
  - optionally the gate's sigmoid through one tanh.approx (half-precision outputs only);
  - optionally (RANK > 0) delta given low-rank, dt (b, RANK, L) with dt_proj's weight (d, RANK): each tile forms its
    delta with one tl.dot, so no (b, L, d) delta is written by a GEMM and read back (the Vim mixer's default).

B and C arrive as pairs (ops.bc_pairs: B_n and C_n of a step adjacent, as the Vim mixer's projections write them):
bf16 pairs as one int32 word per (step, state), B's bits low, C's high, each unpacked with one integer op; fp32 pairs
(BC_WORD = 64: the low-rank projection's fp32 output) as one int64 word whose halves are B and C as they are. Only
what a bidirectional mixer's inference needs: no tile states, no initial state, no packed sequences, one stretch of L
per program. y (b, d, L) is stored through its strides; HAS_YO averages it with yo (the other direction's output,
read through y's strides).

Two kernels share the per-tile work (_scan_tile) and epilogue: scan_fwd_infer_kernel runs one direction;
scan_bidir_infer_kernel runs both directions of a bidirectional mixer in two launches of twice the programs (each
direction over half of the sequence per launch, the second averaging with the first's output), which keeps twice
the warps per SM where one direction's grid leaves the GPU part-empty (docs/kernel_notes.md, "Tile choices").
"""

from __future__ import annotations

import triton
import triton.language as tl

from mambazoo.kernels._math import gate as _gate, sigmoid  # noqa: F401  (_gate: used in the kernels)
from mambazoo.kernels.scan.train import _bias_d, _combine, _dt_tile, _dt_value, _last, _mem, _off, _row, _steps


@triton.jit
def _full_steps(v, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """(S, J, BLOCK_D) with step t = j * S + s, lane slice j holding its own S steps -> (BLOCK_L, BLOCK_D) in step
    order on every lane slice. Built as a sum over the lane axis of v placed at its own j of a new in-thread axis:
    the reduction pins v to the compact layout (with a plain reshape Triton computes v where it is used, once per
    lane slice)."""
    J: tl.constexpr = v.shape[1]
    jj = tl.arange(0, J)
    g = tl.where(jj[None, :, None, None] == jj[None, None, :, None], v[:, None, :, :], 0.0)  # (S, J', J, BLOCK_D)
    return tl.reshape(tl.permute(tl.sum(g, axis=2), (1, 0, 2)), (BLOCK_L, BLOCK_D))


@triton.jit
def _compact_steps(v, J: tl.constexpr, S: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_L, BLOCK_D) -> (S, J, BLOCK_D), the inverse of _full_steps (each lane slice keeps its own steps)."""
    return tl.permute(tl.reshape(v, (J, S, BLOCK_D)), (1, 0, 2))


@triton.jit
def _scan_tile(u_ptr, dl_ptr, words, h, A2, bias, Dv, wdt, offs_d, offs_l, offs_r, tm, mask_t, io_mask, tmc, mask_c,
               sud, sul: tl.constexpr, sdd, sdl: tl.constexpr, sbcl: tl.constexpr,
               HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, SOFTPLUS_POLY: tl.constexpr,
               BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, FAST: tl.constexpr,
               RANK: tl.constexpr, DOT_PRECISION: tl.constexpr, BC_WORD: tl.constexpr):
    """One tile of BLOCK_L scan steps from the state h (BLOCK_I, BLOCK_J, BLOCK_D). tm (BLOCK_L,): the memory
    positions of its steps in scan order, mask_t where they are in range, io_mask (BLOCK_L, BLOCK_D) with the
    channels; tmc / mask_c the same on the compact (S, J, BLOCK_D) tiles. Returns (the state after the tile, y + D u
    on the compact tiles, fp32, not gated). delta and its softplus once per (step, channel), 0 out of range, so that
    those steps are identities (a = 1, x = 0)."""
    S: tl.constexpr = BLOCK_L // BLOCK_J
    od = offs_d[None, None, :]
    if RANK > 0:  # delta of the tile's steps from its low-rank dt rows, then compact
        lo = tl.load(dl_ptr + tm[:, None] * sdl + offs_r[None, :] * sdd, mask=mask_t[:, None], other=0.0)
        v = _compact_steps(tl.dot(lo.to(wdt.dtype), wdt, input_precision=DOT_PRECISION), BLOCK_J, S, BLOCK_D)
        dt_c, _ = _dt_value(v, bias[None, None, :], mask_c, HAS_BIAS, SOFTPLUS, FAST, SOFTPLUS_POLY)
    else:
        dt_c, _ = _dt_tile(dl_ptr, bias[None, :], od * sdd + tmc * sdl, mask_c, HAS_BIAS, SOFTPLUS, FAST,
                           SOFTPLUS_POLY)
    dt = _full_steps(dt_c, BLOCK_L, BLOCK_D)
    u = tl.load(u_ptr + _off(offs_d, tm, sud, sul), mask=io_mask, other=0.0).to(tl.float32)
    w = tl.load(words + tm[:, None, None] * sbcl, mask=mask_t[:, None, None], other=0)  # (BL, I, J) pairs
    if BC_WORD == 64:  # fp32 B in the low half, C in the high half
        Bt = w.to(tl.int32).to(tl.float32, bitcast=True)[:, :, :, None]
        Ct = (w >> 32).to(tl.int32).to(tl.float32, bitcast=True)[:, :, :, None]
    else:
        Bt = (w << 16).to(tl.float32, bitcast=True)[:, :, :, None]
        Ct = (w & -65536).to(tl.float32, bitcast=True)[:, :, :, None]
    a = tl.exp2(dt[:, None, None, :] * A2[None, :, :, :])
    x = (dt * u)[:, None, None, :] * Bt
    x = tl.where((offs_l == 0)[:, None, None, None], x + a * h[None, :, :, :], x)  # the carried state enters
    _, hfull = tl.associative_scan((a, x), axis=0, combine_fn=_combine)
    h = _last(hfull, offs_l, BLOCK_L)
    y = _compact_steps(tl.sum(tl.sum(hfull * Ct, axis=1), axis=1), BLOCK_J, S, BLOCK_D)  # i in-thread, then j
    if HAS_D:
        u_c = tl.load(u_ptr + od * sud + tmc * sul, mask=mask_c, other=0.0).to(tl.float32)
        y += Dv[None, None, :] * u_c
    return h, y


@triton.jit
def _work_item(work, dim, N, BLOCK_L: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
               BLOCK_D: tl.constexpr, RANK: tl.constexpr):
    """Work item ``work`` (BLOCK_D channels of one batch row) and its index vectors: (batch row b, channels offs_d
    (BLOCK_D,), mask_d, steps offs_l (BLOCK_L,), ranks offs_r, the state index n = j * I + i as offs_n (I, J), the
    (I, J, BLOCK_D) mask and offsets into a (d, N) tensor)."""
    n_dblk = tl.cdiv(dim, BLOCK_D)
    b = work // n_dblk
    offs_d = (work % n_dblk) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    R1: tl.constexpr = RANK if RANK > 0 else 1
    offs_n = tl.arange(0, BLOCK_J)[None, :] * BLOCK_I + tl.arange(0, BLOCK_I)[:, None]
    mask_nd = mask_d[None, None, :] & (offs_n < N)[:, :, None]
    nd_off = offs_d[None, None, :] * N + offs_n[:, :, None]
    return b, offs_d, mask_d, tl.arange(0, BLOCK_L), tl.arange(0, R1), offs_n, mask_nd, nd_off


@triton.jit
def _constants(A_ptr, bias_ptr, D_ptr, wdt_ptr, nd_off, mask_nd, offs_d, mask_d, offs_r, HAS_BIAS: tl.constexpr,
               HAS_D: tl.constexpr, BLOCK_D: tl.constexpr, RANK: tl.constexpr):
    """A log2(e) (I, J, BLOCK_D), the delta bias and D (BLOCK_D,), and (RANK > 0) the (RANK, BLOCK_D) dt weight."""
    A2 = tl.load(A_ptr + nd_off, mask=mask_nd, other=0.0).to(tl.float32) * 1.4426950408889634
    bias, Dv = _bias_d(bias_ptr, D_ptr, offs_d, mask_d, HAS_BIAS, HAS_D, BLOCK_D)
    wdt = bias  # unused unless RANK > 0
    if RANK > 0:
        wdt = tl.load(wdt_ptr + offs_d[None, :] * RANK + offs_r[:, None], mask=mask_d[None, :], other=0.0)
    return A2, bias, Dv, wdt


@triton.jit
def _words(bc_ptr, b, sbcb, offs_n, BC_WORD: tl.constexpr):
    """Pointers to the pair words of batch row b at step 0, (1, I, J)."""
    word_ty = tl.int64 if BC_WORD == 64 else tl.int32
    return _row(bc_ptr, b, sbcb).to(tl.pointer_type(word_ty)) + offs_n[None, :, :]


@triton.jit
def _epilogue(y, z_ptr, yo_ptr, y_ptr, od, tmc, mask_c, szd, szl: tl.constexpr, syd, syl: tl.constexpr,
              HAS_Z: tl.constexpr, HAS_YO: tl.constexpr, TANH_GATE: tl.constexpr, FAST: tl.constexpr):
    """y (compact tiles) gated by silu(z), averaged with yo (HAS_YO) and stored in y_ptr's dtype."""
    if HAS_Z:
        zv = tl.load(z_ptr + od * szd + tmc * szl, mask=mask_c, other=0.0).to(tl.float32)
        y = y * _gate(zv, TANH_GATE, FAST)
    if HAS_YO:
        yo = tl.load(yo_ptr + od * syd + tmc * syl, mask=mask_c, other=0.0).to(tl.float32)
        y = 0.5 * (y + yo)
    tl.store(y_ptr + od * syd + tmc * syl, y.to(y_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def scan_fwd_infer_kernel(
    u_ptr, dl_ptr, A_ptr, bc_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, yo_ptr, hend_ptr, wdt_ptr,
    sub, sud, sul: tl.constexpr, sdb, sdd, sdl: tl.constexpr, szb, szd, szl: tl.constexpr,
    syb, syd, syl: tl.constexpr, sbcb, sbcl: tl.constexpr,
    dim, L, N, n_tiles,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, HAS_YO: tl.constexpr, SOFTPLUS_POLY: tl.constexpr, TANH_GATE: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr, FAST: tl.constexpr, RANK: tl.constexpr = 0, DOT_PRECISION: tl.constexpr = "ieee",
    BC_WORD: tl.constexpr = 32,
):
    """Grid (b * cdiv(d, BLOCK_D),): BLOCK_D channels of one batch row over the whole sequence; N = BLOCK_I * BLOCK_J,
    BLOCK_J = 32 / BLOCK_D, BLOCK_L a multiple of BLOCK_J. Writes y and the last state hend (b, d, N) fp32. bc_ptr: B
    of the pairs (bf16 for BC_WORD 32, fp32 for 64); sbcb its batch stride in B's elements, sbcl the step stride in
    pair words.
    RANK > 0 (a power of two >= 16): dl_ptr holds low-rank dt (b, RANK, L) (sdd its rank stride) and wdt_ptr the
    (d, RANK) contiguous weight; delta = wdt @ dt per tile, one (BLOCK_L, RANK) x (RANK, BLOCK_D) dot in the weight's
    dtype (dt's rows rounded to it)."""
    b, offs_d, mask_d, offs_l, offs_r, offs_n, mask_nd, nd_off = _work_item(
        tl.program_id(0), dim, N, BLOCK_L, BLOCK_I, BLOCK_J, BLOCK_D, RANK)
    A2, bias, Dv, wdt = _constants(A_ptr, bias_ptr, D_ptr, wdt_ptr, nd_off, mask_nd, offs_d, mask_d, offs_r,
                                   HAS_BIAS, HAS_D, BLOCK_D, RANK)
    u_ptr = _row(u_ptr, b, sub)
    dl_ptr = _row(dl_ptr, b, sdb)
    if HAS_Z:
        z_ptr = _row(z_ptr, b, szb)
    y_ptr = _row(y_ptr, b, syb)
    if HAS_YO:
        yo_ptr = _row(yo_ptr, b, syb)
    words = _words(bc_ptr, b, sbcb, offs_n, BC_WORD)

    # compact tiles (S, J, BLOCK_D): lane slice j takes steps j * S + s of the tile
    S: tl.constexpr = BLOCK_L // BLOCK_J
    steps_c = tl.arange(0, BLOCK_J)[None, :, None] * S + tl.arange(0, S)[:, None, None]
    od = offs_d[None, None, :]
    h = tl.zeros([BLOCK_I, BLOCK_J, BLOCK_D], dtype=tl.float32)
    for it in tl.range(n_tiles, num_stages=STAGES):
        _, tm, mask_t, io_mask = _steps(it * BLOCK_L, offs_l, L, mask_d, REVERSE)
        tc = it * BLOCK_L + steps_c
        mask_c = (tc < L) & mask_d[None, None, :]
        tmc = _mem(tc, L, REVERSE)
        h, y = _scan_tile(u_ptr, dl_ptr, words, h, A2, bias, Dv, wdt, offs_d, offs_l, offs_r, tm, mask_t, io_mask,
                          tmc, mask_c, sud, sul, sdd, sdl, sbcl, HAS_D, HAS_BIAS, SOFTPLUS, SOFTPLUS_POLY, BLOCK_L,
                          BLOCK_J, BLOCK_D, FAST, RANK, DOT_PRECISION, BC_WORD)
        _epilogue(y, z_ptr, yo_ptr, y_ptr, od, tmc, mask_c, szd, szl, syd, syl, HAS_Z, HAS_YO, TANH_GATE, FAST)
    tl.store(hend_ptr + b * dim * N + nd_off, h, mask=mask_nd)


@triton.jit
def scan_bidir_infer_kernel(
    uf_ptr, ub_ptr, dlf_ptr, dlb_ptr, Af_ptr, Ab_ptr, bcf_ptr, bcb_ptr, Df_ptr, Db_ptr, biasf_ptr, biasb_ptr,
    wdtf_ptr, wdtb_ptr, z_ptr, y_ptr, hmid_ptr,
    sub, sud, sul: tl.constexpr, sdb, sdd, sdl: tl.constexpr, szb, szd, szl: tl.constexpr,
    syb, syd, syl: tl.constexpr, sbcb, sbcl: tl.constexpr,
    batch, dim, L, N, T,
    PHASE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SOFTPLUS_POLY: tl.constexpr, TANH_GATE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr, FAST: tl.constexpr, RANK: tl.constexpr = 0,
    DOT_PRECISION: tl.constexpr = "ieee", BC_WORD: tl.constexpr = 32,
):
    """Both directions of a bidirectional scan, one phase per launch. Grid (2 * b * cdiv(d, BLOCK_D),): program 2 w
    runs the forward direction of work item w (a batch row's BLOCK_D channels), 2 w + 1 the backward one (its scan
    step s at memory position L - 1 - s); the *f / *b pointers are each direction's inputs, which share strides.
    PHASE 1: the forward direction over positions [0, T), the backward over [T, L), each from a zero state, storing
    y (gated) as it is into the two halves of y and its state to hmid (2, b, d, N) fp32. PHASE 2: the forward over
    [T, L), the backward over [0, T), each from its phase-1 state, storing (y + the other direction's phase-1 y) / 2.
    Every element of y is so written once raw and once averaged, as the one-direction kernel's forward + reverse
    with HAS_YO do, and each launch has twice the programs (twice the warps per SM where one direction's grid
    leaves room)."""
    pid = tl.program_id(0)
    rev = pid % 2
    b, offs_d, mask_d, offs_l, offs_r, offs_n, mask_nd, nd_off = _work_item(
        pid // 2, dim, N, BLOCK_L, BLOCK_I, BLOCK_J, BLOCK_D, RANK)
    if rev == 1:
        u_ptr, dl_ptr, A_ptr, bc_ptr, D_ptr, bias_ptr, wdt_ptr = ub_ptr, dlb_ptr, Ab_ptr, bcb_ptr, Db_ptr, biasb_ptr, \
            wdtb_ptr
    else:
        u_ptr, dl_ptr, A_ptr, bc_ptr, D_ptr, bias_ptr, wdt_ptr = uf_ptr, dlf_ptr, Af_ptr, bcf_ptr, Df_ptr, biasf_ptr, \
            wdtf_ptr
    A2, bias, Dv, wdt = _constants(A_ptr, bias_ptr, D_ptr, wdt_ptr, nd_off, mask_nd, offs_d, mask_d, offs_r,
                                   HAS_BIAS, HAS_D, BLOCK_D, RANK)
    u_ptr = _row(u_ptr, b, sub)
    dl_ptr = _row(dl_ptr, b, sdb)
    if HAS_Z:
        z_ptr = _row(z_ptr, b, szb)
    y_ptr = _row(y_ptr, b, syb)
    words = _words(bc_ptr, b, sbcb, offs_n, BC_WORD)
    # this direction's scan steps [s0, s1); step s sits at position base + sgn * s
    split = T + rev * (L - 2 * T)  # phase 1 takes T steps forward, L - T backward
    s0 = 0 if PHASE == 1 else split
    s1 = split if PHASE == 1 else L
    base = rev * (L - 1)
    sgn = 1 - 2 * rev

    S: tl.constexpr = BLOCK_L // BLOCK_J
    steps_c = tl.arange(0, BLOCK_J)[None, :, None] * S + tl.arange(0, S)[:, None, None]
    od = offs_d[None, None, :]
    hrow = hmid_ptr + (rev * batch + b).to(tl.int64) * dim * N + nd_off
    if PHASE == 1:
        h = tl.zeros([BLOCK_I, BLOCK_J, BLOCK_D], dtype=tl.float32)
    else:  # loaded, then put in the loop's own layout (a slice of the 4-D tiles'): no conversion in the loop
        h0 = tl.load(hrow, mask=mask_nd, other=0.0)
        h = _last(tl.broadcast_to(h0[None, :, :, :], (BLOCK_L, BLOCK_I, BLOCK_J, BLOCK_D)), offs_l, BLOCK_L)
    for it in tl.range(tl.cdiv(s1 - s0, BLOCK_L), num_stages=STAGES):
        t = s0 + it * BLOCK_L + offs_l
        mask_t = t < s1
        tm = base + sgn * t
        tc = s0 + it * BLOCK_L + steps_c
        mask_c = (tc < s1) & mask_d[None, None, :]
        tmc = base + sgn * tc
        h, y = _scan_tile(u_ptr, dl_ptr, words, h, A2, bias, Dv, wdt, offs_d, offs_l, offs_r, tm, mask_t,
                          mask_t[:, None] & mask_d[None, :], tmc, mask_c, sud, sul, sdd, sdl, sbcl, HAS_D, HAS_BIAS,
                          SOFTPLUS, SOFTPLUS_POLY, BLOCK_L, BLOCK_J, BLOCK_D, FAST, RANK, DOT_PRECISION, BC_WORD)
        _epilogue(y, z_ptr, y_ptr, y_ptr, od, tmc, mask_c, szd, szl, syd, syl, HAS_Z, PHASE == 2, TANH_GATE, FAST)
    if PHASE == 1:
        tl.store(hrow, h, mask=mask_nd)
