"""One causal language model for every language variant (Mamba LM, MambaByte, MoE-Mamba, Jamba).

embedding -> n_layer x Block(mixer M|A, ffn none|mlp|moe) -> RMSNorm -> head (tied by default).
The per-layer layout comes from the config: ``layout`` is a string of M (the config's ``mixer``: Mamba,
Mamba-2 or Mamba-3) / 2 (Mamba-2) / 3 (Mamba-3) / A (attention) of length n_layer (or built from ``attn_period``/``attn_offset``), ``ffn`` likewise a string of
n (none) / d (dense MLP) / e (MoE experts) or built from ``moe_period``/``moe_offset``.
"""

from __future__ import annotations

import math
import contextlib
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.utils.checkpoint
from torch import nn

from mambazoo.core.attention import Attention
from mambazoo.core.block import Block
from mambazoo.core.cache import InferenceCache
from mambazoo.core.dispatch import add_rms_norm, fused_decode_enabled
from mambazoo.core.mamba import Mamba
from mambazoo.core.mamba2 import Mamba2
from mambazoo.core.mamba3 import Mamba3
from mambazoo.core.mlp import MLP
from mambazoo.core.moe import MoE
from mambazoo.core.norm import RMSNorm

FFN_CODES = {"n": "none", "d": "mlp", "e": "moe"}
MIXERS = ("mamba", "mamba2", "mamba3")  # what the layout letter M builds; the letters 2 / 3 are always Mamba-2 / -3


def periodic_layout(n_layer: int, period: int, offset: int, on: str, off: str) -> str:
    """Layer i gets ``on`` when i % period == offset, else ``off``; e.g. (8, 8, 4, 'A', 'M') -> 'MMMMAMMM'."""
    if period < 1 or not 0 <= offset < period:
        raise ValueError(f"period/offset: expected period >= 1 and 0 <= offset < period, got {period}, {offset}")
    return "".join(on if i % period == offset else off for i in range(n_layer))


@dataclass
class LMConfig:
    """Shape of a causal LM. Strings ``layout`` (M/2/3/A) and ``ffn`` (n/d/e) have one letter per layer;
    a shorter string is repeated to n_layer (so "MMMMAMMM" tiles a 32-layer model)."""

    vocab_size: int = 50277
    d_model: int = 768
    n_layer: int = 24
    layout: str | None = None  # None: from attn_period/offset, or all Mamba
    attn_period: int | None = None
    attn_offset: int = 0
    ffn: str | None = None  # None: from moe_period/offset (others d_ffn>0 ? 'd' : 'n'), or all 'n'
    moe_period: int | None = None
    moe_offset: int = 0
    # Mamba
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    conv_bias: bool = True
    proj_bias: bool = False
    inner_norm: bool = False
    selective: bool = True  # False: the LTI (S4D-style) SSM in the same block, for the S4-vs-S6 comparison
    # Mamba-2 (mixer: mamba2, or the layout letter 2): d_state, d_conv, expand, conv_bias, proj_bias as above
    mixer: str = "mamba"
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    # Mamba-3 (mixer: mamba3, or the layout letter 3): d_state, expand, headdim, ngroups, chunk_size as above
    # (no conv, no projection biases); rope_fraction of the state dims rotate (0.5 or 1.0); MIMO of rank
    # mimo_rank when is_mimo; outproj_norm: the gated RMSNorm per head before out_proj
    rope_fraction: float = 0.5
    is_mimo: bool = False
    mimo_rank: int = 4
    outproj_norm: bool = False
    a_activation: str = "softplus"
    # attention
    n_heads: int = 8
    n_kv_heads: int | None = None
    window: int | None = None
    rope: bool = False  # rotary position embedding in the attention layers (Jamba has none)
    rope_base: float = 10000.0
    # feed-forward
    d_ffn: int = 0
    mlp_kind: str = "swiglu"
    n_experts: int = 8
    top_k: int = 1
    d_expert: int | None = None  # None: d_ffn
    expert_kind: str = "swiglu"
    capacity_factor: float | None = 1.0
    eval_capacity_factor: float | None = None
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    renormalize: bool = False
    # the rest
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    pad_vocab_multiple: int = 8
    rescale_prenorm_residual: bool = True
    initializer_range: float = 0.02
    drop_path: float = 0.0
    # activation checkpointing in training: each block's activations recomputed in the backward pass
    grad_checkpointing: bool = False

    def layer_layout(self) -> str:
        """Mixer letter per layer (M|2|3|A), length n_layer."""
        if self.layout:
            s = self.layout.upper()
            if set(s) - set("MA23"):
                raise ValueError(f"layout: expected a string of M (Mamba), 2 (Mamba-2), 3 (Mamba-3) and A "
                                 f"(attention), got {self.layout!r}")
            return (s * math.ceil(self.n_layer / len(s)))[: self.n_layer]
        if self.attn_period:
            return periodic_layout(self.n_layer, self.attn_period, self.attn_offset, "A", "M")
        return "M" * self.n_layer

    def ffn_layout(self) -> list[str]:
        """FFN kind per layer: 'none', 'mlp' or 'moe'."""
        if self.ffn:
            s = self.ffn.lower()
            if set(s) - set(FFN_CODES):
                raise ValueError(f"ffn: expected a string of n (none), d (dense MLP) and e (MoE), got {self.ffn!r}")
            s = (s * math.ceil(self.n_layer / len(s)))[: self.n_layer]
        elif self.moe_period:
            s = periodic_layout(self.n_layer, self.moe_period, self.moe_offset, "e", "d" if self.d_ffn else "n")
        else:
            s = "n" * self.n_layer
        return [FFN_CODES[c] for c in s]

    @property
    def padded_vocab(self) -> int:
        m = self.pad_vocab_multiple
        return self.vocab_size + (-self.vocab_size) % m if m > 1 else self.vocab_size

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer: expected one of {MIXERS}, got {self.mixer!r}")
        if not isinstance(self.grad_checkpointing, bool):
            raise ValueError(f"grad_checkpointing: expected true or false, got {self.grad_checkpointing!r}")
        if self.rope_fraction not in (0.5, 1.0):
            raise ValueError(f"rope_fraction: expected 0.5 or 1.0, got {self.rope_fraction!r}")
        if not isinstance(self.mimo_rank, int) or isinstance(self.mimo_rank, bool) or self.mimo_rank < 1:
            raise ValueError(f"mimo_rank: expected a positive int, got {self.mimo_rank!r}")
        if not isinstance(self.is_mimo, bool):
            raise ValueError(f"is_mimo: expected a bool, got {self.is_mimo!r}")
        if self.a_activation not in ("softplus", "heavy_tail"):
            raise ValueError(f"a_activation: expected 'softplus' or 'heavy_tail', got {self.a_activation!r}")
        kinds = self.ffn_layout()
        if ("mlp" in kinds or ("moe" in kinds and self.d_expert is None)) and self.d_ffn < 1:
            raise ValueError("d_ffn: expected a positive hidden size when some layer has an MLP or MoE FFN")
        self.layer_layout()

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LMConfig fields {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **overrides) -> "LMConfig":
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}; expected some of {sorted(known)}")
        return replace(self, **overrides)


