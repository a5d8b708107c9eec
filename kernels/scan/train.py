"""Triton kernels of the selective scan (S6): fused forward and recomputing backward.

Shapes (``batch`` b, channels ``dim`` d, length L, state size N, groups G):
    u, delta, z, y          (b, d, L)      any float dtype, loaded as fp32; any strides (the mixer
                                           passes (b, L, d) views of its projections: no copies)
    A                       (d, N)         fp32
    B, C                    (b, G, N, L)   variable ("grouped" when G > 1), or (d, N) time-invariant
    D, delta_bias           (d,)
    h0 / last state         (b, d, N)      fp32
    seq_idx                 (b, L)         int32; the state restarts from zero where it changes
    checkpoints             (b, d, T/K, N) fp32, the state entering every K-th tile of BLOCK_L steps

Each program owns BLOCK_D channels of one batch row and walks its stretch of L in tiles of
BLOCK_L steps.  Inside a tile the recurrence h_t = a_t h_{t-1} + x_t is an associative scan of the
pairs (a_t, x_t) along axis 0 of a (BLOCK_L, N, BLOCK_D) tile.  That axis order makes Triton's
default layout put the channels on the lanes of a warp, the warps on N and all BLOCK_L steps
inside each thread: the scan is then a sequential chain in registers, the C.h reduction over N
is (mostly) in-thread, and per-(t, d) work (softplus, D skip, gate) is not repeated per n.
The carried state enters the scan at the tile's first step (so the products of a are dead code).
Nothing of size (b, d, L, N) is ever written to memory.

The backward walks the tiles in reverse: q_t = dL/dh_t by a reverse scan, the forward states of
each chunk of K tiles re-derived from its checkpoint into a small per-program scratch.

REVERSE walks every sequence from L-1 down to 0 (Vim's backward direction) by mapping the memory
index of each step; nothing is flipped.  The backward's dB/dC sums over the channels (on the
lanes) start, on the GPU, with one inline-PTX lane shuffle shared by dB and dC (PAIR_REDUCE).

Long sequences with few channels split L into ``nsplit`` stretches: a first pass (STATE_ONLY)
returns each stretch's end state from zero and its decay product, a few tiny PyTorch steps chain
them, and the full pass then starts every stretch from its true state.  The backward does the
same in reverse for the gradient carried into each stretch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mambazoo.kernels._math import sigmoid


@triton.jit
def _combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): h -> a2 (a1 h + x1) + x2
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _off(offs_d, tm, sd, sl: tl.constexpr):
    """(BLOCK_L, BLOCK_D) int32 element offsets inside one batch row of a (batch, dim, L) tensor with
    channel stride sd and step stride sl (a compile-time constant: unit-stride rows keep their vector
    loads).  The batch row's base pointer is moved once per program, in 64 bits (`_row`)."""
    return offs_d[None, :] * sd + tm[:, None] * sl


@triton.jit
def _row(ptr, b, sb):
    """ptr advanced to batch row b (64-bit: a (b, L, 2 d) in_proj output passes 2^31 elements)."""
    return ptr + b.to(tl.int64) * sb


@triton.jit
def _softplus_poly(v):
    """softplus(v) = max(v, 0) + log1p(e), e = exp(-|v|) in (0, 1], with log1p(e) = e q(e) and q a degree-6
    polynomial (least squares on [0, 1], relative error < 6e-6, also where 1 + e rounds to 1 in fp32): one
    special-function op (ex2) instead of two (ex2, lg2), which the forward's loop shares with its exponentials."""
    e = tl.exp2(tl.abs(v) * -1.4426950408889634)
    q = 0.016350654885172844 * e - 0.07282451540231705
    q = q * e + 0.15622563660144806
    q = q * e - 0.2385641485452652
    q = q * e + 0.3319026231765747
    q = q * e - 0.49993896484375
    q = q * e + 0.9999998211860657
    return tl.maximum(v, 0.0) + e * q


@triton.jit
def _dt_tile(dl_ptr, bias, offs, io_mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr,
             POLY: tl.constexpr = False):
    """delta (+ bias), softplus (POLY: _softplus_poly); returns (dt, pre-softplus value), both (BLOCK_L, BLOCK_D),
    0 off the mask."""
    v = tl.load(dl_ptr + offs, mask=io_mask, other=0.0).to(tl.float32)
    return _dt_value(v, bias[None, :], io_mask, HAS_BIAS, SOFTPLUS, FAST, POLY)


@triton.jit
def _dt_value(v, bias, io_mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr,
              POLY: tl.constexpr = False):
    """_dt_tile on delta v (fp32) already loaded (or computed: scan_infer's low-rank delta); bias broadcasts
    against v (channels last)."""
    if HAS_BIAS:
        v = v + bias
    dt = v
    if SOFTPLUS and POLY:
        dt = _softplus_poly(v)
    elif SOFTPLUS:
        e = 1.0 + tl.exp2(v * 1.4426950408889634)
        if FAST:  # one special-function op instead of libdevice's polynomial log
            lg = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [e], dtype=tl.float32,
                                           is_pure=True, pack=1)
        else:
            lg = tl.log2(e)
        dt = tl.where(v > 20.0, v, lg * 0.6931471805599453)
    dt = tl.where(io_mask, dt, 0.0)
    return dt, v


