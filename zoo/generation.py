"""Autoregressive generation for every CausalLM: prefill the prompt with the parallel scan (and
attention), then decode token by token with the recurrent cache (constant size for Mamba layers, a
preallocated KV cache for attention layers). On CUDA the decode step runs as a captured CUDA graph.

    ids = generate(model, prompt, max_new_tokens=64, temperature=0.8, top_p=0.95)
    for tokens in stream_generate(model, prompt, 64): ...   # tokens (batch,) as they come
"""

from __future__ import annotations

import math
import os
from typing import Iterator

import torch

from mambazoo.core.cache import InferenceCache
from mambazoo.graphs import capture


def _check_sampling(max_new_tokens, temperature, top_k, top_p, eos, vocab_size) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
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


def _eos_ids(eos, vocab_size: int) -> list[int] | None:
    """eos as None, an int, or a list / tuple / tensor of ints -> list of ids (checked against the vocabulary)."""
    if eos is None:
        return None
    if isinstance(eos, torch.Tensor):
        eos = eos.flatten().tolist()
    ids = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else list(eos) if isinstance(eos, (list, tuple)) else None
    if not ids or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab_size for i in ids):
        raise ValueError(f"eos: expected None, a token id or a list of token ids in [0, {vocab_size}), got {eos!r}")
    return ids


def _prompt_lengths(input_ids: torch.Tensor, attention_mask) -> torch.Tensor | None:
    """Each row's prompt length under a left-padding ``attention_mask`` (batch, L) of 0/1; None when it masks nothing."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask: expected a tensor of input_ids' shape {tuple(input_ids.shape)}, got {shape}")
    m = attention_mask.to(input_ids.device)
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("attention_mask: expected 0 (padding) and 1 (token) values only")
    m = m.long()
    lengths = m.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError("attention_mask: every row needs at least one token (a row is all padding)")
    L = m.shape[1]
    expected = (torch.arange(L, device=m.device)[None] >= (L - lengths)[:, None]).long()
    if not torch.equal(m, expected):
        raise ValueError("attention_mask: expected left padding (zeros, then ones in each row); pad prompts on the "
                         "left for generation (tokenizer.padding_side = 'left')")
    return None if bool((lengths == L).all()) else lengths


def _has_attention(model) -> bool:
    return any(not hasattr(b.mixer, "fwd") for b in model.layers)


def kv_cache_bytes(model, batch: int, max_len: int) -> int:
    """Bytes of the decode cache ``allocate_cache(batch, max_len)`` would take (sized on the meta device)."""
    return model.allocate_cache(batch, max_len, device="meta").nbytes()


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


def check_memory(model, batch: int, max_len: int, device: torch.device, out_tokens: int = 0) -> None:
    """ValueError before anything is allocated when the decode cache (+ ``out_tokens`` int64 outputs) would not
    fit in the device's free memory."""
    need = kv_cache_bytes(model, batch, max_len) + 8 * out_tokens
    free = _free_bytes(device)
    if free is not None and need > free:
        raise ValueError(f"max_new_tokens: prompt + new tokens = {max_len} per sequence (batch {batch}) needs "
                         f"{need / 2**30:.3g} GiB of cache and output, but {device} has {free / 2**30:.3g} GiB free; "
                         "ask for fewer new tokens (or use a sliding attention window)")


def _process_logits(logits, present, repetition_penalty, suppress) -> torch.Tensor:
    """transformers' order: repetition penalty on tokens seen so far, then eos suppressed (min_new_tokens)."""
    if present is not None:
        penalized = torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
        logits = torch.where(present, penalized, logits)
    if suppress is not None:
        logits = logits.index_fill(-1, suppress, float("-inf"))
    return logits


