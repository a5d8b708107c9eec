"""Grouped-query causal self-attention (Jamba's attention layers): no positional embedding by default
(Jamba's Mamba layers carry order) or rotary embeddings (``rope=True``, for attention-only baselines),
full or sliding-window, with a preallocated KV cache and a one-token decode step that a CUDA graph can
capture."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mambazoo.core.cache import KVCache


class Attention(nn.Module):
    """Causal multi-head attention with n_kv_heads key/value heads shared by groups of query heads.

    x (batch, L, d_model) -> (batch, L, d_model). ``window`` = W restricts query t to keys
    t-W+1 .. t (sliding window); None attends to the whole prefix. Parameter names follow
    Llama/Jamba: q_proj, k_proj, v_proj, o_proj. ``rope`` rotates queries and keys by their absolute
    positions (rotary embedding, base ``rope_base``); cached keys are stored rotated.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, window: int | None = None,
                 bias: bool = False, layer_idx: int | None = None, rope: bool = False, rope_base: float = 10000.0):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads < 1 or d_model % n_heads:
            raise ValueError(f"n_heads: expected a positive divisor of d_model={d_model}, got {n_heads}")
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads: expected a positive divisor of n_heads={n_heads}, got {n_kv_heads}")
        if window is not None and window < 1:
            raise ValueError(f"window: expected None or a positive int, got {window}")
        self.d_model, self.n_heads, self.n_kv_heads, self.window = d_model, n_heads, n_kv_heads, window
        self.head_dim = d_model // n_heads
        if rope and self.head_dim % 2:
            raise ValueError(f"rope: needs an even head_dim, got d_model / n_heads = {self.head_dim}")
        if rope and rope_base <= 1:
            raise ValueError(f"rope_base: expected > 1, got {rope_base}")
        self.rope, self.rope_base = rope, rope_base
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)

    def _qkv(self, x: torch.Tensor):
        """x (batch, L, d_model) -> q (batch, H, L, hd), k, v (batch, H_kv, L, hd)."""
        b, L, _ = x.shape
        q = self.q_proj(x).view(b, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def _rotate(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of x (batch, heads, L, head_dim) at positions pos (L,) (identity without rope):
        pairs (x_i, x_{i+hd/2}) rotated by pos * base^(-i / (hd/2)), computed in fp32."""
        if not self.rope:
            return x
        half = self.head_dim // 2
        inv = self.rope_base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
        ang = pos.to(torch.float32)[:, None] * inv[None, :]
        cos, sin = ang.cos(), ang.sin()
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)

    def _attend(self, q, k, v, mask=None, is_causal=False):
        """SDPA with grouped KV heads; q (b, H, Lq, hd), k/v (b, H_kv, Lk, hd) -> (b, Lq, d_model)."""
        gqa = self.n_kv_heads != self.n_heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
        b, _, Lq, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(b, Lq, self.n_heads * self.head_dim))

    def _mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Boolean (Lq, Lk) mask, True = attend: 0 <= k_pos <= q_pos (and q_pos - k_pos < window)."""
        qp, kp = q_pos[:, None], k_pos[None, :]
        m = (kp >= 0) & (kp <= qp)
        if self.window is not None:
            m = m & (qp - kp < self.window)
        return m

    def forward(self, x: torch.Tensor, state: KVCache | None = None) -> torch.Tensor:
        """x (batch, L, d_model) -> (batch, L, d_model). With ``state`` the sequence continues after
        the cached tokens and its keys/values are written into the cache (prefill)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected (batch, L, d_model={self.d_model}), got {tuple(x.shape)}")
        q, k, v = self._qkv(x)
        L = x.shape[1]
        if state is None:
            pos = torch.arange(L, device=x.device)
            q, k = self._rotate(q, pos), self._rotate(k, pos)
            if self.window is None or self.window >= L:
                return self._attend(q, k, v, is_causal=True)
            return self._attend(q, k, v, mask=self._mask(pos, pos))
        self._check_state(state, x.shape[0])
        start = int(state.pos.item())
        if self.window is None and start + L > state.capacity:
            raise ValueError(f"KV cache full: {start} + {L} tokens exceed its capacity {state.capacity}")
        q_pos = torch.arange(start, start + L, device=x.device)
        q, k = self._rotate(q, q_pos), self._rotate(k, q_pos)
        if start == 0 and (self.window is None or self.window >= L):
            y = self._attend(q, k, v, is_causal=True)
        else:  # attend to the cached slots and the new keys together
            kk = torch.cat([state.k.to(k.dtype), k], dim=2)
            vv = torch.cat([state.v.to(v.dtype), v], dim=2)
            y = self._attend(q, kk, vv, mask=self._mask(q_pos, torch.cat([state.slot_pos, q_pos])))
        keep = min(L, state.capacity)  # only the last `capacity` tokens can ever be attended again
        slots = q_pos[-keep:] % state.capacity
        state.k.index_copy_(2, slots, k[:, :, -keep:].to(state.k.dtype))
        state.v.index_copy_(2, slots, v[:, :, -keep:].to(state.v.dtype))
        state.slot_pos.index_copy_(0, slots, q_pos[-keep:])
        state.pos.add_(L)
        return y

    def step(self, x: torch.Tensor, state: KVCache) -> torch.Tensor:
        """One token: x (batch, d_model) -> (batch, d_model). No host synchronization (graph-capturable).
        Full attention past the cache's capacity is not checked here (``allocate_state`` sizes it)."""
        if x.dim() != 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected (batch, d_model={self.d_model}), got {tuple(x.shape)}")
        q, k, v = self._qkv(x[:, None])
        q, k = self._rotate(q, state.pos), self._rotate(k, state.pos)
        slot = state.pos % state.capacity
        state.k.index_copy_(2, slot, k.to(state.k.dtype))
        state.v.index_copy_(2, slot, v.to(state.v.dtype))
        state.slot_pos.index_copy_(0, slot, state.pos)
        mask = self._mask(state.pos, state.slot_pos)[None, None]  # (1, 1, 1, capacity)
        y = self._attend(q, state.k.to(q.dtype), state.v.to(q.dtype), mask=mask)
        state.pos.add_(1)
        return y[:, 0]

    def allocate_state(self, batch: int, device=None, dtype=None, max_len: int = 2048) -> KVCache:
        """Empty cache for ``max_len`` tokens (or ``window`` slots when sliding)."""
        if max_len < 1:
            raise ValueError(f"max_len: expected a positive int, got {max_len}")
        w = self.q_proj.weight
        device, dtype = device or w.device, dtype or w.dtype
        cap = max_len if self.window is None else min(self.window, max_len)
        shape = (batch, self.n_kv_heads, cap, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                       torch.full((cap,), -1, device=device, dtype=torch.long),
                       torch.zeros(1, device=device, dtype=torch.long))

    def _check_state(self, state: KVCache, batch: int) -> None:
        if not isinstance(state, KVCache):
            raise ValueError(f"state: expected a KVCache, got {type(state).__name__}")
        if state.k.shape[0] != batch or state.k.shape[1] != self.n_kv_heads:
            raise ValueError(f"state: expected k of (batch={batch}, n_kv_heads={self.n_kv_heads}, ...), "
                             f"got {tuple(state.k.shape)}")