@triton.jit
def _mem(t, L, REVERSE: tl.constexpr):
    """Memory position of scan step t: the scan walks the sequence backwards when REVERSE."""
    m = t
    if REVERSE:
        m = L - 1 - t
    return m


@triton.jit
def _steps(t0, offs_l, L, mask_d, REVERSE: tl.constexpr):
    """The BLOCK_L scan steps of the tile starting at step t0: (steps t, memory positions tm, t < L, the
    (BLOCK_L, BLOCK_D) mask of in-range steps and channels)."""
    t = t0 + offs_l
    mask_t = t < L
    return t, _mem(t, L, REVERSE), mask_t, mask_t[:, None] & mask_d[None, :]


@triton.jit
def _reset_tile(seq_ptr, b, L, t, mask_t, SHIFT: tl.constexpr, REVERSE: tl.constexpr):
    """True where the state restarts at scan step t + SHIFT (its seq_idx differs from the step before it)."""
    tt = t + SHIFT
    ok = (tt > 0) & (tt < L)
    cur = tl.load(seq_ptr + b * L + _mem(tt, L, REVERSE), mask=ok, other=0)
    prev = tl.load(seq_ptr + b * L + _mem(tt - 1, L, REVERSE), mask=ok, other=0)
    return ok & (cur != prev)


@triton.jit
def _lane_xor1(x):
    """x from the partner lane (lane id xor 1), element by element (GPU only: PTX shuffle)."""
    xi = x.to(tl.int32, bitcast=True)
    yi = tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 1, 0x1f, 0xffffffff;", "=r,r", [xi],
                                   dtype=tl.int32, is_pure=False, pack=1)
    return yi.to(tl.float32, bitcast=True)


@triton.jit
def _a_tile(dl_ptr, bias, b, offs_d, t, L, sdd, sdl: tl.constexpr, A2, mask_d, seq_ptr,
            HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr, HAS_SEQ: tl.constexpr,
            REVERSE: tl.constexpr):
    """The decays a_t = exp(dt_t A) at scan steps t (BLOCK_L,) as a (BLOCK_L, BLOCK_N, BLOCK_D) tile:
    1 at t >= L, 0 where a packed sequence starts."""
    mask_t = t < L
    dt, _ = _dt_tile(dl_ptr, bias, _off(offs_d, _mem(t, L, REVERSE), sdd, sdl),
                     mask_t[:, None] & mask_d[None, :], HAS_BIAS, SOFTPLUS, FAST)
    return _decay(dt, A2, seq_ptr, b, L, t, mask_t, HAS_SEQ, REVERSE)


@triton.jit
def _decay(dt, A2, seq_ptr, b, L, t, mask_t, HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr):
    """a_t = exp(dt_t A) as a (BLOCK_L, BLOCK_N, BLOCK_D) tile, 0 where a packed sequence starts."""
    a = tl.exp2(dt[:, None, :] * A2[None, :, :])
    if HAS_SEQ:
        reset = _reset_tile(seq_ptr, b, L, t, mask_t, 0, REVERSE)
        a = tl.where(reset[:, None, None], 0.0, a)
    return a


@triton.jit
def _tile_terms(dl_ptr, u_ptr, B_ptr, bias, A2, seq_ptr, b, t, tm, mask_t, io_mask, L, N,
                offs_d, offs_n, mask_d, mask_n, sdd, sdl: tl.constexpr, sud, sul: tl.constexpr, sBn,
                sBl: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr,
                HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr, B_INV: tl.constexpr):
    """What the recurrence needs at scan steps t (memory steps tm): dt and its pre-softplus value v
    (BLOCK_L, BLOCK_D), u, the B tile, the decays a and the inputs x = dt u B (BLOCK_L, BLOCK_N, BLOCK_D)."""
    dt, v, u = _dt_u(dl_ptr, u_ptr, bias, tm, io_mask, offs_d, sdd, sdl, sud, sul, HAS_BIAS, SOFTPLUS, FAST)
    if B_INV:
        Bt = _bc_inv(B_ptr, N, offs_d, offs_n, mask_d, mask_n)
    else:
        Bt = _bc_var(B_ptr, sBn, sBl, offs_n, tm, mask_n, mask_t)
    a, x = _decay_x(dt, u, Bt, A2, seq_ptr, b, L, t, mask_t, HAS_SEQ, REVERSE)
    return dt, v, u, Bt, a, x


@triton.jit
def _dt_u(dl_ptr, u_ptr, bias, tm, io_mask, offs_d, sdd, sdl: tl.constexpr, sud, sul: tl.constexpr,
          HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr, POLY: tl.constexpr = False):
    """dt, its pre-softplus value and u at memory steps tm: (BLOCK_L, BLOCK_D) each."""
    dt, v = _dt_tile(dl_ptr, bias, _off(offs_d, tm, sdd, sdl), io_mask, HAS_BIAS, SOFTPLUS, FAST, POLY)
    u = tl.load(u_ptr + _off(offs_d, tm, sud, sul), mask=io_mask, other=0.0).to(tl.float32)
    return dt, v, u


