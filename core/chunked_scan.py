"""The CPU selective scan: a cache-sized, checkpointed recurrence with a hand-written backward.

``selective_scan_chunked`` has the contract of ``mambazoo.core.scan.selective_scan_ref`` (the sequential
oracle): same arguments, same result up to fp32 rounding, every gradient. How it gets there:

* Time-major layouts. dt, u and y are held as (L, batch, dim) and B, C as (L, batch, groups, N), so the
  state of one step, (batch, dim, N), is one contiguous block and every per-step op streams.
* Chunks of T steps (T sized so a chunk's (T, batch, dim, N) buffers stay in the core's cache; the last
  chunk is simply shorter: nothing is padded). Per chunk, the decays a = exp(dt*A) (every exponent <= 0,
  so stable for any step size: exp(-50) is just a tiny number) and the inputs x = dt*u*B are formed in
  two reused buffers, the recurrence h_t = a_t h_{t-1} + x_t runs as one in-place fused multiply-add per
  step, and y_t = sum_n C_t[n] h_t[n] is one batched matrix product per chunk. No (batch, dim, L, N)
  tensor ever exists: the forward streams the (batch, dim, L) inputs once.
* The forward keeps only the state entering each chunk. The backward walks the chunks in reverse,
  recomputes that chunk's a and h from its checkpoint, runs the reverse recurrence
  g_t = C_t dy_t + a_{t+1} g_{t+1} (one fused op per step) and turns g into the input gradients with
  batched matrix products and chunk-wide elementwise passes (formulas in ``_Scan._backward``).
* One intra-op thread inside: every op is one step or one cache-sized chunk, too small to pay for a parallel
  region (with a second thread on a busy 2-core machine the backward ran 4-20x slower). The caller's other threads
  serve instead as whole batch parts: with n torch threads the batch is cut into up to n contiguous slices, each
  scanned (forward, and backward from its own checkpoints) on a worker thread of its own while torch's ops release
  the interpreter lock; only where a part's per-step state is large enough that its ops outlast the Python
  overhead between them (``_MIN_PART_STEP``). dA (and an invariant B's or C's gradient) is the sum of the parts'.
* seq_idx: the decay into the first step of each packed sequence is set to exactly 0, so no state and
  no gradient crosses the boundary.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from mambazoo.core.scan_ref import _finish, _segment_starts, check_scan_inputs, initial_state_f32, time_step

__all__ = ["selective_scan_chunked", "default_chunk_size"]

_CHUNK_BYTES = 2 << 20  # one (T, batch, dim, N) fp32 chunk buffer (the backward keeps three)


def default_chunk_size(batch: int, dim: int, N: int, L: int) -> int:
    """Steps per chunk: about 2 MiB of fp32 state per chunk buffer, between 4 and 32 steps, at most L."""
    per_step = max(1, batch * dim * N * 4)
    return max(1, min(L, max(4, min(32, _CHUNK_BYTES // per_step))))


class _one_thread:
    """Within the block torch uses one intra-op thread (the caller's setting is restored after). The scan's ops are
    one step's state or one cache-sized chunk: a parallel region per op costs more than it saves, and far more when
    the other core is busy (figures in docs/benchmarks.md, CPU training)."""

    def __enter__(self) -> int:
        # while torch.compile traces, leave the threads alone: get/set_num_threads would break the graph
        self.n = 1 if torch.compiler.is_compiling() else torch.get_num_threads()
        if self.n != 1:
            torch.set_num_threads(1)
        return self.n  # the caller's thread count: how many batch parts may run side by side

    def __exit__(self, *exc):
        if self.n != 1:
            torch.set_num_threads(self.n)


def _outer(out, v, X, mode):
    """out (n, b, d, N) = v (n, b, d) times X over N: X is (n, b, G, N) (variable/grouped) or (d, N) (invariant)."""
    n, b, d = v.shape
    if mode == "invariant":
        return torch.mul(v[..., None], X, out=out)
    G, N = X.shape[2], X.shape[3]
    torch.mul(v.view(n, b, G, d // G, 1), X[:, :, :, None, :], out=out.view(n, b, G, d // G, N))
    return out


def _dot_n(H, X, mode):
    """(n, b, d): sum over N of H (n, b, d, N) times X ((n, b, G, N) or invariant (d, N))."""
    n, b, d, N = H.shape
    if mode == "invariant":
        return torch.linalg.vecdot(H, X)
    G = X.shape[2]
    return torch.bmm(H.view(n * b * G, d // G, N), X.reshape(n * b * G, N, 1)).view(n, b, d)


def _dot_d(v, H, mode):
    """Gradient of X in ``_outer``: sum over the channels of v (n, b, d) times H (n, b, d, N); (n, b, G, N) for
    variable/grouped X, summed over (n, b) to (d, N) for invariant X."""
    n, b, d, N = H.shape
    if mode == "invariant":
        return torch.einsum("kd,kdn->dn", v.reshape(n * b, d), H.reshape(n * b, d, N))
    G = mode
    return torch.bmm(v.reshape(n * b * G, 1, d // G), H.view(n * b * G, d // G, N)).view(n, b, G, N)


_MIN_PART_STEP = 32768  # elements of one part's per-step state (batch/k * dim * N) that pay for a thread of its own
_POOL: ThreadPoolExecutor | None = None


def _batch_parts(n_threads: int, b: int, d: int, N: int) -> list[slice]:
    """Contiguous batch slices, one per thread: as many as the caller's threads and the batch allow while each
    part's per-step state keeps at least _MIN_PART_STEP elements (below that the per-step ops are so short that two
    Python threads mostly wait for each other's interpreter lock)."""
    k = min(n_threads, b)
    while k > 1 and (b // k) * d * N < _MIN_PART_STEP:
        k -= 1
    return [slice(b * i // k, b * (i + 1) // k) for i in range(k)]


def _in_worker(fn, part, grad: bool):
    torch.set_num_threads(1)  # this thread's own intra-op setting (the caller's is 1 already inside _one_thread)
    with torch.set_grad_enabled(grad):  # grad mode is per thread: the caller's (off inside forward / backward)
        return fn(part)


def _run_parts(fn, parts: list[slice]) -> list:
    """fn(part) for every part: the first on the calling thread, the others on worker threads at the same time
    (torch's ops release the interpreter lock while they compute). One part: a plain call."""
    if len(parts) == 1:
        return [fn(parts[0])]
    global _POOL
    if _POOL is None or _POOL._max_workers < len(parts) - 1:
        _POOL = ThreadPoolExecutor(max_workers=len(parts) - 1, thread_name_prefix="mambazoo-scan")
    futures = [_POOL.submit(_in_worker, fn, p, torch.is_grad_enabled()) for p in parts[1:]]
    return [fn(parts[0])] + [f.result() for f in futures]


def _slice_batch(p: slice, dt, u, B, C, starts, b_mode, c_mode, A):
    """One batch part's (dt, u, A, B, C, starts): the time-major tensors sliced on their batch axis (1); A and a
    time-invariant B or C are shared."""
    Bp = B if b_mode == "invariant" else B[:, p]
    Cp = C if c_mode == "invariant" else C[:, p]
    return dt[:, p], u[:, p], A, Bp, Cp, None if starts is None else starts[:, p]


def _cat(ts, dim):
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


class _Scan(torch.autograd.Function):
    """dt, u (L, b, d) fp32; A (d, N); B, C (L, b, G, N) or (d, N); h0 (b, d, N); starts (L, b) bool or None
    -> y (L, b, d) = sum_n C h, h_last (b, d, N). Modes: the group count G (int) or 'invariant'."""

    @staticmethod
    def forward(ctx, dt, u, A, B, C, h0, starts, T, b_mode, c_mode):
        save = any(ctx.needs_input_grad[:6])
        with _one_thread() as n:
            parts = _batch_parts(n, dt.shape[1], dt.shape[2], A.shape[1])

            def part(p):
                return _Scan._forward(*_slice_batch(p, dt, u, B, C, starts, b_mode, c_mode, A), h0[p], T, b_mode,
                                      c_mode)

            ys, h_lasts, states = zip(*_run_parts(part, parts))
        if save:
            ctx.save_for_backward(dt, u, A, B, C, _cat(states, 1), starts)
        ctx.T, ctx.modes = T, (b_mode, c_mode)
        return _cat(ys, 1), _cat(h_lasts, 0)

    @staticmethod
    def _forward(dt, u, A, B, C, starts, h0, T, b_mode, c_mode):
        """One batch part: y (L, b, d), h_last (b, d, N) and the states entering each chunk (chunks + 1, b, d, N)."""
        L, b, d = dt.shape
        N = A.shape[1]
        nc = -(-L // T)
        dtu = dt * u
        y = dt.new_empty(L, b, d)
        abuf, hbuf = dt.new_empty(T, b, d, N), dt.new_empty(T, b, d, N)
        a_steps, h_steps = abuf.unbind(0), hbuf.unbind(0)
        states = dt.new_empty(nc + 1, b, d, N)  # state entering each chunk, then the last state
        states[0].copy_(h0)
        for c in range(nc):
            t0 = c * T
            n = min(T, L - t0)
            a, H = abuf[:n], hbuf[:n]
            torch.mul(dt[t0:t0 + n, :, :, None], A, out=a).exp_()
            if starts is not None:
                a.masked_fill_(starts[t0:t0 + n, :, None, None], 0.0)
            _outer(H, dtu[t0:t0 + n], B if b_mode == "invariant" else B[t0:t0 + n], b_mode)
            prev = states[c]
            for t in range(n):
                prev = h_steps[t].addcmul_(a_steps[t], prev)
            states[c + 1].copy_(prev)
            y[t0:t0 + n] = _dot_n(H, C if c_mode == "invariant" else C[t0:t0 + n], c_mode)
        return y, states[nc].clone(), states

    @staticmethod
    def backward(ctx, dy, dh_last):
        dt, u, A, B, C, states, starts = ctx.saved_tensors
        T, (b_mode, c_mode) = ctx.T, ctx.modes
        dy = dy.contiguous()
        with _one_thread() as n:
            parts = _batch_parts(n, dt.shape[1], dt.shape[2], A.shape[1])

            def part(p):
                return _Scan._backward(*_slice_batch(p, dt, u, B, C, starts, b_mode, c_mode, A), states[:, p], T,
                                       b_mode, c_mode, dy[:, p], None if dh_last is None else dh_last[p])

            ddt, du, dA, dB, dC, dh0 = zip(*_run_parts(part, parts))
        dA = dA[0] if len(dA) == 1 else torch.stack(dA).sum(0)
        dB = _cat(dB, 1) if b_mode != "invariant" else dB[0] if len(dB) == 1 else torch.stack(dB).sum(0)
        dC = _cat(dC, 1) if c_mode != "invariant" else dC[0] if len(dC) == 1 else torch.stack(dC).sum(0)
        return _cat(ddt, 1), _cat(du, 1), dA, dB, dC, _cat(dh0, 0), None, None, None, None

    @staticmethod
    def _backward(dt, u, A, B, C, starts, states, T, b_mode, c_mode, dy, dh_last):
        """With g_t = dLoss/dh_t (all paths): g_t = C_t dy_t + a_{t+1} g_{t+1}, g_{L-1} also gets dh_last;
        dx_t = g_t gives du = dt * sum_n g B, d(dt) += u * sum_n g B, dB = sum_d g dt u; the decay gives
        d(dt*A)_t = a_t g_t h_{t-1}, so d(dt) += sum_n d(dt*A) A and dA = sum_{t,b} d(dt*A) dt;
        dC = sum_d dy h; dh0 = a_0 g_0."""
        L, b, d = dt.shape
        N = A.shape[1]
        nc = -(-L // T)
        dtu = dt * u
        ddt, du = torch.empty_like(dt), torch.empty_like(u)
        dA = torch.zeros_like(A)
        dB = torch.zeros_like(B) if b_mode == "invariant" else torch.empty_like(B)
        dC = torch.zeros_like(C) if c_mode == "invariant" else torch.empty_like(C)
        abuf, hbuf, gbuf = (dt.new_empty(T, b, d, N) for _ in range(3))
        a_steps, h_steps, g_steps = abuf.unbind(0), hbuf.unbind(0), gbuf.unbind(0)
        carry = dh_last.clone() if dh_last is not None else dt.new_zeros(b, d, N)  # a_{t+1} g_{t+1} into the chunk's end
        for c in range(nc - 1, -1, -1):
            t0 = c * T
            n = min(T, L - t0)
            a, H, G = abuf[:n], hbuf[:n], gbuf[:n]
            dt_c, u_c, dtu_c, dy_c = dt[t0:t0 + n], u[t0:t0 + n], dtu[t0:t0 + n], dy[t0:t0 + n]
            B_c = B if b_mode == "invariant" else B[t0:t0 + n]
            C_c = C if c_mode == "invariant" else C[t0:t0 + n]
            # recompute the chunk's decays and states from its checkpoint
            torch.mul(dt_c[..., None], A, out=a).exp_()
            if starts is not None:
                a.masked_fill_(starts[t0:t0 + n, :, None, None], 0.0)
            _outer(H, dtu_c, B_c, b_mode)
            prev = states[c]
            for t in range(n):
                prev = h_steps[t].addcmul_(a_steps[t], prev)
            if c_mode == "invariant":
                dC += _dot_d(dy_c, H, "invariant")
            else:
                dC[t0:t0 + n] = _dot_d(dy_c, H, c_mode)
            # reverse recurrence
            _outer(G, dy_c, C_c, c_mode)
            nxt = g_steps[n - 1].add_(carry)
            for t in range(n - 2, -1, -1):
                nxt = g_steps[t].addcmul_(a_steps[t + 1], nxt)
            # the input term x = dt u B
            gB = _dot_n(G, B_c, b_mode)
            torch.mul(gB, dt_c, out=du[t0:t0 + n])
            torch.mul(gB, u_c, out=ddt[t0:t0 + n])
            if b_mode == "invariant":
                dB += _dot_d(dtu_c, G, "invariant")
            else:
                dB[t0:t0 + n] = _dot_d(dtu_c, G, b_mode)
            # the decay term: d(dt*A)_t = a_t g_t h_{t-1}
            a.mul_(G)
            carry.copy_(a[0])
            if n > 1:
                a[1:].mul_(H[:-1])
            a[0].mul_(states[c])
            ddt[t0:t0 + n] += torch.linalg.vecdot(a, A)
            dA += torch.einsum("kdn,kd->dn", a.view(n * b, d, N), dt_c.reshape(n * b, d))
        return ddt, du, dA, dB, dC, carry


def _time_major_bc(X, mode):
    """B or C to fp32 (L, batch, G, N), or (d, N) when time-invariant."""
    X = X.float()
    if mode == "invariant":
        return X.contiguous()
    if X.dim() == 3:
        X = X[:, None]
    return X.permute(3, 0, 1, 2).contiguous()


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, initial_state=None, seq_idx=None, chunk_size=None):
    """CPU selective scan: same contract and result as ``selective_scan_ref`` (fp32 rounding apart).

    Shapes: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L) | (batch, G, N, L) | (dim, N);
    D, delta_bias (dim,); initial_state (batch, dim, N); seq_idx (batch, L) int (the state restarts from
    zero wherever it changes). Returns y (batch, dim, L) in u's dtype, and the final state
    (batch, dim, N) fp32 if asked. chunk_size: steps per chunk (default ``default_chunk_size``); it only
    changes speed and rounding, never the result's definition.
    """
    s = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    batch, dim, L, N = s.batch, s.dim, s.length, s.d_state
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    h0 = initial_state_f32(initial_state, u, s)
    if L == 0:
        y = _finish(u.new_zeros(batch, dim, 0, dtype=torch.float32), u, D, z, u.dtype)
        return (y, h0) if return_last_state else y
    T = min(chunk_size, L) if chunk_size is not None else default_chunk_size(batch, dim, N, L)
    # (L, b, d) and contiguous before any elementwise op: the ops and their backwards then see one layout (a CPU
    # softplus backward on a strided input returns another layout than its meta function, which breaks
    # torch.compile's traced views)
    dt_l = time_step(delta.float().permute(2, 0, 1).contiguous(), delta_bias, delta_softplus, channel_dim=-1)
    u_l = u.float().permute(2, 0, 1).contiguous()
    modes = tuple("invariant" if m == "invariant" else s.groups if m == "grouped" else 1
                  for m in (s.b_mode, s.c_mode))
    Bl = _time_major_bc(B, s.b_mode)
    Cl = _time_major_bc(C, s.c_mode)
    starts = None
    if seq_idx is not None:
        starts = _segment_starts(seq_idx, L).T.contiguous()  # (L, batch)
    y_l, h_last = _Scan.apply(dt_l, u_l, A.float().contiguous(), Bl, Cl, h0.contiguous(), starts, T, *modes)
    # y (batch, dim, L) laid out as (batch, L, dim): the layout of Mamba's u and z, and of the out_proj input
    y = _finish(y_l.transpose(0, 1).contiguous().transpose(1, 2), u, D, z, u.dtype)
    return (y, h_last) if return_last_state else y

