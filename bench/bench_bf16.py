"""How far apart are two bf16 implementations, and float32 from either? The embedded model's logits on
real scitldr prompts, computed three ways:

    native   bf16 weights, this CPU's bf16 kernels (oneDNN's with avx512_bf16 or amx_bf16, a slow
             fallback without them)
    upcast   bf16 weights and activations, but every matmul and attention in float32 on the exact bf16
             inputs, the result rounded back to bf16: what a bf16 kernel computes, up to the order of
             its float32 sums
    float32  the float32 model

    python bench/bench_bf16.py                # 4 prompts (~1 min on a 2-core CPU without bf16 instructions)
    python bench/bench_bf16.py --prompts 8

Why: on a CPU without bf16 instructions, bf16 runs could keep bf16 and route their matmuls through
float32 (no slow kernel) instead of switching to --dtype float32. That is worth its code only if
upcast stays much closer to native than float32 does. Printed per pair, over all prompt positions:
mean and max |logit difference|, KL(a || b) of the next-token distributions, and how often their
argmax agrees; and each way's forward time per prompt.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import decode_prompts, environment, med  # noqa: E402

import torch  # noqa: E402  (after common: it sets OMP_WAIT_POLICY first)
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import model as M  # noqa: E402

MATMULS = {F.linear, F.scaled_dot_product_attention, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
           torch.bmm, torch.mm}


class Float32Matmuls(TorchFunctionMode):
    """Inside it, a matmul or attention call with bf16 tensors runs in float32 on their exact values and
    returns its result rounded to bf16; every other op runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in MATMULS or not any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            return func(*args, **kwargs)
        up = lambda a: a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a  # noqa: E731
        return func(*map(up, args), **{k: up(v) for k, v in kwargs.items()}).to(torch.bfloat16)


def compare(a: torch.Tensor, b: torch.Tensor) -> str:
    """[positions, vocab] float32 logits of two ways -> one line of their differences."""
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    kl = (la.exp() * (la - lb)).sum(-1).mean().item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    d = (a - b).abs()
    return f"mean |d| {d.mean().item():.4f}  max |d| {d.max().item():.3f}  KL {kl:.2e}  argmax agrees {agree:.2%}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=4, help="scitldr prompts, each run alone (batch 1, no padding)")
    args = ap.parse_args(argv)
    print(environment())
    bf16, tok = M.load_model(None, dtype=torch.bfloat16)
    fp32, _ = M.load_model(None, dtype=torch.float32)
    prompts = [torch.tensor([p]) for p in decode_prompts(tok, args.prompts)]  # each [1, seq]
    print(f"{len(prompts)} prompts, {sum(p.shape[1] for p in prompts)} positions")

    def upcast(ids):
        with Float32Matmuls():
            return bf16(ids)
    ways = {"native": bf16, "float32": fp32, "upcast": upcast}
    logits, seconds = {w: [] for w in ways}, {w: [] for w in ways}
    with torch.no_grad():
        for ids in prompts:
            for w, fn in ways.items():
                t0 = time.perf_counter()
                logits[w].append(fn(ids)[0].float())  # [seq, vocab]
                seconds[w].append(time.perf_counter() - t0)
    cat = {w: torch.cat(v) for w, v in logits.items()}
    for w in ways:
        print(f"{w:8} forward per prompt: median {med(seconds[w]):.2f} s")
    for a, b in [("upcast", "native"), ("float32", "native"), ("float32", "upcast")]:
        print(f"{a:8} vs {b:7} {compare(cat[a], cat[b])}")


if __name__ == "__main__":
    main()
