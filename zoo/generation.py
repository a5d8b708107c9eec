"""Autoregressive generation for every CausalLM: prefill the prompt with the parallel scan (and
attention), then decode token by token with the recurrent cache (constant size for Mamba layers, a
preallocated KV cache for attention layers). On CUDA the decode step runs as a captured CUDA graph.

    ids = generate(model, prompt, max_new_tokens=64, temperature=0.8, top_p=0.95)
    for tokens in stream_generate(model, prompt, 64): ...   # tokens (batch,) as they come
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from mambazoo.core.cache import InferenceCache
from mambazoo.graphs import capture


def _check_sampling(max_new_tokens, temperature, top_k, top_p, eos, vocab_size) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected None or a float in (0, 1], got {top_p}")
    if eos is not None and not 0 <= eos < vocab_size:
        raise ValueError(f"eos: expected None or a token id in [0, {vocab_size}), got {eos}")


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (batch, vocab) -> token ids (batch,) int64. temperature 0 (or top_k 1) is greedy;
    top_k keeps the k most likely tokens, top_p the smallest set whose probability reaches p."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def reset_cache(cache: InferenceCache) -> None:
    """Zero every layer state in place (addresses kept, so a captured graph stays valid)."""
    for s in cache.layers:
        s.reset()
    cache.seqlen_offset = 0


class GraphDecoder:
    """The decode step ``model.step(tokens, cache)`` captured once in a CUDA graph, replayed per token.

    Capturing records the cache's tensor addresses, so the cache is captured empty and reset after."""

    def __init__(self, model, cache: InferenceCache, batch: int, device: torch.device):
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.graph, self.logits = capture(lambda: model.step(self.tokens, cache), device, 2, torch.inference_mode)
        reset_cache(cache)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.cache.seqlen_offset += 1
        return self.logits


def _decoder(model, batch: int, max_len: int, device, cuda_graph: bool):
    """(cache, step function). The graph and its cache are kept on the model for reuse by later calls
    of the same batch and length (capturing costs a few warm-up steps)."""
    dtype = next(model.parameters()).dtype
    if not (cuda_graph and device.type == "cuda"):
        cache = model.allocate_cache(batch, max_len, device=device)
        return cache, lambda tok: model.step(tok, cache)
    key = (batch, max_len, dtype, str(device))
    held = getattr(model, "_graph_decoder", None)
    if held is None or held[0] != key:
        model._graph_decoder = None  # free the previous graph's cache first
        cache = model.allocate_cache(batch, max_len, device=device)
        model._graph_decoder = (key, GraphDecoder(model, cache, batch, device))
    dec = model._graph_decoder[1]
    reset_cache(dec.cache)
    return dec.cache, dec


@torch.inference_mode()
def stream_generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, eos: int | None = None,
                    cuda_graph: bool = True, generator: torch.Generator | None = None,
                    cache_len: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the new tokens (batch,) one step at a time. Sequences that emitted ``eos`` keep emitting
    it; the stream stops when all have (or after max_new_tokens). ``cache_len`` sizes the KV caches
    (default prompt length + max_new_tokens; a captured graph is reused for the same batch and size)."""
    model.check_input_ids(input_ids)
    _check_sampling(max_new_tokens, temperature, top_k, top_p, eos, model.config.vocab_size)
    if max_new_tokens == 0:
        return
    batch, L = input_ids.shape
    cache_len = L + max_new_tokens if cache_len is None else cache_len
    if cache_len < L + max_new_tokens:
        raise ValueError(f"cache_len: expected >= prompt + new tokens = {L + max_new_tokens}, got {cache_len}")
    was_training = model.training
    model.eval()  # no MoE token dropping, no drop-path while decoding
    try:
        cache, step = _decoder(model, batch, cache_len, input_ids.device, cuda_graph)
        h = model.forward_hidden(input_ids, cache)[:, -1:]  # prefill; logits of the last token only
        with model.autocast():
            logits = model._logits(h)[:, 0]
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            tok = sample(logits, temperature, top_k, top_p, generator)
            if eos is not None:
                tok = tok.masked_fill(finished, eos)
                finished |= tok == eos
            yield tok
            if i + 1 == max_new_tokens or (eos is not None and bool(finished.all())):
                return
            logits = step(tok)
    finally:
        model.train(was_training)


def release_decoder(model) -> None:
    """Drop the CUDA graph and cache that ``generate`` keeps on the model for reuse (frees its memory)."""
    if getattr(model, "_graph_decoder", None) is not None:
        model._graph_decoder = None


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos: int | None = None,
             streamer: Callable[[torch.Tensor], None] | None = None, cuda_graph: bool = True,
             generator: torch.Generator | None = None, cache_len: int | None = None) -> torch.Tensor:
    """Prompt input_ids (batch, L) int64 -> (batch, L + n) with n <= max_new_tokens new tokens
    (fewer when every sequence emitted ``eos``). ``streamer(tokens (batch,))`` is called per step."""
    if streamer is not None and not callable(streamer):
        raise ValueError(f"streamer: expected a callable taking a (batch,) tensor, got {type(streamer).__name__}")
    out = [input_ids]
    for tok in stream_generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos,
                               cuda_graph, generator, cache_len):
        if streamer is not None:
            streamer(tok)
        out.append(tok[:, None])
    return torch.cat(out, dim=1)