@torch.inference_mode()
def stream_generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, eos=None,
                    cuda_graph: bool = True, generator: torch.Generator | None = None,
                    cache_len: int | None = None, *, attention_mask: torch.Tensor | None = None,
                    repetition_penalty: float = 1.0, min_new_tokens: int = 0, do_sample: bool | None = None,
                    pad_token_id: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the new tokens (batch,) one step at a time.

    input_ids (batch, L) int64; ``attention_mask`` (batch, L) of 0/1 with left padding gives each row the
    tokens it would get alone. ``eos``: an id or a list of ids; a sequence that emitted one continues with
    ``pad_token_id`` (default: the first eos id); the stream stops when all have (or after max_new_tokens).
    ``min_new_tokens``: eos is impossible before that many tokens. ``repetition_penalty`` (> 0, 1 = off):
    transformers' (logits of tokens already in the row divided by it when positive, multiplied when negative).
    ``do_sample``: False is greedy, True samples; None samples unless temperature is 0. ``cache_len`` sizes the KV
    caches (default prompt length + max_new_tokens; a captured graph is reused for the same batch and size)."""
    model.check_input_ids(input_ids)
    _check_sampling(max_new_tokens, temperature, top_k, top_p, None, model.config.vocab_size)
    vocab = model.config.vocab_size
    eos_ids = _eos_ids(eos, vocab)
    if not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens: expected an int >= 0, got {min_new_tokens!r}")
    if not isinstance(repetition_penalty, (int, float)) or not math.isfinite(repetition_penalty) or repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty: expected a finite float > 0 (1 = off), got {repetition_penalty!r}")
    if do_sample not in (None, True, False):
        raise ValueError(f"do_sample: expected None, True or False, got {do_sample!r}")
    if pad_token_id is not None and (not isinstance(pad_token_id, int) or not 0 <= pad_token_id < vocab):
        raise ValueError(f"pad_token_id: expected a token id in [0, {vocab}), got {pad_token_id!r}")
    lengths = _prompt_lengths(input_ids, attention_mask)
    if max_new_tokens == 0:
        return
    greedy = do_sample is False or temperature == 0
    batch, L = input_ids.shape
    cache_len = L + max_new_tokens if cache_len is None else cache_len
    if cache_len < L + max_new_tokens:
        raise ValueError(f"cache_len: expected >= prompt + new tokens = {L + max_new_tokens}, got {cache_len}")
    if lengths is not None and _has_attention(model):
        # the KV cache's slots are shared by the batch: each left-padded prompt runs alone
        yield from _rows_alone(model, input_ids, lengths, max_new_tokens, temperature, top_k, top_p, eos_ids,
                               cuda_graph, generator, repetition_penalty, min_new_tokens, do_sample, pad_token_id)
        return
    check_memory(model, batch, cache_len, input_ids.device)
    was_training = model.training
    model.eval()  # no MoE token dropping, no drop-path while decoding
    try:
        cache, step = _decoder(model, batch, cache_len, input_ids.device, cuda_graph)
        if lengths is None:
            h = model.forward_hidden(input_ids, cache)[:, -1:]  # prefill; logits of the last token only
        else:  # left padding, Mamba layers only: each prompt prefilled alone, its state copied into its row
            rows = []
            for b in range(batch):
                alone = model.allocate_cache(1, int(lengths[b]), device=input_ids.device)
                rows.append(model.forward_hidden(input_ids[b:b + 1, L - int(lengths[b]):], alone)[:, -1:])
                for mine, theirs in zip(cache.layers, alone.layers):
                    mine.conv[b].copy_(theirs.conv[0])
                    mine.ssm[b].copy_(theirs.ssm[0])
            h = torch.cat(rows)
            cache.seqlen_offset = L
        with model.autocast():
            logits = model._logits(h)[:, 0]
        present = None
        if repetition_penalty != 1:
            present = torch.zeros(batch, logits.shape[-1], dtype=torch.bool, device=logits.device)
            real = torch.ones_like(input_ids, dtype=torch.bool) if lengths is None else \
                torch.arange(L, device=input_ids.device)[None] >= (L - lengths)[:, None]
            present.scatter_(1, input_ids, real)
        eos_t = torch.tensor(eos_ids, device=input_ids.device) if eos_ids else None
        fill = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else None)
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        rows_idx = torch.arange(batch, device=input_ids.device)
        for i in range(max_new_tokens):
            logits = _process_logits(logits, present, repetition_penalty,
                                     eos_t if (eos_t is not None and i < min_new_tokens) else None)
            tok = logits.argmax(-1) if greedy else sample(logits, temperature or 1.0, top_k, top_p, generator)
            if eos_t is not None:
                tok = tok.masked_fill(finished, fill)
                finished |= torch.isin(tok, eos_t)
            if present is not None:
                present[rows_idx, tok] = True
            yield tok
            if i + 1 == max_new_tokens or (eos_t is not None and bool(finished.all())):
                return
            logits = step(tok)
    finally:
        model.train(was_training)


def _rows_alone(model, input_ids, lengths, max_new_tokens, temperature, top_k, top_p, eos_ids, cuda_graph,
                generator, repetition_penalty, min_new_tokens, do_sample, pad_token_id):
    """stream_generate of each left-padded row on its own, stepped together; a row that stopped yields its fill."""
    L = input_ids.shape[1]
    fill = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    streams = [stream_generate(model, input_ids[b:b + 1, L - int(n):], max_new_tokens, temperature, top_k, top_p,
                               eos_ids, cuda_graph, generator, repetition_penalty=repetition_penalty,
                               min_new_tokens=min_new_tokens, do_sample=do_sample, pad_token_id=pad_token_id)
               for b, n in enumerate(lengths.tolist())]
    done = [False] * len(streams)
    for _ in range(max_new_tokens):
        toks = []
        for b, s in enumerate(streams):
            t = None if done[b] else next(s, None)
            if t is None:
                done[b] = True
                t = torch.full((1,), fill, dtype=torch.long, device=input_ids.device)
            toks.append(t)
        if all(done):
            return
        yield torch.cat(toks)
        if eos_ids is not None and all(done[b] or int(toks[b][0]) in eos_ids for b in range(len(streams))):
            return


def release_decoder(model) -> None:
    """Drop the CUDA graph and cache that ``generate`` keeps on the model for reuse (frees its memory)."""
    if getattr(model, "_graph_decoder", None) is not None:
        model._graph_decoder = None


def _is_hf_streamer(streamer) -> bool:
    return hasattr(streamer, "put") and hasattr(streamer, "end")


def _encode_texts(model, texts: list[str]):
    """Prompts as text -> (input_ids (batch, L) left-padded, attention_mask or None), with ``model.tokenizer``."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("input_ids: got text, but the model has no tokenizer (model.tokenizer is None); pass "
                         "token ids (batch, L), or load the model with mambazoo.from_pretrained")
    rows = []
    for t in texts:
        if not isinstance(t, str):
            raise ValueError(f"input_ids: expected a str or a list of str, got an element of type {type(t).__name__}")
        ids = tok.encode(t)
        rows.append(list(ids))
    if any(not r for r in rows):
        raise ValueError("input_ids: a prompt encodes to no tokens; give some text")
    L = max(map(len, rows))
    pad = getattr(tok, "pad_token_id", None) or 0
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, (None if bool(mask.all()) else mask)


