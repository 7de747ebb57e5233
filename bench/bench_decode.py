"""Batched greedy decoding throughput, ours (model.generate) vs transformers' generate.

    python bench/bench_decode.py                        # float32, batch 1 and 8, 64 new tokens
    python bench/bench_decode.py --dtype bfloat16 --batch 8 --reps 3
    python bench/bench_decode.py --adapters 3           # + 3 LoRA adapters on both sides (peft)

Prompts: chat-formatted scitldr abstracts (the project's TLDR prompt), different lengths, left
padded on both sides. Exactly max_new_tokens tokens are generated per sequence on both sides:
ours with stop_ids=[] (no early stop), HF with min_new_tokens = max_new_tokens and
do_sample=False. tokens/s = batch * max_new_tokens / wall time of the whole call (prefill
included). The reps interleave ours / theirs (A B A B ...), medians are reported.
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import decode_prompts, dtype_arg, environment, hf_model, interleave, med  # noqa: E402

import torch  # noqa: E402  (after common: it sets OMP_WAIT_POLICY first)

import model as M  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=0, help="LoRA adapters active on both sides (eval mode)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of our generate")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    dtype, new = dtype_arg(args.dtype), args.max_new_tokens
    torch.manual_seed(0)
    print(environment())

    ours, tok = M.load_model(None, dtype=dtype)
    theirs = hf_model(dtype)
    if args.adapters:
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                         task_type="CAUSAL_LM", init_lora_weights=False)  # nonzero B: adapters change outputs
        theirs = get_peft_model(theirs, cfg, adapter_name="a0")
        for i in range(args.adapters):
            M.add_lora(ours, f"a{i}")
            if i:
                theirs.add_adapter(f"a{i}", cfg)
        theirs.base_model.set_adapter([f"a{i}" for i in range(args.adapters)])
        # the same adapter weights on both sides
        with torch.no_grad():
            for name, layer in M.lora_layers(ours).items():
                peft_layer = theirs.get_submodule(f"base_model.model.{name}")
                for a in layer.lora_A:
                    layer.lora_A[a].copy_(peft_layer.lora_A[a].weight)
                    layer.lora_B[a].copy_(peft_layer.lora_B[a].weight)
        theirs.eval()
    ours.eval()

    results = []
    for B in args.batch:
        prompts = decode_prompts(tok, B)
        T = max(len(p) for p in prompts)
        ids = torch.full((B, T), tok.pad_id, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = 1
        out = {}

        def run_ours():
            out["ours"] = M.generate(ours, prompts, new, stop_ids=[], pad_id=tok.pad_id)

        def run_theirs():
            with torch.no_grad():
                o = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                    min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_id)
            out["theirs"] = o[:, T:].tolist()

        times = interleave({"ours": run_ours, "theirs": run_theirs}, args.reps, args.warmup,
                           log=print if args.verbose else None)
        n_ours = sum(len(o) for o in out["ours"])
        n_theirs = sum(len(o) for o in out["theirs"])
        assert n_ours == n_theirs == B * new, (n_ours, n_theirs, B * new)
        # HF's min_new_tokens forbids eos before the end, ours (stop_ids=[]) does not: compare the
        # tokens up to ours' first eos, after which the two legitimately differ.
        cut = [next((j for j, t in enumerate(o) if t in tok.eos_ids), new) for o in out["ours"]]
        same = sum(a[:c] == b[:c] for a, b, c in zip(out["ours"], out["theirs"], cut))
        r = dict(B=B, T=T, ours=B * new / med(times["ours"]), theirs=B * new / med(times["theirs"]),
                 pair=med([t / o for o, t in zip(times["ours"], times["theirs"])]), same=same)
        results.append(r)
        print(f"batch {B} (prompts {min(map(len, prompts))}-{T} tokens, left padded): "
              f"ours {med(times['ours']):.2f} s, theirs {med(times['theirs']):.2f} s per call; "
              f"greedy outputs identical up to the first eos: {same}/{B} sequences")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run_ours()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        gc.collect()

    print(f"\nSummary ({args.dtype}, {new} new tokens per sequence, {args.adapters} adapter(s), "
          f"medians of {args.reps} interleaved reps)")
    print(f"{'batch':>5} {'ours tok/s':>11} {'HF tok/s':>9} {'ours/HF':>8} {'(pairwise)':>11}")
    for r in results:
        print(f"{r['B']:>5} {r['ours']:11.1f} {r['theirs']:9.1f} {r['ours'] / r['theirs']:8.2f} {r['pair']:11.2f}")


if __name__ == "__main__":
    main()