@triton.jit
def _decay_x(dt, u, Bt, A2, seq_ptr, b, L, t, mask_t, HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr):
    """The decays a and the inputs x = dt u B: (BLOCK_L, BLOCK_N, BLOCK_D) each."""
    a = _decay(dt, A2, seq_ptr, b, L, t, mask_t, HAS_SEQ, REVERSE)
    return a, (dt * u)[:, None, :] * Bt


@triton.jit
def _bc_pairs(ptr, sn, sl: tl.constexpr, offs_n, tm, mask_n, mask_t):
    """B and C of this program's batch row from one int32 word per (step, state): B's bf16 bits in the low half,
    C's in the high half (a (b, L, 2 N) bf16 buffer with B and C interleaved; strides in words). Returns two
    (BLOCK_L, BLOCK_N, 1) fp32 tiles: a bf16 is the top half of its fp32, so each unpacks with one integer op."""
    w = tl.load(ptr.to(tl.pointer_type(tl.int32)) + offs_n[None, :] * sn + tm[:, None] * sl,
                mask=mask_t[:, None] & mask_n[None, :], other=0)
    Bt = (w << 16).to(tl.float32, bitcast=True)
    Ct = (w & -65536).to(tl.float32, bitcast=True)
    return Bt[:, :, None], Ct[:, :, None]


@triton.jit
def _rscan(an, c):
    """The reverse scan along axis 0 (q_t = c_t + an_t q_{t+1}) as flip, forward scan, flip: Triton 3.6
    lowers a reverse associative_scan with lane shuffles even when the axis lies inside each thread."""
    acum, q = tl.associative_scan((tl.flip(an, 0), tl.flip(c, 0)), axis=0, combine_fn=_combine)
    return tl.flip(acum, 0), tl.flip(q, 0)


