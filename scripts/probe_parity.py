"""State-tracking probe: running parity of a bit string, Mamba-3 with its rotary (complex) state against the same
mixer with the rotation switched off, trained on the CPU.

Task: a start token, then x_1..x_L uniform bits; the target at step t is x_1 xor ... xor x_t. A real,
non-negative decay cannot flip a sign per 1-bit, a rotation by pi can: the Mamba-3 paper's argument for complex
states. The ablation keeps every parameter but fixes the angle projection rows of in_proj at zero
(tanh(0) = 0: no rotation).

Model: embedding (3 tokens -> d_model), n_layers x [x + Mamba3(RMSNorm(x))], RMSNorm, linear head (2 classes).
Trained on length --length; evaluated on fresh strings at --eval-lengths (per-step accuracy, and the accuracy
at the last step alone).

    python scripts/probe_parity.py --steps 1500 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from mambazoo.core.mamba3 import Mamba3
from mambazoo.core.norm import RMSNorm


class ParityNet(nn.Module):
    """Embedding -> n_layers pre-norm residual Mamba-3 mixers -> norm -> 2-way head. (batch, L) ints ->
    (batch, L, 2) logits."""

    def __init__(self, d_model: int, n_layers: int, rotary: bool, **mixer_kw):
        super().__init__()
        self.embed = nn.Embedding(3, d_model)  # bits 0 / 1 and a start token 2
        self.norms = nn.ModuleList(RMSNorm(d_model) for _ in range(n_layers))
        self.mixers = nn.ModuleList(Mamba3(d_model, **mixer_kw) for _ in range(n_layers))
        self.norm_f = RMSNorm(d_model)
        self.head = nn.Linear(d_model, 2)
        self.rotary = rotary
        if not rotary:  # the angle rows of in_proj are the last num_rope_angles rows: fixed at zero
            for m in self.mixers:
                S = m.num_rope_angles
                with torch.no_grad():
                    m.in_proj.weight[-S:].zero_()
                m.in_proj.weight.register_hook(lambda g, S=S: torch.cat([g[:-S], torch.zeros_like(g[-S:])]))

    def forward(self, bits: torch.Tensor) -> torch.Tensor:
        h = self.embed(bits)
        for norm, mixer in zip(self.norms, self.mixers):
            h = h + mixer(norm(h))
        return self.head(self.norm_f(h))


def batch_of(n: int, L: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, L + 1) tokens (a start token, then L bits) and (n, L + 1) targets (the parity so far; 0 at the start)."""
    bits = torch.randint(0, 2, (n, L), generator=gen)
    tokens = torch.cat([torch.full((n, 1), 2), bits], dim=1)
    return tokens, torch.cat([torch.zeros(n, 1, dtype=torch.long), torch.cumsum(bits, dim=1) % 2], dim=1)


@torch.no_grad()
def evaluate(model: nn.Module, L: int, n: int, gen: torch.Generator) -> tuple[float, float]:
    bits, target = batch_of(n, L, gen)
    pred = model(bits).argmax(-1)
    return (pred == target).float().mean().item(), (pred[:, -1] == target[:, -1]).float().mean().item()


def run(rotary: bool, seed: int, args) -> dict:
    torch.manual_seed(seed)
    model = ParityNet(args.d_model, args.n_layers, rotary, d_state=args.d_state, headdim=args.headdim,
                      chunk_size=args.chunk, rope_fraction=args.rope_fraction, dt_min=args.dt_min, dt_max=args.dt_max)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(1000 + seed)
    t0 = time.time()
    for step in range(args.steps):
        bits, target = batch_of(args.batch, args.length, gen)
        loss = F.cross_entropy(model(bits).flatten(0, 1), target.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    egen = torch.Generator().manual_seed(5000 + seed)
    res = {L: evaluate(model, L, args.eval_batch, egen) for L in args.eval_lengths}
    return dict(rotary=rotary, seed=seed, loss=loss.item(), seconds=time.time() - t0, eval=res)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--eval-lengths", type=int, nargs="+", default=[32, 64, 256])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--eval-batch", type=int, default=512)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--n-layers", type=int, default=1)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--headdim", type=int, default=16)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--rope-fraction", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dt-min", type=float, default=1e-3, help="the mixers' dt initialization range")
    p.add_argument("--dt-max", type=float, default=1e-1)
    p.add_argument("--variants", nargs="+", default=["rotary", "none"], choices=["rotary", "none"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for rotary in [v == "rotary" for v in args.variants]:
        for seed in args.seeds:
            r = run(rotary, seed, args)
            rows.append(r)
            ev = "  ".join(f"L={L}: {a:.3f}/{f:.3f}" for L, (a, f) in r["eval"].items())
            print(f"rotary={rotary} seed={seed} loss={r['loss']:.4f} ({r['seconds']:.0f} s)  {ev}", flush=True)
    heads = " | ".join(f"L={L} per-step / last" for L in args.eval_lengths)
    print(f"\n| mixer | seed | final train loss | {heads} |")
    print("|---|---|---|" + "---|" * len(args.eval_lengths))
    for r in rows:
        name = "Mamba-3 (rotary state)" if r["rotary"] else "Mamba-3, no rotation"
        cells = " | ".join(f"{a:.3f} / {f:.3f}" for a, f in r["eval"].values())
        print(f"| {name} | {r['seed']} | {r['loss']:.4f} | {cells} |")


if __name__ == "__main__":
    main()
