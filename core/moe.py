"""Mixture-of-experts feed-forward: Switch (top-1) or top-k routing, capacity factor with token
dropping, the load-balancing loss and the optional router z-loss.

Routing, for T tokens and E experts:
    logits = x W_r^T (fp32); p = softmax(logits); top-k experts by p; gate = p of the chosen expert
    (renormalized over the k choices when ``renormalize``, as Mixtral; left as is, as Switch and Jamba).
Capacity: each expert takes at most C = ceil(capacity_factor * T * k / E) assignments; assignments
are served in priority order (every token's first choice before any second choice, token order
within a rank) and the rest are dropped: a dropped assignment contributes zero (the block's residual
carries the token through). Dropping is applied in training; in eval only if ``eval_capacity_factor``
is set, so cached decoding and a full forward agree.
Load balancing (Switch, eq. 4; top-k as Mixtral/Jamba): E * sum_i f_i * P_i, f_i = (number of top-k
choices of expert i) / T, P_i = mean_t p_t[i]. z-loss (ST-MoE): mean_t logsumexp(logits_t)^2.
aux_loss = aux_loss_weight * load_balance + z_loss_weight * z_loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """Routing of T tokens: probs (T, E) fp32, logits (T, E) fp32, experts (T, k) int64,
    gates (T, k) fp32, keep (T, k) bool (False = dropped by capacity), capacity (int or None)."""

    logits: torch.Tensor
    probs: torch.Tensor
    experts: torch.Tensor
    gates: torch.Tensor
    keep: torch.Tensor
    capacity: int | None


def expert_capacity(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float | None) -> int | None:
    """Assignments one expert may take: ceil(factor * T * k / E); None = unlimited."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


def capacity_keep(experts: torch.Tensor, n_experts: int, capacity: int | None) -> torch.Tensor:
    """experts (T, k) -> keep (T, k) bool: an assignment is kept if fewer than ``capacity`` assignments
    of higher priority (lower rank, then earlier token) went to the same expert. Static shapes only."""
    if capacity is None:
        return torch.ones_like(experts, dtype=torch.bool)
    onehot = F.one_hot(experts.t().reshape(-1), n_experts)  # (k*T, E), rank-major priority order
    position = (onehot.cumsum(0) - 1).mul(onehot).sum(-1)  # index of each assignment within its expert
    return (position < capacity).view(experts.shape[1], experts.shape[0]).t()


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """E * sum_i f_i P_i with f_i = (top-k choices of expert i) / T and P_i = mean router prob of i."""
    T = probs.shape[0]
    counts = F.one_hot(experts, n_experts).sum(dim=(0, 1)).to(probs.dtype)
    return n_experts * torch.sum(counts / T * probs.mean(0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2 (ST-MoE)."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class Experts(nn.Module):
    """E expert MLPs stored as stacked weights.

    kind="gelu": w_in (E, H, D), w_out (E, D, H): y = w_out gelu(w_in x).
    kind="swiglu": w_in (E, 2H, D) = [gate; up], w_out (E, D, H): y = w_out (silu(gate x) * up x).
    """

    def __init__(self, n_experts: int, d_model: int, d_hidden: int, kind: str = "gelu"):
        super().__init__()
        if kind not in ("gelu", "swiglu"):
            raise ValueError(f"kind: expected 'gelu' or 'swiglu', got {kind!r}")
        self.kind, self.n_experts, self.d_hidden = kind, n_experts, d_hidden
        n_in = 2 * d_hidden if kind == "swiglu" else d_hidden
        self.w_in = nn.Parameter(torch.empty(n_experts, n_in, d_model))
        self.w_out = nn.Parameter(torch.empty(n_experts, d_model, d_hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init, per expert: uniform in +-1 / sqrt(fan_in)."""
        for w in (self.w_in, self.w_out):
            bound = 1 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            g, u = h.chunk(2, dim=-1)
            return F.silu(g) * u
        return F.gelu(h)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on tokens x (n, D) -> (n, D)."""
        return F.linear(self._act(F.linear(x, self.w_in[e])), self.w_out[e])

    def gathered(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Each token through its own expert with gathered weights: x (n, D), experts (n,) -> (n, D).
        Static shapes (CUDA-graph friendly); meant for few tokens (decoding)."""
        h = torch.bmm(self.w_in[experts], x[:, :, None])[..., 0]
        return torch.bmm(self.w_out[experts], self._act(h)[:, :, None])[..., 0]


class MoE(nn.Module):
    """Mixture-of-experts FFN. x (..., d_model) -> (out (..., d_model), aux_loss scalar fp32)."""

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, top_k: int = 1,
                 capacity_factor: float | None = 1.0, eval_capacity_factor: float | None = None,
                 aux_loss_weight: float = 0.01, z_loss_weight: float = 0.0, renormalize: bool = False,
                 kind: str = "gelu", gather_threshold: int = 128):
        super().__init__()
        if n_experts < 1 or not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k: expected 1 <= top_k <= n_experts={n_experts}, got {top_k}")
        for name, f in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if f is not None and f <= 0:
                raise ValueError(f"{name}: expected None or > 0, got {f}")
        self.d_model, self.n_experts, self.top_k = d_model, n_experts, top_k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.aux_loss_weight, self.z_loss_weight, self.renormalize = aux_loss_weight, z_loss_weight, renormalize
        self.gather_threshold = gather_threshold
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = Experts(n_experts, d_model, d_hidden, kind)
        self.last_routing: Routing | None = None

    def route(self, x: torch.Tensor) -> Routing:
        """x (T, d_model) -> Routing (see the module docstring)."""
        logits = F.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(-1)
        gates, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize and self.top_k > 1:
            gates = gates / gates.sum(-1, keepdim=True)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        cap = expert_capacity(x.shape[0], self.n_experts, self.top_k, factor)
        keep = capacity_keep(experts, self.n_experts, cap)
        return Routing(logits, probs, experts, gates, keep, cap)

    def forward(self, x: torch.Tensor):
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected (..., d_model={self.d_model}), got {tuple(x.shape)}")
        shape = x.shape
        xt = x.reshape(-1, self.d_model)
        r = self.route(xt)
        self.last_routing = r
        weights = (r.gates * r.keep).to(x.dtype)  # (T, k)
        T, k = r.experts.shape
        if T * k <= self.gather_threshold or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            y = self.experts.gathered(xt.repeat_interleave(k, 0), r.experts.reshape(-1))
            out = (y.view(T, k, -1) * weights[..., None]).sum(1)
        else:
            out = torch.zeros_like(xt)
            flat_w = weights.reshape(-1)
            # dropped assignments are routed to a virtual expert E, which is never computed
            flat_e = r.experts.reshape(-1).masked_fill(~r.keep.reshape(-1), self.n_experts)
            order = torch.argsort(flat_e, stable=True)
            counts = torch.bincount(flat_e, minlength=self.n_experts + 1)[: self.n_experts].tolist()
            start = 0
            for e, n in enumerate(counts):
                if n:
                    idx = order[start:start + n]
                    tok = idx // k
                    out.index_add_(0, tok, self.experts.one(e, xt[tok]) * flat_w[idx, None])
                start += n
        aux = self.aux_loss_weight * load_balancing_loss(r.probs, r.experts, self.n_experts)
        if self.z_loss_weight:
            aux = aux + self.z_loss_weight * router_z_loss(r.logits)
        return out.view(shape), aux

    def residual_out(self) -> nn.Parameter:
        """The weight that writes into the residual stream (rescaled at init)."""
        return self.experts.w_out