class CausalLM(nn.Module):
    """input_ids (batch, L) int -> logits (batch, L, vocab_size) fp32.

    Parameter names: embedding, layers.i.{norm, mixer, ffn_norm, ffn}, norm_f, lm_head.
    ``allocate_cache`` + ``forward(ids, cache)`` prefill; ``step(ids (batch,), cache)`` decodes one token.
    """

    def __init__(self, config: LMConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        self.grad_checkpointing = c.grad_checkpointing
        self.embedding = nn.Embedding(c.padded_vocab, c.d_model)
        self.layers = nn.ModuleList(self._block(i, m, f) for i, (m, f) in
                                    enumerate(zip(c.layer_layout(), c.ffn_layout())))
        self.norm_f = RMSNorm(c.d_model, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.padded_vocab, bias=False)
        self.reset_parameters()
        self.tie_weights()

    def tie_weights(self) -> None:
        """With config.tie_embeddings, lm_head shares the embedding's weight (again after to_empty(), which unties)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    def _block(self, i: int, mixer_kind: str, ffn_kind: str) -> Block:
        c = self.config
        if mixer_kind == "3" or (mixer_kind == "M" and c.mixer == "mamba3"):
            mixer = Mamba3(c.d_model, d_state=c.d_state, expand=c.expand, headdim=c.headdim, ngroups=c.ngroups,
                           rope_fraction=c.rope_fraction, is_outproj_norm=c.outproj_norm, is_mimo=c.is_mimo,
                           mimo_rank=c.mimo_rank, chunk_size=c.chunk_size, a_activation=c.a_activation,
                           layer_idx=i)
        elif mixer_kind == "2" or (mixer_kind == "M" and c.mixer == "mamba2"):
            mixer = Mamba2(c.d_model, d_state=c.d_state, d_conv=c.d_conv, expand=c.expand, headdim=c.headdim,
                           ngroups=c.ngroups, conv_bias=c.conv_bias, bias=c.proj_bias, chunk_size=c.chunk_size,
                           norm_eps=c.norm_eps, layer_idx=i)
        elif mixer_kind == "M":
            mixer = Mamba(c.d_model, d_state=c.d_state, d_conv=c.d_conv, expand=c.expand, dt_rank=c.dt_rank,
                          conv_bias=c.conv_bias, bias=c.proj_bias, inner_norm=c.inner_norm,
                          selective=c.selective, norm_eps=c.norm_eps, layer_idx=i)
        else:
            mixer = Attention(c.d_model, c.n_heads, c.n_kv_heads, window=c.window, layer_idx=i, rope=c.rope,
                              rope_base=c.rope_base)
        ffn = None
        if ffn_kind == "mlp":
            ffn = MLP(c.d_model, c.d_ffn, kind=c.mlp_kind)
        elif ffn_kind == "moe":
            ffn = MoE(c.d_model, c.d_expert or c.d_ffn, c.n_experts, top_k=c.top_k,
                      capacity_factor=c.capacity_factor, eval_capacity_factor=c.eval_capacity_factor,
                      aux_loss_weight=c.aux_loss_weight, z_loss_weight=c.z_loss_weight,
                      renormalize=c.renormalize, kind=c.expert_kind)
        return Block(c.d_model, mixer, ffn, norm_eps=c.norm_eps, drop_path=c.drop_path)

    # -- initialization ------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_ssm's _init_weights: zero Linear biases (except dt_proj's), embedding N(0, 0.02),
        and with rescale_prenorm_residual every projection into the residual stream re-drawn with
        kaiming_uniform(a=sqrt(5)) and divided by sqrt(n_residuals_per_layer * n_layer)."""
        c = self.config
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None and not getattr(m.bias, "_no_reinit", False):
                m.bias.zero_()
        nn.init.normal_(self.embedding.weight, std=c.initializer_range)
        if not c.rescale_prenorm_residual:
            return
        for block in self.layers:
            n_res = 2 if block.ffn is not None else 1
            outs = [block.mixer.out_proj.weight if isinstance(block.mixer, (Mamba, Mamba2, Mamba3))
                    else block.mixer.o_proj.weight]
            if block.ffn is not None:
                r = block.ffn.residual_out()
                outs.append(r.weight if isinstance(r, nn.Linear) else r)
            for w in outs:
                for we in (w if w.dim() == 3 else [w]):  # stacked experts: each its own fan-in
                    nn.init.kaiming_uniform_(we, a=math.sqrt(5))
                w.div_(math.sqrt(n_res * c.n_layer))

    # -- checks --------------------------------------------------------------------------------
    def check_input_ids(self, input_ids: torch.Tensor, check_range: bool = True) -> None:
        """Raise ValueError unless input_ids is a non-empty (batch, L) integer tensor of ids < vocab_size."""
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids: expected a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype in (torch.bool,) or input_ids.is_floating_point() or input_ids.is_complex():
            raise ValueError(f"input_ids: expected an integer dtype (torch.long), got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected (batch, L), got shape {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids: expected at least one token, got shape {tuple(input_ids.shape)}")
        if check_range and input_ids.device.type != "meta":
            V = self.config.vocab_size
            if torch.compiler.is_compiling():
                # traced (torch.compile / torch.export): an assert inside the graph, no host sync, no graph break
                torch._assert_async(((input_ids >= 0) & (input_ids < V)).all(),
                                    f"input_ids: expected ids in [0, {V})")
                return
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= V:
                raise ValueError(f"input_ids: expected ids in [0, {V}), got min {lo}, max {hi}")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (timm's switch; the
        config's ``grad_checkpointing`` sets it at construction). Training only: inference and caches ignore it."""
        self.grad_checkpointing = bool(enable)

    # -- forward -------------------------------------------------------------------------------
    def forward_hidden(self, input_ids: torch.Tensor, cache: InferenceCache | None = None) -> torch.Tensor:
        """input_ids (batch, L) -> final normed hidden states (batch, L, d_model)."""
        self.check_input_ids(input_ids)
        if cache is not None:
            self._check_cache(cache, input_ids.shape[0])
        with self.autocast():
            x = self.embedding(input_ids)
            checkpointed = self.grad_checkpointing and cache is None and torch.is_grad_enabled()
            for i, block in enumerate(self.layers):
                if checkpointed:
                    x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x) if cache is None else block(x, cache.layers[i])
            if cache is not None:
                cache.seqlen_offset += input_ids.shape[1]
            return self.norm_f(x)

    def forward(self, input_ids: torch.Tensor, cache: InferenceCache | None = None) -> torch.Tensor:
        """input_ids (batch, L) -> logits (batch, L, vocab_size) fp32. With ``cache``, the tokens
        continue the cached sequence and the cache is advanced past them (prefill)."""
        h = self.forward_hidden(input_ids, cache)
        with self.autocast():
            return self._logits(h)

    def autocast(self):
        """The blocks keep an fp32 residual stream; with bf16/fp16 parameters the layers run under
        autocast in that dtype (a no-op context for fp32 parameters or when autocast is already on)."""
        w = self.embedding.weight
        if w.dtype == torch.float32 or w.device.type == "meta" or torch.is_autocast_enabled(w.device.type):
            return contextlib.nullcontext()
        return torch.autocast(w.device.type, dtype=w.dtype, cache_enabled=False)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        w = self.lm_head.weight
        return nn.functional.linear(h.to(w.dtype), w)[..., : self.config.vocab_size].float()

    def step(self, input_ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """One token per sequence: input_ids (batch,) -> logits (batch, vocab_size) fp32. No host
        synchronization and no range check (the CUDA-graph path); ``generate`` checks the prompt."""
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids: expected (batch,), got shape {tuple(input_ids.shape)}")
        with self.autocast():
            x = self.embedding(input_ids)
            if fused_decode_enabled(x.device):
                return self._step_fused(x, cache)
            for i, block in enumerate(self.layers):
                x = block.step(x, cache.layers[i])
            cache.seqlen_offset += 1
            return self._logits(self.norm_f(x))

    def _step_fused(self, x: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """The decode step with fused kernels (CUDA): each block's residual add is fused into the next
        norm (Block.step_residual), the last one into the final norm, whose output is written in the
        head's dtype. Same values as the plain loop up to rounding."""
        h, residual = x, None
        for i, block in enumerate(self.layers):
            h, residual = block.step_residual(h, residual, cache.layers[i])
        cache.seqlen_offset += 1
        normed, _ = add_rms_norm(h, residual, self.norm_f.weight, self.norm_f.eps,
                                 out_dtype=self.lm_head.weight.dtype)
        return self._logits(normed)

    # -- cache, losses, generation -------------------------------------------------------------
    def allocate_cache(self, batch: int, max_len: int = 2048, device=None, dtype=None) -> InferenceCache:
        """Per-layer states: Mamba (conv, ssm), Mamba-3 (angle, ssm, k, v) of constant size; attention a KV cache for max_len tokens
        (or its window). dtype defaults to the parameters' dtype."""
        if batch < 1:
            raise ValueError(f"batch: expected a positive int, got {batch}")
        states = []
        for block in self.layers:
            m = block.mixer
            if isinstance(m, Attention):
                states.append(m.allocate_state(batch, device, dtype, max_len=max_len))
            else:
                states.append(m.allocate_state(batch, device, dtype))
        return InferenceCache(states, 0)

    def _check_cache(self, cache: InferenceCache, batch: int) -> None:
        if not isinstance(cache, InferenceCache) or len(cache.layers) != len(self.layers):
            raise ValueError(f"cache: expected an InferenceCache from allocate_cache with {len(self.layers)} layers")
        first = cache.layers[0]
        b = (first.conv if hasattr(first, "conv") else first.k).shape[0]
        if b != batch:
            raise ValueError(f"cache: allocated for batch {b}, got input_ids of batch {batch}")

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' auxiliary losses from the last forward (0 without MoE layers)."""
        losses = [b.aux_loss for b in self.layers if b.aux_loss is not None]
        if not losses:
            return torch.zeros((), device=self.embedding.weight.device)
        return torch.stack([l.float() for l in losses]).sum()

    def generate(self, input_ids=None, max_new_tokens: int = 20, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos=None,
                 streamer=None, cuda_graph: bool = True, generator: torch.Generator | None = None, **kwargs):
        """Prompt (batch, L) -> (batch, L + n) ids, or text -> text with ``self.tokenizer``; transformers'
        keywords (attention_mask, eos_token_id, repetition_penalty, do_sample, min_new_tokens, ...) too: see
        ``mambazoo.generation.generate``."""
        from mambazoo.generation import generate

        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos=eos, streamer=streamer, cuda_graph=cuda_graph, generator=generator, **kwargs)

    def save_pretrained(self, save_directory, tokenizer=None):
        """config.json + model.safetensors that transformers reads where it can: ``mambazoo.hub.save_pretrained``."""
        from mambazoo.hub import save_pretrained

        return save_pretrained(self, save_directory, tokenizer)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count (tied weights once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embedding.weight.numel() if exclude_embedding else n


def build_lm(config: LMConfig | None = None, **overrides) -> CausalLM:
    """CausalLM from a config and field overrides (unknown fields raise ValueError)."""
    config = (config or LMConfig()).replace(**overrides)
    return CausalLM(config)