@triton.jit
def _next_steps(a, nxt, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """s[l] = a[l + 1] along axis 0 of a (BLOCK_L, BLOCK_N, BLOCK_D) tile, s[BLOCK_L - 1] = nxt (BLOCK_N, BLOCK_D).
    Built from in-thread splits and joins (axis 0 lies inside each thread): no data moves between lanes.
    BLOCK_L is 1, 2, 4, 8 or 16."""
    if BLOCK_L == 1:
        return nxt[None, :, :]
    p = tl.permute(a, (1, 2, 0))  # (BN, BD, BL): the steps last, where split/join work
    if BLOCK_L == 2:
        s = _shift2(p, nxt, BLOCK_N, BLOCK_D)
    elif BLOCK_L == 4:
        s = _shift4(p, nxt, BLOCK_N, BLOCK_D)
    elif BLOCK_L == 8:
        s = _shift8(p, nxt, BLOCK_N, BLOCK_D)
    else:
        tl.static_assert(BLOCK_L == 16, "the backward tile holds 1, 2, 4, 8 or 16 steps")
        s = _shift16(p, nxt, BLOCK_N, BLOCK_D)
    return tl.permute(s, (2, 0, 1))


# _shiftK: p (BN, BD, K) -> s with s[..., i] = p[..., i + 1], s[..., K - 1] = nxt.  With even / odd steps
# ev[i] = p[2i], od[i] = p[2i + 1]: s[2i] = od[i] and s[2i + 1] = ev[i + 1], the shift of ev by one.
@triton.jit
def _shift2(p, nxt, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    _, od = tl.split(p)
    return tl.reshape(tl.join(od, nxt), (BLOCK_N, BLOCK_D, 2))


@triton.jit
def _shift4(p, nxt, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    ev, od = tl.split(tl.reshape(p, (BLOCK_N, BLOCK_D, 2, 2)))
    return tl.reshape(tl.join(od, _shift2(ev, nxt, BLOCK_N, BLOCK_D)), (BLOCK_N, BLOCK_D, 4))


@triton.jit
def _shift8(p, nxt, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    ev, od = tl.split(tl.reshape(p, (BLOCK_N, BLOCK_D, 4, 2)))
    return tl.reshape(tl.join(od, _shift4(ev, nxt, BLOCK_N, BLOCK_D)), (BLOCK_N, BLOCK_D, 8))


@triton.jit
def _shift16(p, nxt, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    ev, od = tl.split(tl.reshape(p, (BLOCK_N, BLOCK_D, 8, 2)))
    return tl.reshape(tl.join(od, _shift8(ev, nxt, BLOCK_N, BLOCK_D)), (BLOCK_N, BLOCK_D, 16))


@triton.jit
def _take_right(a, b):
    return b


@triton.jit
def _take_left(a, b):
    return a


@triton.jit
def _last(v, offs_l, BLOCK_L: tl.constexpr):
    """v[BLOCK_L - 1] of a tile whose axis 0 is L (a reduction that keeps its right operand: free
    when L lies inside each thread)."""
    return tl.reduce(v, 0, _take_right)


@triton.jit
def _first(v, offs_l):
    """v[0] along axis 0."""
    return tl.reduce(v, 0, _take_left)


@triton.jit
def _bc_var(ptr, sn, sl: tl.constexpr, offs_n, tm, mask_n, mask_t):
    """Variable B or C of this program's batch row and group (ptr moved there; strides sn, sl) as a
    (BLOCK_L, BLOCK_N, 1) fp32 tile."""
    rows = offs_n * sn
    v = tl.load(ptr + rows[None, :] + tm[:, None] * sl, mask=mask_t[:, None] & mask_n[None, :], other=0.0)
    return v.to(tl.float32)[:, :, None]



@triton.jit
def _bc_inv(ptr, N, offs_d, offs_n, mask_d, mask_n):
    """Time-invariant B or C (d, N) as a (1, BLOCK_N, BLOCK_D) fp32 tile."""
    v = tl.load(ptr + offs_d[None, :] * N + offs_n[:, None], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    return v.to(tl.float32)[None, :, :]


@triton.jit
def _add_tn(ptrs, val, mask):
    """Adds a (BLOCK_L, BLOCK_N) tile of dB or dC partial sums into memory with relaxed atomics (the
    default acq_rel ones cost a fence each: docs/kernel_notes.md)."""
    tl.atomic_add(ptrs, val, mask=mask, sem="relaxed")


@triton.jit
def _program(work, dim, N, dpg_b, dpg_c, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """What work item `work` (a block of BLOCK_D channels of one batch row) of either pass owns: (work, stretch s,
    batch row b, first channel d0, the channel / state / step offsets and masks, the B and C groups of its
    channels)."""
    pid = work
    s = tl.program_id(1)
    n_dblk = tl.cdiv(dim, BLOCK_D)
    b = pid // n_dblk
    d0 = (pid % n_dblk) * BLOCK_D
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    mask_d = offs_d < dim
    mask_n = offs_n < N
    mask_nd = mask_n[:, None] & mask_d[None, :]
    return pid, s, b, d0, offs_d, offs_n, offs_l, mask_d, mask_n, mask_nd, d0 // dpg_b, d0 // dpg_c


@triton.jit
def _channel_params(A_ptr, bias_ptr, D_ptr, offs_d, offs_n, N, mask_d, mask_nd, HAS_BIAS: tl.constexpr,
                    HAS_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """The per-channel parameters both passes load once per program: A (BLOCK_N, BLOCK_D) fp32, A * log2(e) (so
    that exp(dt A) = exp2(dt A2)), the delta bias and D (BLOCK_D,) (zeros when absent)."""
    An = tl.load(A_ptr + offs_d[None, :] * N + offs_n[:, None], mask=mask_nd, other=0.0).to(tl.float32)
    bias, Dv = _bias_d(bias_ptr, D_ptr, offs_d, mask_d, HAS_BIAS, HAS_D, BLOCK_D)
    return An, An * 1.4426950408889634, bias, Dv


@triton.jit
def _bias_d(bias_ptr, D_ptr, offs_d, mask_d, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """The delta bias and D of channels offs_d as (BLOCK_D,) fp32 (zeros when absent)."""
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return bias, Dv


@triton.jit
def _inputs_at_row(u_ptr, dl_ptr, B_ptr, C_ptr, b, gb, gc, sub, sdb, sBb, sBg, sCb, sCg,
                   B_INV: tl.constexpr, C_INV: tl.constexpr):
    """The inputs both passes read, moved to batch row b (and B / C to their groups) once, in 64 bits. (z is moved
    by the caller under HAS_Z: a None pointer may not be passed to a jitted function's tensor argument.)"""
    u_ptr = _row(u_ptr, b, sub)
    dl_ptr = _row(dl_ptr, b, sdb)
    if not B_INV:
        B_ptr = _row(B_ptr, b, sBb) + gb * sBg
    if not C_INV:
        C_ptr = _row(C_ptr, b, sCb) + gc * sCg
    return u_ptr, dl_ptr, B_ptr, C_ptr


@triton.jit
def scan_fwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, h0_ptr,
    y_ptr, hs_ptr, hend_ptr, pend_ptr,
    sub, sud, sul: tl.constexpr, sdb, sdd, sdl: tl.constexpr, szb, szd, szl: tl.constexpr,
    syb, syd, syl: tl.constexpr, sBb, sBg, sBn, sBl: tl.constexpr, sCb, sCg, sCn, sCl: tl.constexpr,
    dim, L, N, GB, GC, dpg_b, dpg_c, tiles_per_split, n_tiles_total, nsplit, n_chunks, K: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr,
    HAS_H0: tl.constexpr, SOFTPLUS: tl.constexpr, B_INV: tl.constexpr, C_INV: tl.constexpr,
    STATE_ONLY: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, FAST: tl.constexpr,
    STAGES: tl.constexpr = 1, STORE_STATES: tl.constexpr = True, HAS_YO: tl.constexpr = False, yo_ptr=None,
    BC_PAIRS: tl.constexpr = False, SOFTPLUS_POLY: tl.constexpr = False,
):
    """Grid (b * cdiv(d, BLOCK_D), nsplit).  Full pass: writes y, the tile states (STORE_STATES: only the
    backward reads them) and the end state of each stretch (hend (b, d, nsplit, N)).  STATE_ONLY: writes hend
    from a zero start and the decay product pend (b, d, nsplit, N) of each stretch.  HAS_YO: y = (y + yo) / 2
    with yo (b, d, L) in y's strides (the other direction's output). BC_PAIRS: B_ptr holds B and C as bf16
    pairs, one int32 word per (step, state) (sBn, sBl in words; C_ptr unused): half the shared-memory loads of
    two fp32 tiles, whose broadcast over the channel lanes is what bounds this loop next to the exponentials.

    Tiles are (BLOCK_L, BLOCK_N, BLOCK_D): on the GPU the lanes of a warp take 32 channels, the
    warps split N, and each thread holds all BLOCK_L steps, so the scan over L and most of the
    C.h reduction over N stay inside a thread, and per-(t, d) work (softplus, D, gate) is not
    repeated for every n."""
    pid, s, b, d0, offs_d, offs_n, offs_l, mask_d, mask_n, mask_nd, gb, gc = _program(
        tl.program_id(0), dim, N, dpg_b, dpg_c, BLOCK_D, BLOCK_N, BLOCK_L)
    u_ptr, dl_ptr, B_ptr, C_ptr = _inputs_at_row(u_ptr, dl_ptr, B_ptr, C_ptr, b, gb, gc, sub, sdb, sBb, sBg, sCb, sCg,
                                                 B_INV, C_INV)
    if HAS_Z:
        z_ptr = _row(z_ptr, b, szb)
    if not STATE_ONLY:
        y_ptr = _row(y_ptr, b, syb)
        if HAS_YO:
            yo_ptr = _row(yo_ptr, b, syb)  # the output to average with: y's strides

    An, A2, bias, Dv = _channel_params(A_ptr, bias_ptr, D_ptr, offs_d, offs_n, N, mask_d, mask_nd, HAS_BIAS, HAS_D,
                                       BLOCK_D)  # An: the backward's

    state_off = ((b * dim + offs_d[None, :]) * nsplit + s) * N + offs_n[:, None]  # (BN, BD) into (b, d, nsplit, N)
    h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if HAS_H0 and not STATE_ONLY:
        h = tl.load(h0_ptr + state_off, mask=mask_nd, other=0.0).to(tl.float32)
    prod = tl.full([BLOCK_N, BLOCK_D], 1.0, dtype=tl.float32)

    tile0 = s * tiles_per_split
    t_begin = tile0 * BLOCK_L
    # the last stretch may hold fewer tiles: its extra tiles lie past L, fully masked (identity steps).
    # STAGES > 1: Triton's pipeliner copies the inputs of the next tiles to shared memory (cp.async) while
    # this one computes; one warp per program leaves few warps to hide the load latency otherwise.
    for it in tl.range(tiles_per_split, num_stages=STAGES):
        t, tm, mask_t, io_mask = _steps(t_begin + it * BLOCK_L, offs_l, L, mask_d, REVERSE)
        if BC_PAIRS:
            Bt, Ct = _bc_pairs(B_ptr, sBn, sBl, offs_n, tm, mask_n, mask_t)
            dt, _, u = _dt_u(dl_ptr, u_ptr, bias, tm, io_mask, offs_d, sdd, sdl, sud, sul, HAS_BIAS, SOFTPLUS, FAST,
                             SOFTPLUS_POLY)
            a, x = _decay_x(dt, u, Bt, A2, seq_ptr, b, L, t, mask_t, HAS_SEQ, REVERSE)
        else:
            dt, _, u, Bt, a, x = _tile_terms(dl_ptr, u_ptr, B_ptr, bias, A2, seq_ptr, b, t, tm, mask_t, io_mask, L, N,
                                             offs_d, offs_n, mask_d, mask_n, sdd, sdl, sud, sul, sBn, sBl, HAS_BIAS,
                                             SOFTPLUS, FAST, HAS_SEQ, REVERSE, B_INV)
        if STATE_ONLY:
            acum, hz = tl.associative_scan((a, x), axis=0, combine_fn=_combine)
            prod = prod * _last(acum, offs_l, BLOCK_L)
            h = _last(hz, offs_l, BLOCK_L) + _last(acum, offs_l, BLOCK_L) * h
        else:
            if STORE_STATES and (tile0 + it) % K == 0:  # a checkpoint for the backward every K tiles
                tl.store(hs_ptr + ((b * dim + offs_d[None, :]) * n_chunks + (tile0 + it) // K) * N + offs_n[:, None],
                         h, mask=mask_nd & (tile0 + it < n_tiles_total))
            # the carried state enters at the tile's first step; the products of a are then dead code
            x = tl.where(offs_l[:, None, None] == 0, x + a * h[None, :, :], x)
            _, hfull = tl.associative_scan((a, x), axis=0, combine_fn=_combine)
            if C_INV:
                Ct = _bc_inv(C_ptr, N, offs_d, offs_n, mask_d, mask_n)
            elif not BC_PAIRS:
                Ct = _bc_var(C_ptr, sCn, sCl, offs_n, tm, mask_n, mask_t)
            y = tl.sum(hfull * Ct, axis=1)
            if HAS_D:
                y += Dv[None, :] * u
            if HAS_Z:
                zv = tl.load(z_ptr + _off(offs_d, tm, szd, szl), mask=io_mask, other=0.0).to(tl.float32)
                y = y * zv * sigmoid(zv, FAST)
            if HAS_YO:  # the mean of the two directions of a bidirectional mixer, in the same pass
                yo = tl.load(yo_ptr + _off(offs_d, tm, syd, syl), mask=io_mask, other=0.0).to(tl.float32)
                y = 0.5 * (y + yo)
            tl.store(y_ptr + _off(offs_d, tm, syd, syl), y.to(y_ptr.dtype.element_ty), mask=io_mask)
            h = _last(hfull, offs_l, BLOCK_L)
    tl.store(hend_ptr + state_off, h, mask=mask_nd)
    if STATE_ONLY:
        tl.store(pend_ptr + state_off, prod, mask=mask_nd)


@triton.jit
def scan_bwd_kernel(
    u_base, dl_base, A_ptr, B_base, C_base, D_ptr, z_base, bias_ptr, seq_ptr, hs_ptr, dout_base, qin_ptr,
    du_base, ddl_base, dz_base, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr, qend_ptr, rend_ptr, scratch_ptr,
    sub, sud, sul: tl.constexpr, sdb, sdd, sdl: tl.constexpr, szb, szd, szl: tl.constexpr,
    sob, sod, sol: tl.constexpr, sgub, sgud, sgul: tl.constexpr, sgdb, sgdd, sgdl: tl.constexpr,
    sgzb, sgzd, sgzl: tl.constexpr, sBb, sBg, sBn, sBl: tl.constexpr, sCb, sCg, sCn, sCl: tl.constexpr,
    dim, L, N, GB, GC, dpg_b, dpg_c, tiles_per_split, n_tiles_total, nsplit, n_chunks, K, n_work,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr,
    HAS_QIN: tl.constexpr, HAS_H0: tl.constexpr, SOFTPLUS: tl.constexpr,
    B_INV: tl.constexpr, C_INV: tl.constexpr, STATE_ONLY: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, FAST: tl.constexpr,
    PAIR_REDUCE: tl.constexpr = False, PERSISTENT: tl.constexpr = False,
):
    """Grid (programs, nsplit): each program takes work items w = slot, slot + programs, ... < n_work =
    b * cdiv(d, BLOCK_D) (BLOCK_D channels of one batch row) and walks its stretch of L backwards, tile by tile,
    with its own scratch (K states of (BLOCK_N, BLOCK_D)).

    q_t = dL/dx_t = dL/dh_t obeys q_t = C_t dy_t + a_{t+1} q_{t+1}: a reverse scan of the pairs
    (a_{t+1}, C_t dy_t).  qin (b, d, nsplit, N) is q entering each stretch from its right.
    Full pass: recomputes the states of each tile from its stored entering state and writes du,
    ddelta, dz; adds dA, dD, dbias (fp32, per program) and dB, dC (fp32, per tile, reduced over
    the program's channels) with atomics; writes dh0 = a_0 q_0 (b, d, N).
    STATE_ONLY: needs no u, B or states; writes q at the stretch's first step from a zero carry
    (qend) and the product of the a_{t+1} of the stretch (rend).
    Tiles are (BLOCK_L, BLOCK_N, BLOCK_D) as in the forward."""
    # PERSISTENT: the grid holds at most the programs that fit on the GPU at once, each taking work items
    # (blocks of channels of one batch row) in turn, so the scratch is sized by programs, not by work items.
    # Otherwise one work item per program: the one-trip loop folds away (the outer loop costs registers:
    # 168 -> 214 per thread at the (4, 8) tile on sm_90).
    slot = tl.program_id(0)
    if PERSISTENT:
        stop = n_work
        step = tl.num_programs(0)
    else:
        stop = slot + 1
        step = 1
    for work in range(slot, stop, step):
        pid, s, b, d0, offs_d, offs_n, offs_l, mask_d, mask_n, mask_nd, gb, gc = _program(
            work, dim, N, dpg_b, dpg_c, BLOCK_D, BLOCK_N, BLOCK_L)
        u_ptr, dl_ptr, B_ptr, C_ptr = _inputs_at_row(u_base, dl_base, B_base, C_base, b, gb, gc, sub, sdb, sBb, sBg,
                                                     sCb, sCg, B_INV, C_INV)
        if HAS_Z:
            z_ptr = _row(z_base, b, szb)
        dout_ptr = _row(dout_base, b, sob)
        du_ptr = _row(du_base, b, sgub)
        ddl_ptr = _row(ddl_base, b, sgdb)
        dz_ptr = dz_base
        if HAS_Z:
            dz_ptr = _row(dz_base, b, sgzb)
        first = offs_l[:, None, None] == 0
        last = offs_l[:, None, None] == BLOCK_L - 1

        An, A2, bias, Dv = _channel_params(A_ptr, bias_ptr, D_ptr, offs_d, offs_n, N, mask_d, mask_nd, HAS_BIAS,
                                           HAS_D, BLOCK_D)

        state_off = ((b * dim + offs_d[None, :]) * nsplit + s) * N + offs_n[:, None]  # (BN, BD)
        q = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        if HAS_QIN and not STATE_ONLY:
            q = tl.load(qin_ptr + state_off, mask=mask_nd, other=0.0)
        rprod = tl.full([BLOCK_N, BLOCK_D], 1.0, dtype=tl.float32)
        dA_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dB_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dC_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)

        tile0 = s * tiles_per_split
        t_begin = tile0 * BLOCK_L
        # the last stretch may hold fewer tiles: its extra tiles lie past L, fully masked (identity steps)
        scratch = (scratch_ptr + (slot * nsplit + s) * K * BLOCK_N * BLOCK_D  # this program's K (BN, BD) states
                   + offs_n[:, None] * BLOCK_D + offs_d[None, :] - d0)
        n_tiles = tiles_per_split
        # the decay just past this stretch (1 past L): a_{t+1} of the stretch's last step
        a_next = _first(_a_tile(dl_ptr, bias, b, offs_d, t_begin + n_tiles * BLOCK_L + offs_l, L, sdd, sdl, A2, mask_d,
                                seq_ptr, HAS_BIAS, SOFTPLUS, FAST, HAS_SEQ, REVERSE), offs_l)
        for it_rev in range(n_tiles):
            it = n_tiles - 1 - it_rev
            j = it % K
            if not STATE_ONLY:
                if j == K - 1:
                    # entering a chunk from its end: re-derive the states entering each of its K tiles
                    # from the chunk's checkpoint into this program's scratch (b, d, N per tile)
                    tc = tile0 + it - j
                    hc = tl.load(hs_ptr + ((b * dim + offs_d[None, :]) * n_chunks + tc // K) * N + offs_n[:, None],
                                mask=mask_nd & (tc < n_tiles_total), other=0.0)
                    for jj in range(K):
                        tl.store(scratch + jj * BLOCK_N * BLOCK_D, hc)
                        t, tm, mask_t, io_mask = _steps((tc + jj) * BLOCK_L, offs_l, L, mask_d, REVERSE)
                        _, _, _, _, a, x = _tile_terms(dl_ptr, u_ptr, B_ptr, bias, A2, seq_ptr, b, t, tm, mask_t, io_mask, L, N,
                                            offs_d, offs_n, mask_d, mask_n, sdd, sdl, sud, sul, sBn, sBl, HAS_BIAS, SOFTPLUS, FAST,
                                            HAS_SEQ, REVERSE, B_INV)
                        _, hh = tl.associative_scan((a, tl.where(first, x + a * hc[None, :, :], x)), axis=0,
                                                    combine_fn=_combine)
                        hc = _last(hh, offs_l, BLOCK_L)
                    tl.debug_barrier()
            t, tm, mask_t, io_mask = _steps(t_begin + it * BLOCK_L, offs_l, L, mask_d, REVERSE)
            dout = tl.load(dout_ptr + _off(offs_d, tm, sod, sol), mask=io_mask, other=0.0).to(tl.float32)
            dy = dout
            if HAS_Z:
                zv = tl.load(z_ptr + _off(offs_d, tm, szd, szl), mask=io_mask, other=0.0).to(tl.float32)
                sz = sigmoid(zv, FAST)
                dy = dout * zv * sz
            if C_INV:
                Ct = _bc_inv(C_ptr, N, offs_d, offs_n, mask_d, mask_n)
            else:
                Ct = _bc_var(C_ptr, sCn, sCl, offs_n, tm, mask_n, mask_t)
            c = Ct * dy[:, None, :]
            if STATE_ONLY:
                # a_{t+1}: 1 past the end so that q_L (the last state's gradient) flows into q_{L-1}
                an = _a_tile(dl_ptr, bias, b, offs_d, t + 1, L, sdd, sdl, A2, mask_d, seq_ptr,
                             HAS_BIAS, SOFTPLUS, FAST, HAS_SEQ, REVERSE)
                rcum, qz = _rscan(an, c)
                rprod = rprod * _first(rcum, offs_l)
                q = _first(qz, offs_l) + _first(rcum, offs_l) * q
            else:
                # recompute the forward decays and inputs of this tile
                dt, v, u, Bt, a, x = _tile_terms(dl_ptr, u_ptr, B_ptr, bias, A2, seq_ptr, b, t, tm, mask_t, io_mask, L, N,
                                                 offs_d, offs_n, mask_d, mask_n, sdd, sdl, sud, sul, sBn, sBl, HAS_BIAS,
                                                 SOFTPLUS, FAST, HAS_SEQ, REVERSE, B_INV)
                # a_{t+1}: a_t moved up one step inside the thread; the tile's last step takes the first
                # decay of the tile after it (carried from the previous iteration)
                an = _next_steps(a, a_next, BLOCK_L, BLOCK_N, BLOCK_D)
                a_next = _first(a, offs_l)
                # the carried q enters at the tile's last step; the products of a are then dead code
                c = tl.where(last, c + an * q[None, :, :], c)
                _, qt = _rscan(an, c)
                q = _first(qt, offs_l)
                # recompute the forward states of this tile from its stored entering state
                dtu = dt * u
                h_in = tl.load(scratch + j * BLOCK_N * BLOCK_D)
                _, h = tl.associative_scan((a, tl.where(first, x + a * h_in[None, :, :], x)), axis=0,
                                           combine_fn=_combine)
                hm = h - x  # a_t h_{t-1}
                if HAS_Z:
                    y = tl.sum(h * Ct, axis=1) + Dv[None, :] * u
                    dz = dout * y * sz * (1.0 + zv * (1.0 - sz))
                    tl.store(dz_ptr + _off(offs_d, tm, sgzd, sgzl), dz.to(dz_ptr.dtype.element_ty), mask=io_mask)
                qB = tl.sum(qt * Bt, axis=1)  # (BL, BD)
                du = dt * qB + dy * Dv[None, :]
                tl.store(du_ptr + _off(offs_d, tm, sgud, sgul), du.to(du_ptr.dtype.element_ty), mask=io_mask)
                qhm = qt * hm
                ddt = u * qB + tl.sum(qhm * An[None, :, :], axis=1)
                if SOFTPLUS:
                    ddt = ddt * sigmoid(v, FAST)
                ddt = tl.where(io_mask, ddt, 0.0)
                tl.store(ddl_ptr + _off(offs_d, tm, sgdd, sgdl), ddt.to(ddl_ptr.dtype.element_ty), mask=io_mask)
                dbias_acc += tl.sum(ddt, axis=0)
                dD_acc += tl.sum(dy * u, axis=0)
                dA_acc += tl.sum(qhm * dt[:, None, :], axis=0)
                if PAIR_REDUCE and FAST and not B_INV and not C_INV:
                    # dB and dC summed over the channels together: lane pairs (d, d^1) first swap halves
                    # (one shuffle per (t, n) for both), then the tree continues over the other lanes
                    pb = qt * dtu[:, None, :]
                    pc = h * dy[:, None, :]
                    odd = (offs_d % 2 == 1)[None, None, :]
                    r = tl.where(odd, pc, pb) + _lane_xor1(tl.where(odd, pb, pc))
                    r = tl.sum(tl.reshape(r, [BLOCK_L, BLOCK_N, BLOCK_D // 2, 2]), axis=2)  # [..., 0] dB, [..., 1] dC
                    jj2 = tl.arange(0, 2)[None, None, :]
                    rows_b = ((b * GB + gb) * N + offs_n) * L
                    rows_c = ((b * GC + gc) * N + offs_n) * L
                    ptrs = tl.where(jj2 == 0, dB_ptr + (rows_b[None, :] + tm[:, None])[:, :, None],
                                    dC_ptr + (rows_c[None, :] + tm[:, None])[:, :, None])
                    tl.atomic_add(ptrs, r, mask=(mask_t[:, None] & mask_n[None, :])[:, :, None] & (jj2 < 2),
                                  sem="relaxed")
                else:
                    if B_INV:
                        dB_acc += tl.sum(qt * dtu[:, None, :], axis=0)
                    else:
                        dBt = tl.sum(qt * dtu[:, None, :], axis=2)  # (BL, BN)
                        rows = ((b * GB + gb) * N + offs_n) * L
                        _add_tn(dB_ptr + rows[None, :] + tm[:, None], dBt, mask_t[:, None] & mask_n[None, :])
                    if C_INV:
                        dC_acc += tl.sum(h * dy[:, None, :], axis=0)
                    else:
                        dCt = tl.sum(h * dy[:, None, :], axis=2)
                        rows = ((b * GC + gc) * N + offs_n) * L
                        _add_tn(dC_ptr + rows[None, :] + tm[:, None], dCt, mask_t[:, None] & mask_n[None, :])
        if STATE_ONLY:
            tl.store(qend_ptr + state_off, q, mask=mask_nd)
            tl.store(rend_ptr + state_off, rprod, mask=mask_nd)
        else:
            nd_off = offs_d[None, :] * N + offs_n[:, None]
            tl.atomic_add(dA_ptr + nd_off, dA_acc, mask=mask_nd, sem="relaxed")
            if B_INV:
                tl.atomic_add(dB_ptr + nd_off, dB_acc, mask=mask_nd, sem="relaxed")
            if C_INV:
                tl.atomic_add(dC_ptr + nd_off, dC_acc, mask=mask_nd, sem="relaxed")
            if HAS_D:
                tl.atomic_add(dD_ptr + offs_d, dD_acc, mask=mask_d, sem="relaxed")
            if HAS_BIAS:
                tl.atomic_add(dbias_ptr + offs_d, dbias_acc, mask=mask_d, sem="relaxed")
            if HAS_H0:
                if s == 0:
                    # dh_{-1} = a_0 q_0
                    t0 = offs_l * 0
                    m0 = (offs_l == 0)[:, None] & mask_d[None, :]
                    dt0, _ = _dt_tile(dl_ptr, bias, _off(offs_d, _mem(t0, L, REVERSE), sdd, sdl), m0, HAS_BIAS, SOFTPLUS, FAST)
                    dt0 = tl.sum(dt0, axis=0)  # (BD,)
                    a0 = tl.exp2(dt0[None, :] * A2)
                    tl.store(dh0_ptr + (b * dim + offs_d[None, :]) * N + offs_n[:, None], a0 * q, mask=mask_nd)
