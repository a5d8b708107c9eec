"""Generation benchmark: decode throughput (tokens/s) and peak memory, side by side.

    python scripts/bench_generate.py                 # GPU, bf16, the issue's grid
    python scripts/bench_generate.py --small --device cpu   # a quick dry run

Models (random weights, greedy decoding, 256 new tokens, prompts 2k/16k, batch 1/64):
- ours-mamba-130m: zoo's Mamba LM in the mamba-130m shape (24 x 768), decode step in a CUDA graph;
- ours-jamba-tiny: the jamba-tiny hybrid;
- mamba_ssm: the published MambaLMHeadModel (same shape), generate(cg=True); needs mamba_ssm on the
  path (build it from .peer/, see /work/shared/anchors/README.md), skipped with a note otherwise;
- transformer: a Transformer of the same size (12 x [attention, GELU MLP 3072], d 768, 12 heads,
  ~124M parameters) from the same code: SDPA, preallocated KV cache, decode step in a CUDA graph.

Per point: one warm-up generate (compiles kernels, captures the graph), a prefill-only generate
(1 new token) and the full generate; end-to-end tok/s = batch * new / t_full. Decode tok/s =
batch * (new - 1) / t_decode where t_decode is, with --timing subtract (default), t_full - t_prefill
(noisy when the prefill dominates), and with --timing stream the time from the first new token to the
last, taken with a streamer that copies every token to the host (mamba_ssm's streamer protocol; the
same per-step copy for every model). Peak memory is torch.cuda.max_memory_allocated of the full run.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch


from mambazoo import create_model  # noqa: E402
from mambazoo.generation import generate  # noqa: E402
from mambazoo.lm import CausalLM, LMConfig  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def transformer_config(small: bool) -> LMConfig:
    if small:
        return LMConfig(vocab_size=512, n_layer=2, d_model=64, layout="A", ffn="d", d_ffn=256, mlp_kind="gelu",
                        n_heads=4)
    return LMConfig(vocab_size=50277, n_layer=12, d_model=768, layout="A", ffn="d", d_ffn=3072, mlp_kind="gelu",
                    n_heads=12)


class FirstTokenClock:
    """Streamer (mamba_ssm protocol put/end, or a plain callable) that notes when the first new token
    reached the host. ``skip`` = how many puts come before it (mamba_ssm puts the prompt first)."""

    def __init__(self, skip=0):
        self.skip, self.t_first = skip, None

    def put(self, tokens):
        tokens.cpu()
        if self.skip == 0 and self.t_first is None:
            self.t_first = time.perf_counter()
        self.skip -= 1

    __call__ = put

    def end(self):
        pass


class Ours:
    stream_skip = 1  # mambazoo's generate follows the put/end streamer protocol too: the prompt is put first

    def __init__(self, name, model):
        self.name, self.model = name, model

    def points(self, prompt, new):
        m, cache_len = self.model, prompt.shape[1] + new
        g = lambda n, streamer=None: generate(m, prompt, n, temperature=0, cache_len=cache_len,  # noqa: E731
                                              streamer=streamer)
        g(2)  # warm-up: kernels compiled, decode graph captured for (batch, cache_len)
        return g


class Peer:
    """mamba_ssm's MambaLMHeadModel.generate(cg=True)."""

    def __init__(self, device, dtype, small):
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        d, n, v = (64, 2, 512) if small else (768, 24, 50277)
        cfg = MambaConfig(d_model=d, n_layer=n, vocab_size=v, ssm_cfg={"layer": "Mamba1"}, rms_norm=True,
                          residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8)
        self.name, self.stream_skip = "mamba_ssm", 1
        self.model = MambaLMHeadModel(cfg, device=device, dtype=dtype).eval()

    def points(self, prompt, new):
        from mamba_ssm.utils.generation import update_graph_cache

        m, (b, L) = self.model, prompt.shape
        m._decoding_cache = update_graph_cache(m, getattr(m, "_decoding_cache", None), b, L, L + new)
        g = lambda n, streamer=None: m.generate(prompt, max_length=L + n, cg=True, top_k=1,  # noqa: E731
                                                streamer=streamer)
        g(2)
        return g