def generate(model, input_ids=None, max_new_tokens: int = 20, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos=None,
             streamer=None, cuda_graph: bool = True,
             generator: torch.Generator | None = None, cache_len: int | None = None, *,
             attention_mask: torch.Tensor | None = None, eos_token_id=None, pad_token_id: int | None = None,
             repetition_penalty: float = 1.0, min_new_tokens: int = 0, do_sample: bool | None = None):
    """Prompt input_ids (batch, L) int64 -> (batch, L + n) with n <= max_new_tokens new tokens (fewer when every
    sequence emitted an eos id). Text in (a str or a list of str, with ``model.tokenizer``) gives text out: each
    prompt followed by its continuation.

    The keywords of transformers' ``generate`` mean the same here: ``attention_mask`` (left padding; each row
    gets what it would get alone), ``eos_token_id`` (int or list; alias of ``eos``), ``pad_token_id``,
    ``repetition_penalty``, ``min_new_tokens``, ``do_sample``. ``streamer``: a callable called with the new
    tokens (batch,) per step, or a transformers streamer (``TextStreamer``: put(prompt), put(tokens), end())."""
    if streamer is not None and not (callable(streamer) or _is_hf_streamer(streamer)):
        raise ValueError(f"streamer: expected a callable taking a (batch,) tensor or a transformers streamer "
                         f"(put/end), got {type(streamer).__name__}")
    if eos is not None and eos_token_id is not None and eos != eos_token_id:
        raise ValueError(f"eos and eos_token_id name the same thing; got both ({eos!r}, {eos_token_id!r})")
    eos = eos if eos is not None else eos_token_id
    texts, single = None, isinstance(input_ids, str)
    if isinstance(input_ids, str) or (isinstance(input_ids, (list, tuple)) and input_ids
                                      and all(isinstance(t, str) for t in input_ids)):
        texts = [input_ids] if isinstance(input_ids, str) else list(input_ids)
        input_ids, attention_mask = _encode_texts(model, texts)
        if eos is None:
            eos = getattr(model.tokenizer, "eos_token_id", None)
    if input_ids is None:
        raise ValueError("input_ids: expected a (batch, L) tensor of token ids or text, got None")
    hf_streamer = streamer is not None and _is_hf_streamer(streamer)
    if hf_streamer:
        streamer.put(input_ids.cpu())
    if isinstance(max_new_tokens, int) and isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 \
            and max_new_tokens > 0:  # the whole output is kept: count it with the cache
        check_memory(model, input_ids.shape[0], input_ids.shape[1] + max_new_tokens, input_ids.device,
                     out_tokens=input_ids.shape[0] * (input_ids.shape[1] + max_new_tokens))
    # new tokens go into (batch, 1024) blocks: memory grows with what was generated, a few bytes a token
    out, block, n = [input_ids], None, 0
    for tok in stream_generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos,
                               cuda_graph, generator, cache_len, attention_mask=attention_mask,
                               repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens,
                               do_sample=do_sample, pad_token_id=pad_token_id):
        if hf_streamer:
            streamer.put(tok.cpu())
        elif streamer is not None:
            streamer(tok)
        if block is None or n == block.shape[1]:
            if block is not None:
                out.append(block)
            block, n = tok.new_empty(tok.shape[0], min(1024, max_new_tokens)), 0
        block[:, n] = tok
        n += 1
    if block is not None:
        out.append(block[:, :n])
    if hf_streamer:
        streamer.end()
    ids = torch.cat(out, dim=1)
    if texts is None:
        return ids
    tok = model.tokenizer
    L = input_ids.shape[1]
    decoded = [t + _decode(tok, row[L:].tolist()) for t, row in zip(texts, ids)]
    return decoded[0] if single else decoded


def _decode(tok, ids: list[int]) -> str:
    try:
        return tok.decode(ids, skip_special_tokens=True)
    except TypeError:
        return tok.decode(ids)
