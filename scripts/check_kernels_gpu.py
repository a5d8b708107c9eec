"""The compiled SSD (Mamba-2) and Mamba-3 Triton kernels on a GPU against core's chunked references, at the
published shapes (headdim 64, d_state 128; Mamba-3 MIMO ranks 2 and 4; rank 4 at d_state 128 without the
backward, which those shapes do not use), fp32 so the comparison is tight.

    python scripts/check_kernels_gpu.py [--json out.json]      # needs CUDA
    TRITON_INTERPRET=1 python scripts/check_kernels_gpu.py --device cpu --length 70   # a dry run of the script

CI checks the kernels through the Triton interpreter at small shapes; this checks what the GPU compiles: per case
the relative error of the output, the final states and every gradient (fp32 inputs; the kernels use IEEE fp32
dot products there) and of three decode steps. A case whose kernel fails to compile is reported with its error;
the exit status is 1 when any case fails or any error exceeds 1e-4.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

TOL = 1e-4
DEVICE, LENGTH = "cuda", 1000


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def grads_compare(out, out0, leaves, names) -> dict:
    """Relative errors of d(random projection of out) / d(leaves) against the same through out0."""
    ws = [torch.randn_like(o) for o in out0]
    loss = lambda os_: sum((o * w).sum() for o, w in zip(os_, ws))  # noqa: E731
    g = torch.autograd.grad(loss(out), leaves)
    g0 = torch.autograd.grad(loss(out0), leaves)
    return {f"d{n}": rel(a, b) for n, a, b in zip(names, g, g0)}


def ssd_case(b=2, L=None, h=4, p=64, n=128, g=1):
    from mambazoo.core.ssd import ssd_chunked, ssd_step_ref
    from mambazoo.kernels.ssd import ssd_step_triton, ssd_triton

    dev, L = DEVICE, L or LENGTH
    t = dict(x=torch.randn(b, L, h, p), dt=torch.randn(b, L, h) * 0.5, A=-torch.rand(h) * 15 - 1,
             B=torch.randn(b, L, g, n), C=torch.randn(b, L, g, n), D=torch.randn(h), z=torch.randn(b, L, h, p),
             dt_bias=torch.log(torch.expm1(torch.exp(torch.rand(h) * math.log(100.0) + math.log(1e-3)))),
             initial_states=torch.randn(b, h, p, n))
    t = {k: v.to(dev).requires_grad_() for k, v in t.items()}
    out = ssd_triton(**t, chunk_size=256, dt_softplus=True, return_final_states=True)
    out0 = ssd_chunked(**t, chunk_size=256, dt_softplus=True, return_final_states=True)
    row = dict(y=rel(out[0], out0[0]), final=rel(out[1], out0[1]))
    row.update(grads_compare(out, out0, list(t.values()), list(t)))
    with torch.no_grad():
        s1, s0 = t["initial_states"].detach().clone(), t["initial_states"].detach().clone()
        for i in range(3):
            kw = dict(x=t["x"][:, i], dt=t["dt"][:, i], A=t["A"], B=t["B"][:, i], C=t["C"][:, i], D=t["D"],
                      z=t["z"][:, i], dt_bias=t["dt_bias"], dt_softplus=True)
            row[f"step{i}_y"] = rel(ssd_step_triton(s1, **kw), ssd_step_ref(s0, **kw))
        row["step_state"] = rel(s1, s0)
    return row


def mamba3_case(R=1, N=128, P=64, H=4, L=None, b=2, G=1, pairwise=True, train=True):
    from mambazoo.core.mamba3_scan import mamba3_scan_chunked, mamba3_step_ref
    from mambazoo.kernels.mamba3 import mamba3_scan_triton, mamba3_scan_triton_train, mamba3_step_triton

    dev, S, L = DEVICE, N // 4, L or LENGTH  # rope_fraction 0.5: N / 4 angle pairs
    dt = F.softplus(torch.randn(b, L, H) * 2 - 2)
    t = dict(x=torch.randn(b, L, H, P), dt=dt, adt=-dt * (torch.rand(b, L, H) * 2 + 1e-3), trap=torch.rand(b, L, H),
             B=torch.randn(b, L, R, G, N), C=torch.randn(b, L, R, G, N), angles=torch.randn(b, L, H, S) * 2,
             B_bias=torch.randn(H, R, N), C_bias=torch.randn(H, R, N), D=torch.randn(H),
             mimo_x=torch.randn(H, R, P) if R > 1 else None)
    t = {k: None if v is None else v.to(dev).requires_grad_() for k, v in t.items()}
    init = [x.to(dev).requires_grad_() for x in (torch.randn(b, H, S) * 3, torch.randn(b, H, P, N),
                                                 torch.randn(b, R, H, N), torch.randn(b, H, P))]
    y0, fin0 = mamba3_scan_chunked(**t, initial_states=init, return_final_states=True, pairwise=pairwise,
                                   chunk_size=64)
    row = {}
    if train:  # (shapes beyond kernel_supports(backward=True) train through the reference: no backward here)
        y, fin = mamba3_scan_triton_train(**t, initial_states=init, return_final_states=True, pairwise=pairwise,
                                          chunk_size=64)
        row.update(y=rel(y, y0), **{f"final_{k}": rel(a, c) for k, a, c in zip(("angle", "ssm", "k", "v"), fin, fin0)})
        leaves = [v for v in t.values() if v is not None] + init
        names = [k for k, v in t.items() if v is not None] + ["angle0", "ssm0", "k0", "v0"]
        row.update(grads_compare([y, *fin], [y0, *fin0], leaves, names))
    with torch.no_grad():
        row["y_inference"] = rel(mamba3_scan_triton(**t, initial_states=init, pairwise=pairwise, chunk_size=64), y0)
        ks = [init[0].detach().clone(), init[1].detach().clone(), init[2].detach().clone(), init[3].detach().clone()]
        rs = [s.clone() for s in ks]
        for i in range(3):
            per = {k: (v[:, i] if k in ("x", "dt", "adt", "trap", "B", "C", "angles") else v) for k, v in t.items()}
            yk = mamba3_step_triton(**per, states=ks, pairwise=pairwise)
            yr, rs = mamba3_step_ref(**per, states=rs, pairwise=pairwise)
            row[f"step{i}_y"] = rel(yk, yr)
        row["step_ssm"] = rel(ks[1], rs[1])
    return row


CASES = {
    "ssd (p 64, N 128, chunk 256)": lambda: ssd_case(),
    "mamba3 SISO (p 64, N 128, chunk 64)": lambda: mamba3_case(R=1, N=128),
    "mamba3 MIMO rank 2 (p 64, N 128)": lambda: mamba3_case(R=2, N=128, pairwise=False),
    "mamba3 MIMO rank 4 (p 64, N 64)": lambda: mamba3_case(R=4, N=64, pairwise=False),
    "mamba3 MIMO rank 4 (p 64, N 128), forward and step": lambda: mamba3_case(R=4, N=128, pairwise=False,
                                                                              train=False),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--cases", nargs="+", default=None,
                    help="run the cases whose names contain one of these strings (default: all); the Mamba-3 cases "
                         "compile for minutes each: run them in parallel processes, one case each")
    args = ap.parse_args(argv)
    if args.cases and not any(c in name for c in args.cases for name in CASES):
        ap.error(f"--cases: expected parts of these case names {list(CASES)}, got {args.cases}")
    global DEVICE, LENGTH
    DEVICE, LENGTH = args.device, args.length
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    results, bad = {}, 0
    for name, case in CASES.items():
        if args.cases and not any(c in name for c in args.cases):
            continue
        torch.manual_seed(0)
        t0 = time.perf_counter()
        try:
            row = case()
            worst = max(row.values())
            ok = worst < TOL
            print(f"{'ok  ' if ok else 'FAIL'} {name} ({time.perf_counter() - t0:.0f} s with compiles): worst rel. "
                  f"error {worst:.1e} "
                  f"({max(row, key=row.get)}); " + ", ".join(f"{k} {v:.1e}" for k, v in row.items()), flush=True)
        except Exception as e:  # noqa: BLE001  (a compile failure is the finding: report it, go on)
            row, ok = dict(error=f"{type(e).__name__}: {str(e)[:400]}"), False
            print(f"FAIL {name}: {row['error']}", flush=True)
        results[name] = row
        bad += not ok
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
