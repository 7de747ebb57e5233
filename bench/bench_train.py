"""LoRA training step, ours (model.py) vs transformers + peft, on the same model, dtype and batch.

    python bench/bench_train.py                       # bf16, batch 4 x 512, 1 and 3 adapters
    python bench/bench_train.py --dtype float32 --adapters 3 --reps 3
    python bench/bench_train.py --profile             # + torch.profiler table of our step

One step = forward + loss, backward, AdamW step on the LoRA parameters (zero_grad included).
Ours:   loss = model.loss(ids, labels); loss.backward(); opt.step()
Theirs: loss = peft_model(input_ids=ids, labels=labels).loss; loss.backward(); opt.step()
Same LoRA config on both sides (r 8, alpha 32, dropout 0.05, q_proj + v_proj), the same number
of active adapters (peft: add_adapter + base_model.set_adapter([...])), both in train mode, the
same input tensors: real scitldr examples, chat-formatted prompt + TLDR, loss on the TLDR only.
The reps interleave ours / theirs / a plain matmul (A B C A B C ...), medians are reported.

FLOPs of one step (counted analytically from the config; N = batch*seq tokens, L layers,
d hidden, H / kvh heads of width hd, f MLP width, V vocab, n_lab label positions, r LoRA rank,
n adapters; "out" of a LoRA target = its output width: q_proj H*hd, v_proj kvh*hd):

  linears   P = d*H*hd + 2*d*kvh*hd + H*hd*d + 3*d*f      (q, k, v, o, gate, up, down per layer)
            forward 2*P*N*L; backward of the frozen weights only the input gradient: 2*P*N*L
  attention forward QK^T and PV: 2 * 2*B*H*seq^2*hd per layer, HALVED for causality (only the
            lower triangle is needed); backward 2x forward  ->  3 * 2*B*H*seq^2*hd * L in all
            (the full-square count, as in PaLM's MFU formula, is printed alongside)
  LoRA      per adapter and target: forward 2*N*r*(d + out); backward 2x (input + weight grads)
  vocab     ours only at the n_lab label positions: forward 2*d*V*n_lab, backward (input grad
            only: the tied embedding is frozen) 2*d*V*n_lab
  total     4*P*N*L + 3*attn_fwd*L + 3*lora_fwd + 4*d*V*n_lab
  (norms, RoPE, SwiGLU, softmax, the optimizer and the skipped input gradient of layer 0's
  q/k/v are not counted.) The same "useful" count divides theirs' time too, although peft
  projects every position onto the vocabulary (2*d*V*N more each way).

The reference FLOP/s is torch.mm of two 2048x2048 matrices in the same dtype, timed in the same
loop. Target (bf16): our step >= 50% of it; 3 adapters: theirs/ours >= 1.3.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (dtype_arg, environment, hf_model, interleave, matmul_bench, med,  # noqa: E402
                    training_batch)

import torch  # noqa: E402  (after common: it sets OMP_WAIT_POLICY first)

import model as M  # noqa: E402

R, ALPHA, DROPOUT, TARGETS = 8, 32, 0.05, ("q_proj", "v_proj")


def step_flops(cfg: M.LlamaConfig, batch: int, seq: int, n_lab: int, n_adapters: int, r: int = R,
               causal: bool = True) -> float:
    N, L, d, hd = batch * seq, cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim
    H, kvh, f, V = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size
    P = d * H * hd + 2 * d * kvh * hd + H * hd * d + 3 * d * f
    linears = 4 * P * N * L
    attn_fwd = 2 * 2 * batch * H * seq * seq * hd * (0.5 if causal else 1.0)
    attention = 3 * attn_fwd * L
    outs = {"q_proj": H * hd, "k_proj": kvh * hd, "v_proj": kvh * hd, "o_proj": d}
    lora_fwd = sum(2 * N * r * (d + outs[t]) for t in TARGETS) * n_adapters * L
    vocab = 4 * d * V * n_lab
    return linears + attention + 3 * lora_fwd + vocab


def build_ours(dtype, n_adapters: int):
    model, tok = M.load_model(None, dtype=dtype)
    for i in range(n_adapters):
        M.add_lora(model, f"a{i}", r=R, alpha=ALPHA, dropout=DROPOUT, targets=TARGETS)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, tok, params


def build_theirs(dtype, n_adapters: int):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=list(TARGETS),
                     task_type="CAUSAL_LM")
    pm = get_peft_model(hf_model(dtype), cfg, adapter_name="a0")
    for i in range(1, n_adapters):
        pm.add_adapter(f"a{i}", cfg)
    pm.base_model.set_adapter([f"a{i}" for i in range(n_adapters)])  # all active and trainable
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    return pm, params


def timed_step(loss_fn, opt, seg: dict):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    seg.setdefault("forward", []).append(t1 - t0)
    seg.setdefault("backward", []).append(t2 - t1)
    seg.setdefault("optimizer", []).append(t3 - t2)


def run_config(n: int, args, dtype) -> dict:
    """Build both sides with n adapters, check, time interleaved; the result row."""
    ours, tok, ours_params = build_ours(dtype, n)
    theirs, theirs_params = build_theirs(dtype, n)
    ids, labels, n_real = training_batch(tok, args.batch, args.seq, pack=args.pack)
    n_lab = int((labels[:, 1:] != -100).sum())
    n_ours = sum(p.numel() for p in ours_params)
    n_theirs = sum(p.numel() for p in theirs_params)
    print(f"\n{n} adapter(s), {args.dtype}, batch {args.batch} x {args.seq}: {n_real} non-pad tokens, "
          f"{n_lab} label positions; trainable params ours {n_ours:,} ({len(ours_params)} tensors, "
          f"{ours_params[0].dtype}), theirs {n_theirs:,} ({len(theirs_params)} tensors, "
          f"{theirs_params[0].dtype})")
    if n_ours != n_theirs:
        print("  WARNING: trainable parameter counts differ")
    if not args.no_check:  # same tensors and labels -> same loss (eval: no dropout, B = 0)
        ours.eval(), theirs.eval()
        with torch.no_grad():
            lo = ours.loss(ids, labels).item()
            lt = theirs(input_ids=ids, labels=labels).loss.item()
        print(f"  eval-mode loss check: ours {lo:.4f}  theirs {lt:.4f}")
        ours.train(), theirs.train()

    opt_o = torch.optim.AdamW(ours_params, lr=1e-4)
    opt_t = torch.optim.AdamW(theirs_params, lr=1e-4)
    seg_o, seg_t = {}, {}
    mm, mm_flops = matmul_bench(dtype)
    fns = {
        "ours": lambda: timed_step(lambda: ours.loss(ids, labels), opt_o, seg_o),
        "theirs": lambda: timed_step(lambda: theirs(input_ids=ids, labels=labels).loss, opt_t, seg_t),
        "matmul": mm,
    }
    times = interleave(fns, args.reps, args.warmup, log=print if args.verbose else None)
    w = args.warmup
    seg_o = {k: v[w:] for k, v in seg_o.items()}
    seg_t = {k: v[w:] for k, v in seg_t.items()}
    flops = step_flops(ours.config, args.batch, args.seq, n_lab, n)
    flops_full = step_flops(ours.config, args.batch, args.seq, n_lab, n, causal=False)
    res = dict(n=n, ours=med(times["ours"]), theirs=med(times["theirs"]),
               mm=mm_flops / med(times["matmul"]), flops=flops, flops_full=flops_full,
               seg_o={k: med(v) for k, v in seg_o.items()}, seg_t={k: med(v) for k, v in seg_t.items()},
               pair=med([t / o for o, t in zip(times["ours"], times["theirs"])]))
    print(f"  ours   {res['ours'] * 1e3:8.0f} ms/step  (fwd {res['seg_o']['forward'] * 1e3:.0f}, "
          f"bwd {res['seg_o']['backward'] * 1e3:.0f}, AdamW {res['seg_o']['optimizer'] * 1e3:.1f})  "
          f"all: {' '.join(f'{t * 1e3:.0f}' for t in times['ours'])}")
    print(f"  theirs {res['theirs'] * 1e3:8.0f} ms/step  (fwd {res['seg_t']['forward'] * 1e3:.0f}, "
          f"bwd {res['seg_t']['backward'] * 1e3:.0f}, AdamW {res['seg_t']['optimizer'] * 1e3:.1f})  "
          f"all: {' '.join(f'{t * 1e3:.0f}' for t in times['theirs'])}")
    print(f"  matmul 2048^3 {args.dtype}: {res['mm'] / 1e9:.1f} GFLOP/s (median of {args.reps})")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            timed_step(lambda: ours.loss(ids, labels), opt_o, {})
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--reps", type=int, default=3, help="timed reps per side (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--pack", action="store_true", help="pack several examples per row")
    ap.add_argument("--no-check", action="store_true", help="skip the eval-mode loss comparison")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of our step")
    ap.add_argument("--verbose", action="store_true", help="print every rep")
    args = ap.parse_args(argv)
    dtype = dtype_arg(args.dtype)
    torch.manual_seed(0)
    print(environment())

    results = []
    for n in args.adapters:
        results.append(run_config(n, args, dtype))  # each config's models are freed on return
        gc.collect()

    print(f"\nSummary ({args.dtype}, batch {args.batch} x {args.seq}, medians of {args.reps} interleaved reps)")
    print(f"{'adapters':>8} {'ours ms':>9} {'theirs ms':>10} {'theirs/ours':>12} {'(pairwise)':>11} "
          f"{'ours GFLOP/s':>13} {'matmul GFLOP/s':>15} {'% of matmul':>12} {'(full-attn %)':>14}")
    for r in results:
        fl = r["flops"] / r["ours"]
        print(f"{r['n']:>8} {r['ours'] * 1e3:9.0f} {r['theirs'] * 1e3:10.0f} {r['theirs'] / r['ours']:12.2f} "
              f"{r['pair']:11.2f} {fl / 1e9:13.1f} {r['mm'] / 1e9:15.1f} {100 * fl / r['mm']:11.1f}% "
              f"{100 * r['flops_full'] / r['ours'] / r['mm']:13.1f}%")
    per_step = ", ".join(f"{r['n']} adapter(s) {r['flops'] / 1e9:.0f} G" for r in results)
    theirs_eff = ", ".join(f"{r['flops'] / r['theirs'] / 1e9:.1f}" for r in results)
    print(f"(useful FLOPs per step: {per_step}; theirs' GFLOP/s with the same count: {theirs_eff})")


if __name__ == "__main__":
    main()