def bench_point(runner, batch, L, new, device, vocab, timing="subtract"):
    prompt = torch.randint(0, vocab, (batch, L), device=device)
    g = runner.points(prompt, new)
    t_pre = timed(lambda: g(1), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = FirstTokenClock(runner.stream_skip) if timing == "stream" else None
    t_all = timed(lambda: g(new, streamer=clock), device)
    t_end = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    t_dec = (t_end - clock.t_first) if clock is not None else t_all - t_pre
    t_dec = max(t_dec, 1e-9)
    return dict(model=runner.name, batch=batch, prompt=L, new=new, prefill_s=round(t_pre, 4),
                decode_tok_s=round(batch * (new - 1) / t_dec, 1), e2e_tok_s=round(batch * new / t_all, 1),
                ms_per_step=round(1e3 * t_dec / (new - 1), 3), peak_gib=round(peak, 2))


def kv_bytes(cfg: LMConfig, batch, max_len, elem=2):
    n_attn = cfg.layer_layout().count("A")
    kvh = cfg.n_kv_heads or cfg.n_heads
    return n_attn * 2 * batch * max_len * kvh * (cfg.d_model // cfg.n_heads) * elem


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--small", action="store_true", help="tiny shapes and prompts: a dry run")
    ap.add_argument("--prompts", default=None, help="comma-separated prompt lengths (default 2048,16384)")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--models", default="ours-mamba-130m,ours-jamba-tiny,mamba_ssm,transformer")
    ap.add_argument("--timing", choices=("subtract", "stream"), default="subtract")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    prompts = [int(x) for x in (args.prompts or ("32,64" if args.small else "2048,16384")).split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    new = 4 if args.small and args.new == 256 else args.new
    torch.manual_seed(0)
    rows, notes = [], []
    for name in args.models.split(","):
        try:
            if name == "ours-mamba-130m":
                runner = Ours(name, create_model("mamba-tiny" if args.small else "mamba-130m"))
            elif name == "ours-jamba-tiny":
                runner = Ours(name, create_model("jamba-tiny"))
            elif name == "transformer":
                runner = Ours(name, CausalLM(transformer_config(args.small)))
            elif name == "mamba_ssm":
                runner = Peer(device, dtype, args.small)
            else:
                raise ValueError(f"--models: unknown {name!r}")
        except ImportError as e:
            notes.append(f"{name}: skipped ({e}); build the peer from .peer/ (see shared/anchors/README.md)")
            print(notes[-1], flush=True)
            continue
        if isinstance(runner, Ours):
            runner.model.to(device=device, dtype=dtype).eval()
        n_params = sum(p.numel() for p in runner.model.parameters())
        vocab = runner.model.config.vocab_size
        print(f"== {name}: {n_params / 1e6:.1f}M parameters", flush=True)
        for L in prompts:
            for b in batches:
                if isinstance(runner, Ours) and device.type == "cuda":
                    need = kv_bytes(runner.model.config, b, L + new)
                    free = torch.cuda.mem_get_info(device)[0]
                    if need > 0.8 * free:
                        rows.append(dict(model=name, batch=b, prompt=L, new=new, note=f"KV cache {need / 2**30:.0f} GiB > free"))
                        print(rows[-1], flush=True)
                        continue
                try:
                    rows.append(bench_point(runner, b, L, new, device, vocab, args.timing))
                except torch.OutOfMemoryError:
                    rows.append(dict(model=name, batch=b, prompt=L, new=new, note="OOM"))
                print(rows[-1], flush=True)
                if hasattr(runner.model, "_graph_decoder"):
                    runner.model._graph_decoder = None
                if hasattr(runner.model, "_decoding_cache"):
                    runner.model._decoding_cache = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del runner
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, notes, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, notes=notes, device=device_name(device), argv=sys.argv), f, indent=1)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def print_table(rows, notes, device):
    print(f"\ndevice: {device_name(device)}, torch {torch.__version__}")
    print("| model | batch | prompt | prefill s | decode tok/s | end-to-end tok/s | ms/step | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "note" in r:
            print(f"| {r['model']} | {r['batch']} | {r['prompt']} | {r['note']} | | | | |")
        else:
            print(f"| {r['model']} | {r['batch']} | {r['prompt']} | {r['prefill_s']} | {r['decode_tok_s']} | "
                  f"{r['e2e_tok_s']} | {r['ms_per_step']} | {r['peak_gib']} |")
    for n in notes:
        print(f"note: {n}")


if __name__ == "__main__":
    main()
