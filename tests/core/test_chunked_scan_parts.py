"""mambazoo.core.chunked_scan with more than one torch thread: the batch split into parts run side by side on worker
threads gives the sequential oracle's forward and every gradient, in every B/C mode, with seq_idx and an initial
state; which parts are made."""

import pytest
import torch

from helpers import rel
from mambazoo.core import chunked_scan
from mambazoo.core.scan import selective_scan_chunked, selective_scan_ref


@pytest.fixture
def threads():
    """torch's thread count, restored after the test."""
    n = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(n)


def _inputs(batch, dim, L, N, bc, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B, C = {"variable": (r(batch, N, L), r(batch, N, L)), "grouped": (r(batch, 2, N, L), r(batch, 2, N, L)),
            "invariant": (r(dim, N), r(dim, N))}[bc]
    return dict(u=r(batch, dim, L), delta=r(batch, dim, L) * 0.5, A=-torch.rand(dim, N, generator=g) - 0.1, B=B, C=C,
                D=r(dim), z=r(batch, dim, L), delta_bias=r(dim) - 2, initial_state=r(batch, dim, N))


def _forward_backward(fn, inp, seq_idx):
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    y, h = fn(**leaves, delta_softplus=True, return_last_state=True, seq_idx=seq_idx)
    g = torch.Generator().manual_seed(1)
    ((y * torch.randn(y.shape, generator=g)).sum() + (h * torch.randn(h.shape, generator=g)).sum()).backward()
    return {"y": y, "h": h, **{f"d{k}": v.grad for k, v in leaves.items()}}


@pytest.mark.parametrize("n_threads,batch", [(2, 2), (2, 5), (3, 4)])
@pytest.mark.parametrize("bc", ["variable", "grouped", "invariant"])
def test_split_batch_equals_the_oracle_with_every_gradient(threads, monkeypatch, n_threads, batch, bc):
    monkeypatch.setattr(chunked_scan, "_MIN_PART_STEP", 1)  # split even these toy shapes
    threads(n_threads)
    assert len(chunked_scan._batch_parts(n_threads, batch, 8, 4)) == min(n_threads, batch)
    inp = _inputs(batch, 8, 13, 4, bc)
    seq_idx = torch.tensor([[0] * 6 + [1] * 7] * batch)
    want = _forward_backward(selective_scan_ref, inp, seq_idx)
    got = _forward_backward(lambda **kw: selective_scan_chunked(**kw, chunk_size=5), inp, seq_idx)
    for k in want:
        assert got[k] is not None and rel(got[k], want[k]) < 1e-5, k
    assert torch.get_num_threads() == n_threads  # the caller's setting is back


def test_batch_parts_keep_each_part_worth_a_thread():
    parts = chunked_scan._batch_parts
    big = chunked_scan._MIN_PART_STEP
    assert parts(1, 8, 512, 16) == [slice(0, 8)]  # one thread: one part
    assert parts(2, 8, 512, 16) == [slice(0, 4), slice(4, 8)]  # the LM step's mixer: 4 x 512 x 16 = 32768 a part
    assert parts(2, 1, 4096, 16) == [slice(0, 1)]  # batch 1: nothing to split
    assert parts(2, 2, 256, 16) == [slice(0, 2)]  # 256 x 16 a part: too small for a thread
    assert parts(4, 3, big, 1) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert parts(4, 4, big // 2, 1) == [slice(0, 2), slice(2, 4)]
