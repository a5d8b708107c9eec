"""Host-side helpers for the launchers.

triton.cdiv and triton.next_power_of_2 are ConstexprFunctions in Triton 3.6: called from Python each goes
through a wrapper costing several microseconds (~9 us measured on this CPU), and a scan's forward and backward
used 14 of them per call. These are the plain versions."""

import os
from contextlib import contextmanager

# set by ``compiling_for_cuda``: launchers pick their CUDA options for CPU tensors too
_FOR_CUDA = [False]


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1): no PTX there, so no inline-asm fast math."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def pow2_parts(d: int, smallest: int = 16) -> tuple[int, int]:
    """(P1, P2) covering d with two power-of-two tile widths, as a tl.dot needs: P1 the largest power of two <= d,
    P2 a power of two >= smallest covering the rest (masked where d - P1 is not one), 0 when d is a power of two.
    192 -> (128, 64), 384 -> (256, 128), 24 -> (16, 16)."""
    p1 = 1 << (d.bit_length() - 1)
    rest = d - p1
    return p1, (0 if rest == 0 else max(next_power_of_2(rest), smallest))


def gpu_launch(t) -> bool:
    """Whether a launch on tensor t takes its GPU options (warps, tiles): t is on CUDA, or an ahead-of-time compile
    for a GPU is recording launches on CPU tensors (``compiling_for_cuda``)."""
    return t.is_cuda or _FOR_CUDA[0]


@contextmanager
def compiling_for_cuda():
    """Inside the block, launchers choose the options they would choose on CUDA (scripts/check_kernel_resources.py
    records launches on CPU tensors and compiles them for a GPU: the compiled kernel must be the GPU's)."""
    _FOR_CUDA[0] = True
    try:
        yield
    finally:
        _FOR_CUDA[0] = False
