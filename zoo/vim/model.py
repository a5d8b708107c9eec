"""Vision Mamba (Vim): patch embedding -> tokens with a class token in the middle and absolute
position embeddings -> depth x bidirectional ("v2") Mamba blocks -> RMSNorm -> class head.

Token order: patches row-major, the class token inserted at index ``num_patches // 2`` (Vim's
"middle class token"). Both scan directions run in training and in inference: the mixer is
``mambazoo.core.Mamba(bidirectional=True)``, which has no recurrent path at all (mixer='mamba2' / 'mamba3': the
bidirectional Mamba-2 / Mamba-3 mixers of mambazoo.core.mamba2 / mamba3).

Position embeddings are stored in timm's layout, (1, 1 + num_patches, dim) with the class token's
row first, and added before the class token is moved to the middle; this lets
``timm.layers.resample_abs_pos_embed`` interpolate them to a new image size.

``load_state_dict`` also takes the official hustvl/Vim state dict (``mambazoo.vim.convert``: layers.i.mixer.
conv1d_b, ..., norm_f, pos_embed with the class token's row in the middle) and converts it on the way in.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import resample_abs_pos_embed, trunc_normal_

from mambazoo.core.block import Block
from mambazoo.core import dispatch
from mambazoo.core.dispatch import fused_decode_enabled
from mambazoo.core.mamba import Mamba
from mambazoo.core.norm import RMSNorm

MIXERS = ("mamba", "mamba2", "mamba3")  # VisionMamba's mixer choices, all bidirectional


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(int(s) for s in v)
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {v!r}")
    return v


class PatchEmbed(nn.Module):
    """Image -> patch tokens with a strided convolution (overlapping when stride < patch).

    x (batch, in_chans, H, W) -> (batch, gh * gw, dim), gh = (H - ph) // sh + 1 (same for w).
    """

    def __init__(self, img_size=224, patch_size=16, stride=None, in_chans=3, embed_dim=192):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.stride = _pair(stride if stride is not None else patch_size)
        self.in_chans = in_chans
        for name, v in (("img_size", self.img_size), ("patch_size", self.patch_size), ("stride", self.stride)):
            if min(v) < 1:
                raise ValueError(f"{name}: expected positive sizes, got {v}")
        if any(i < p for i, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"img_size {self.img_size} is smaller than one patch {self.patch_size}")
        self.grid_size = self.grid_for(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride)

    def grid_for(self, hw) -> tuple[int, int]:
        """The token grid (gh, gw) that an image of size hw = (H, W) is cut into."""
        return tuple((s - p) // st + 1 for s, p, st in zip(hw, self.patch_size, self.stride))

    def check_image(self, x: torch.Tensor) -> None:
        """ValueError unless x is (batch, in_chans, H, W) with room for one patch."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"image: expected a float tensor (batch, channels, H, W), got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"image: expected a float tensor (e.g. uint8 / 255, normalized), got {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"image: expected (batch, channels, H, W), got a {x.dim()}-d tensor {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"image: expected {self.in_chans} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        if x.shape[2] < self.patch_size[0] or x.shape[3] < self.patch_size[1]:
            raise ValueError(f"image: {tuple(x.shape[2:])} is smaller than one patch {self.patch_size}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_image(x)
        if self.stride == self.patch_size:
            return self._patchify(x)
        return self.proj(x).flatten(2).transpose(1, 2)

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Non-overlapping patches as one GEMM: x (b, c, H, W) -> (b, gh * gw, dim), the same values as the
        strided convolution (cuDNN picked an implicit-GEMM convolution taking 4% of vim-tiny's time at 1248 px)."""
        b, c = x.shape[:2]
        (ph, pw), (gh, gw) = self.patch_size, self.grid_for(x.shape[2:])
        patches = x[:, :, :gh * ph, :gw * pw].reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
        if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
            # gathered and cast to the GEMM's dtype in one copy (a cast, then the gather, took two passes)
            patches = patches.to(torch.get_autocast_dtype(x.device.type), memory_format=torch.contiguous_format)
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)  # (dim, c * ph * pw), same order
        return F.linear(patches.reshape(b, gh * gw, c * ph * pw), weight, self.proj.bias)


class VisionMamba(nn.Module):
    """Vision Mamba classifier. x (batch, in_chans, H, W) -> logits (batch, num_classes).

    Args:
        img_size, patch_size, stride: the image and patch geometry (ints or (h, w) pairs);
            stride < patch_size gives overlapping patches (Vim's "stride 8" variants).
        embed_dim, depth: width and number of blocks; d_state, d_conv, expand: the mixer's.
        mixer: 'mamba' (Vim's bidirectional Mamba), 'mamba2' (bidirectional Mamba-2 with heads of headdim) or
            'mamba3' (bidirectional Mamba-3, mambazoo.core.mamba3.Mamba3(bidirectional=True): heads of headdim,
            rope_fraction of the state rotary, MIMO of rank mimo_rank with is_mimo; d_conv unused).
        global_pool: 'token' (the middle class token, Vim), 'avg' (mean of the patch tokens) or ''.
        drop_path_rate: stochastic depth, rising linearly from 0 to this value over the blocks.
        dynamic_img_size: accept other image sizes at run time, resampling the position embedding
            on the fly (otherwise a size other than img_size raises ValueError).
    """

    def __init__(self, img_size=224, patch_size=16, stride=None, in_chans=3, num_classes=1000,
                 embed_dim=192, depth=24, d_state=16, d_conv=4, expand=2, global_pool="token",
                 drop_rate=0.0, drop_path_rate=0.0, norm_eps=1e-5, dynamic_img_size=False, mixer="mamba",
                 headdim=64, rope_fraction=0.5, is_mimo=False, mimo_rank=4):
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool: expected 'token', 'avg' or '', got {global_pool!r}")
        if depth < 1 or embed_dim < 1:
            raise ValueError(f"depth, embed_dim: expected positive ints, got {depth}, {embed_dim}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes: expected an int >= 0 (0: no head, features), got {num_classes!r}")
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.dynamic_img_size = dynamic_img_size
        self.patch_embed = PatchEmbed(img_size, patch_size, stride, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear, 0 at the first block
        if mixer not in MIXERS:
            raise ValueError(f"mixer: expected 'mamba', 'mamba2' or 'mamba3', got {mixer!r}")
        self.mixer_kind = mixer

        def make_mixer(i):  # mixer="mamba2": the bidirectional Mamba-2 mixer (mambazoo.core.mamba2.Mamba2)
            if mixer == "mamba2":
                from mambazoo.core.mamba2 import Mamba2

                return Mamba2(embed_dim, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim,
                              bidirectional=True, norm_eps=norm_eps, layer_idx=i)
            if mixer == "mamba3":  # the bidirectional Mamba-3 mixer (no conv: d_conv is not used)
                from mambazoo.core.mamba3 import Mamba3

                return Mamba3(embed_dim, d_state=d_state, expand=expand, headdim=headdim, rope_fraction=rope_fraction,
                              is_mimo=is_mimo, mimo_rank=mimo_rank, bidirectional=True, layer_idx=i)
            return Mamba(embed_dim, d_state=d_state, d_conv=d_conv, expand=expand, bidirectional=True,
                         norm_eps=norm_eps, layer_idx=i)

        self.blocks = nn.ModuleList(
            Block(embed_dim, make_mixer(i), norm_eps=norm_eps, drop_path=rates[i]) for i in range(depth)
        )
        self.norm = RMSNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()
        self.register_load_state_dict_pre_hook(_convert_official_keys)
        self.grad_checkpointing = False
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=self.patch_embed.stride[0])
                             for i in range(depth)]

    # -- initialization ---------------------------------------------------------------------------
    def init_weights(self) -> None:
        """trunc-normal(0.02) embeddings and linears, zero biases (except dt_proj's), and the
        GPT-2 / Mamba rescaling of each block's out_proj by 1 / sqrt(depth)."""
        if self.pos_embed.is_meta:
            return
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.endswith("dt_proj"):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for blk in self.blocks:
            with torch.no_grad():
                blk.mixer.out_proj.weight.div_(math.sqrt(len(self.blocks)))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of parameters that timm's optimizer factory keeps out of weight decay."""
        skip = {"pos_embed", "cls_token"}
        skip |= {n for n, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}
        return skip

    # -- timm interface ---------------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head by a fresh one with ``num_classes`` outputs (0: no head, features)."""
        if global_pool is not None:
            if global_pool not in ("token", "avg", ""):
                raise ValueError(f"global_pool: expected 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        w = self.pos_embed
        self.head = nn.Linear(self.embed_dim, num_classes, device=w.device) if num_classes > 0 else nn.Identity()
        if num_classes > 0 and not w.is_meta:
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def set_img_size(self, img_size) -> None:
        """Change the model's image size for good, resampling the position embedding (bicubic)."""
        pe = self.patch_embed
        new = _pair(img_size)
        if any(i < p for i, p in zip(new, pe.patch_size)):
            raise ValueError(f"img_size {new} is smaller than one patch {pe.patch_size}")
        grid = pe.grid_for(new)
        with torch.no_grad():
            resized = resample_abs_pos_embed(self.pos_embed.data, list(grid), list(pe.grid_size), num_prefix_tokens=1)
        self.pos_embed = nn.Parameter(resized)
        pe.img_size, pe.grid_size, pe.num_patches = new, grid, grid[0] * grid[1]

    def load_pretrained(self, path, format: str = "auto", use_ema: bool = False) -> None:
        """Load a local weights file, ours or an official hustvl/Vim checkpoint (see
        ``mambazoo.vim.weights.load_weights``; timm calls this only for .npz files): the position
        embedding is resampled, a head of another size is kept fresh; any other mismatch raises
        ValueError naming the keys, before anything is loaded."""
        from mambazoo.vim.weights import load_weights

        load_weights(self, path, fresh=("head.weight", "head.bias"), format=format, use_ema=use_ema)

    # -- forward ----------------------------------------------------------------------------------
    def _pos_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embedding (1, 1 + gh*gw, dim) for a token grid, class token's row first (resampled when the
        grid is not the model's)."""
        if grid == self.patch_embed.grid_size:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, list(grid), list(self.patch_embed.grid_size), num_prefix_tokens=1)

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch tokens (batch, gh*gw, dim) -> (batch, 1 + gh*gw, dim): class token at gh*gw // 2."""
        pe = self._pos_for(grid)
        cls = (self.cls_token + pe[:, :1]).expand(x.shape[0], -1, -1)
        mid = x.shape[1] // 2
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():  # one pass: halves added in place
            dtype = torch.promote_types(x.dtype, pe.dtype)
            out = x.new_empty(x.shape[0], x.shape[1] + 1, x.shape[2], dtype=dtype)
            torch.add(x[:, :mid], pe[:, 1:mid + 1], out=out[:, :mid])
            out[:, mid:mid + 1] = cls
            torch.add(x[:, mid:], pe[:, mid + 1:], out=out[:, mid + 1:])
            return out
        x = x + pe[:, 1:]
        return torch.cat([x[:, :mid], cls.to(x.dtype), x[:, mid:]], dim=1)

    def forward_tokens(self, x: torch.Tensor, consume: bool = False, norm: bool = False) -> torch.Tensor:
        """The block stack alone: tokens (batch, L, dim) -> (batch, L, dim) fp32, before the final norm (after it with
        norm=True). Inference on CUDA (no autograd) defers each residual add to the next block's fused add + RMSNorm,
        the last one to the final norm's (norm=True: one pass, the residual stream not written back);
        consume=True (forward_features, which made x) lets that path use fp32 contiguous x as its residual
        stream, overwriting it, instead of a copy: one (batch, L, dim) fp32 less at the peak."""
        if not self.training and fused_decode_enabled(x.device):
            if consume and x.dtype == torch.float32 and x.is_contiguous():
                hidden, residual = None, x
            else:
                hidden, residual = x, None
            del x  # a block output replaces it
            own = consume  # whether hidden may be overwritten (the normed mixer input then reuses its memory)
            for blk in self.blocks:
                hidden, residual = blk.forward_residual(hidden, residual, consume=own)
                own = True  # a block's output
            if norm and isinstance(self.norm, RMSNorm) and residual is not None:
                b, L, d = residual.shape
                out, _ = dispatch.add_rms_norm(hidden.reshape(b * L, d), residual.view(b * L, d), self.norm.weight,
                                      self.norm.eps, out_dtype=torch.float32, keep_residual=False)
                return out.view(b, L, d)
            x = residual + hidden if residual is not None else hidden.float()
            return self.norm(x) if norm else x
        for blk in self.blocks:
            x = self._run_block(blk, x)
        return self.norm(x) if norm else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, in_chans, H, W) -> normalized tokens (batch, 1 + num_patches, dim), class token in the middle."""
        if x.dim() == 4 and tuple(x.shape[2:]) != self.patch_embed.img_size and not self.dynamic_img_size:
            raise ValueError(
                f"image: expected {self.patch_embed.img_size} pixels, got {tuple(x.shape[2:])}; build the model "
                f"with img_size={tuple(x.shape[2:])} (position embeddings are interpolated) or dynamic_img_size=True"
            )
        grid = self.patch_embed.grid_for(x.shape[2:])
        tokens = self._patch_tokens(x, grid)
        if tokens is None:
            tokens = self._pos_embed(self.patch_embed(x), grid)
        # no local keeps the patch or position-embedded tokens alive while the blocks run (inference peak memory)
        return self.forward_tokens(self.pos_drop(tokens), consume=True, norm=True)

    def _patch_tokens(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor | None:
        """patch_embed + _pos_embed in one kernel (kernels/patch_embed/ops.py: the image read once, no patch copy) at
        inference under half-precision autocast on the fused path, for the patch shapes it takes; else None
        (mambazoo.core.dispatch.fused_patch: the backend's fused_patch switch)."""
        pe_mod = self.patch_embed
        if (self.training or x.dim() != 4 or not fused_decode_enabled(x.device) or not dispatch.fused_patch(x)
                or not dispatch.patch_tokens_fit(pe_mod.patch_size, pe_mod.stride, self.embed_dim)):
            return None
        dtype = torch.get_autocast_dtype(x.device.type)
        pe_mod.check_image(x)
        pos = self._pos_for(grid)
        w = pe_mod.proj.weight
        w_t = w.reshape(w.shape[0], -1).t().to(dtype, memory_format=torch.contiguous_format)
        bias = pe_mod.proj.bias.to(dtype) if pe_mod.proj.bias is not None else None
        mid = grid[0] * grid[1] // 2
        out = dispatch.patch_tokens(x, w_t, bias, pos[0, 1:].float().contiguous(), pe_mod.patch_size, mid)
        out[:, mid] = (self.cls_token[0, 0] + pos[0, 0]).float()
        return out

    def save_pretrained(self, save_directory) -> "os.PathLike":
        """config.json + model.safetensors that ``mambazoo.from_pretrained(dir)`` rebuilds (mambazoo.hub.save_pretrained)."""
        from mambazoo.hub import save_pretrained

        return save_pretrained(self, save_directory)

    # -- timm conventions: checkpointing, layer groups, intermediate features ---------------------
    def _run_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One block, through activation checkpointing when it is on and autograd records (training)."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (timm's switch)."""
        self.grad_checkpointing = bool(enable)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups by depth for timm's layer-wise LR decay: the embeddings first, block i, the final
        norm last (the head is left out, as timm's own ViT does)."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature API. x (batch, in_chans, H, W) -> the outputs of the blocks in ``indices`` (an int n:
        the last n; a list: those blocks; default all), each (batch, embed_dim, gh, gw) (NCHW) or
        (batch, gh*gw, embed_dim) (NLC), class token removed; with ``norm`` each through the final norm. Returns
        that list, or (final normed tokens (batch, 1 + gh*gw, dim), list) unless ``intermediates_only``."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt: expected 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = _take_indices(len(self.blocks), indices)
        self.patch_embed.check_image(x)
        grid = self.patch_embed.grid_for(x.shape[2:])
        if tuple(x.shape[2:]) != self.patch_embed.img_size and not self.dynamic_img_size:
            raise ValueError(f"image: expected {self.patch_embed.img_size} pixels, got {tuple(x.shape[2:])}")
        x = self.pos_drop(self._pos_embed(self.patch_embed(x), grid))
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        mid = grid[0] * grid[1] // 2
        out = []
        for i, blk in enumerate(blocks):
            x = self._run_block(blk, x)
            if i in take:
                y = self.norm(x) if norm else x
                y = torch.cat([y[:, :mid], y[:, mid + 1:]], dim=1)
                if output_fmt == "NCHW":
                    y = y.reshape(y.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
                out.append(y)
        if intermediates_only:
            return out
        return self.norm(x), out

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the final norm / head); returns the kept indices."""
        take, max_index = _take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (batch, 1 + num_patches, dim) -> logits (batch, num_classes), or the pooled
        features (batch, dim) when ``pre_logits``."""
        if self.global_pool == "token":
            x = x[:, (x.shape[1] - 1) // 2]
        elif self.global_pool == "avg":
            mid = (x.shape[1] - 1) // 2
            x = torch.cat([x[:, :mid], x[:, mid + 1:]], dim=1).mean(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _take_indices(n: int, indices) -> tuple[list[int], int]:
    """timm's out_indices: None = all n blocks, an int k = the last k, a list = those (negative from the end)."""
    if indices is None:
        indices = n
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"indices: expected 1..{n} (the last k blocks), got {indices}")
        take = list(range(n - indices, n))
    else:
        take = [n + i if i < 0 else i for i in indices]
        if not take or any(not 0 <= i < n for i in take):
            raise ValueError(f"indices: expected block indices in [-{n}, {n}), got {list(indices)}")
    return take, max(take)


def _convert_official_keys(module, state_dict, prefix, *_):
    """``load_state_dict`` pre-hook: rename an official hustvl/Vim state dict (under ``prefix``) to ours
    in place, leniently (what it cannot map is left for load_state_dict's own missing/unexpected report)."""
    from mambazoo.vim.convert import _looks_official, convert_official_vim

    own = [k for k in state_dict if k.startswith(prefix)]
    if not _looks_official(k[len(prefix):] for k in own):
        return
    converted = convert_official_vim({k[len(prefix):]: state_dict.pop(k) for k in own}, strict=False)
    state_dict.update({prefix + k: v for k, v in converted.items()})
