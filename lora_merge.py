"""Adaptive LoRA merge with parameter pruning (Miyano & Arase, 2025): training and the CLI.

    python lora_merge.py --task scitldr --ratio 0.3             # Merge+Del, related modules DS+AE
    python lora_merge.py --task scitldr --ratio 0.1:0.6:0.1      # grid search of Del% on validation
    python lora_merge.py --task nlp-paper-ja --ratio 0 --with-target   # "Ours Merge" (+TGT)
    python lora_merge.py --task scitldr --method zero-shot | lora | lorahub

Stage 1 trains one LoRA module per related task (and TGT on the 50 target examples); stage 2
puts them all on the frozen model at once, W0 + B_T A_T + B_1 A_1 + ... + B_N A_N, trains them
on the 50 target examples and, after every optimizer step, prunes the lowest s% of each LoRA
matrix by I(W_ij) = |W_ij| * ||X_j||_2 (Algorithm 1, `train` below). Both stages are the same
loop: stage 1 is Algorithm 1 with nothing to prune.

Choices where the paper is silent (all flags):
- early stopping: patience 3 epochs on validation loss, keep the best epoch (Section 4.4 says
  early stopping on per-epoch validation loss, not the patience);
- effective batch 16 from micro-batches of 4 by gradient accumulation; the loss of a step is the
  mean over all summary tokens of its 16 examples;
- importance is computed on the 50 validation examples, after the optimizer step, with the
  updated weights (Algorithm 1's order: update, eval importance, prune);
- one Del% per run for every matrix; a single --ratio is used as is, several are a grid search
  scored on validation by the task metric with greedy decoding (Section 4.3).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import data
import eval as metrics
import model as M
import prune

ROOT = Path(__file__).resolve().parent
RELATED = {"en": ["dialogsum", "aeslc"], "ja": ["livedoor-ja", "xscitldr-ja"]}  # defaults per language


@dataclass
class TrainConfig:
    lr: float = 1e-4  # Table 5
    batch_size: int = 16  # Table 5, effective (gradient accumulation)
    micro_batch: int = 4  # examples per forward/backward; memory only, not the math
    epochs: int = 40  # Table 5: at most 40, early stopping decides
    patience: int = 3  # epochs without a better validation loss before stopping
    seed: int = 0
    ratio: float = 0.0  # s: fraction of each LoRA matrix pruned after every step (0 = "Ours Merge")
    importance: str = "input"  # "input": |W| * ||X||; "grad": |W * dL/dW| with EMA/uncertainty
    unit: str = "parameter"  # "parameter": lowest s% per matrix; "module": whole modules below threshold
    threshold: float = 0.0  # unit="module": reset modules whose mean importance is below this
    reset: str = "zero"  # pruned entries go to "zero" or back to their "init" value (merge start)
    beta1: float = 0.85  # grad importance EMA
    beta2: float = 0.85  # grad importance uncertainty EMA


# ----------------------------------------------------------------------------------------
# Batches and losses


def encode_examples(tok, task, examples: list[dict], max_source_tokens: int | None = None) -> list[dict]:
    """data.encode over {"document", "summary"} examples. Every path that trains or scores on
    examples (stage 1, the merge, LoRAHub, Figure 5) goes through here, so --max-source-tokens
    reaches them all."""
    return [data.encode(tok, task, e["document"], e["summary"], max_source_tokens) for e in examples]


def make_batches(encoded: list[dict], size: int, pad_id: int, seed: int | None = None) -> list[dict]:
    """Right-padded batches; shuffled with `seed` (per epoch). With seed None (evaluation: sums
    over all tokens, so order does not matter) examples of similar length share a batch, which
    cuts the padding computed on SciTLDR's validation set by a quarter."""
    order = list(range(len(encoded)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    else:
        order.sort(key=lambda i: len(encoded[i]["input_ids"]))
    return [data.collate([encoded[i] for i in order[k:k + size]], pad_id) for k in range(0, len(order), size)]


def to_device(batch: dict, device) -> dict:
    """A batch's tensors on the model's device. Batches are built on the CPU, once per epoch,
    and moved one (micro-)batch at a time: a few KB of token ids, so the copy costs nothing."""
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def validation_loss(model, batches: list[dict]) -> float:
    """Mean cross-entropy per summary token over the whole validation set."""
    was = model.training
    model.eval()
    total = count = 0.0
    for b in batches:
        b = to_device(b, model.device)
        total += model.loss(b["input_ids"], b["labels"], b["attention_mask"], reduction="sum").item()
        count += (b["labels"][:, 1:] != -100).sum().item()
    model.train(was)
    return total / max(count, 1)


def step_loss(model, batch: dict, micro: int) -> float:
    """Forward/backward of one optimizer step in micro-batches; gradients of the mean over all
    summary tokens in the batch, as one big batch would give."""
    batch = to_device(batch, model.device)
    n_tokens = (batch["labels"][:, 1:] != -100).sum().item()
    mask = batch["attention_mask"]  # [B, T]
    ends = (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).amax(1)  # [B] one past each row's last real token
    order = ends.argsort(stable=True)  # similar lengths share a micro-batch, cut to its own longest:
    total = 0.0  # the columns dropped are padding only, so the sums are the same
    for k in range(0, len(order), micro):
        idx = order[k:k + micro]
        width = int(ends[idx].max())
        part = {key: v[idx, :width] for key, v in batch.items()}
        loss = model.loss(part["input_ids"], part["labels"], part["attention_mask"], reduction="sum") / n_tokens
        loss.backward()
        total += loss.item()
    return total


# ----------------------------------------------------------------------------------------
# Algorithm 1


def importance_scores(model, cfg: TrainConfig, val_batches, grad_state):
    """E^(i) of Algorithm 1: per-parameter importance of every LoRA matrix."""
    if cfg.importance == "grad":
        return grad_state.update(model)
    norms = prune.collect_input_norms(model, ((b["input_ids"], b["attention_mask"]) for b in val_batches))
    return prune.input_importance(model, norms)


def algorithm1_step(model, opt, batch, cfg: TrainConfig, val_batches, grad_state, init) -> float:
    """One iteration of Algorithm 1; returns the batch loss."""
    loss = step_loss(model, batch, cfg.micro_batch)  # L <- M(b_i); backward
    opt.step()  # R(i) <- update(R^(i-1))
    if cfg.unit == "module" or cfg.ratio > 0:
        scores = importance_scores(model, cfg, val_batches, grad_state)  # E(i) <- eval(R(i), D_v)
        if cfg.unit == "module":  # R^(i) <- prune(R(i), E(i)); trained again at the next step
            prune.module_prune_(model, scores, cfg.threshold, cfg.reset, init)
        else:
            prune.prune_(model, scores, cfg.ratio, cfg.reset, init)
    opt.zero_grad(set_to_none=True)  # only now: grad importance reads .grad
    return loss


def run_setup(cfg: TrainConfig, names: list[str], train_enc: list[dict], val_enc: list[dict]) -> dict:
    """What a checkpoint must share with the run that resumes it: every training setting but the
    epoch budget (raising --epochs or --patience continues a run), the adapters being trained,
    and a digest of the encoded examples (subsample, prompt, --max-source-tokens)."""
    digest = hashlib.sha256(json.dumps([[e["input_ids"] for e in train_enc], [e["input_ids"] for e in val_enc]])
                            .encode()).hexdigest()[:16]
    config = {k: v for k, v in asdict(cfg).items() if k not in ("epochs", "patience")}
    return {**config, "adapters": sorted(names), "examples": digest}


def differences(there: dict, now: dict) -> str:
    """'key: old there, new now; ...' for every setting of `now` that `there` does not share."""
    return "; ".join(f"{k}: {there.get(k)!r} there, {v!r} now" for k, v in now.items() if there.get(k) != v)


def check_resumable(ckpt_path: Path, saved: dict | None, setup: dict):
    """Refuse to resume a checkpoint written with other settings: it would silently report the
    old run (or fail deep inside the optimizer). Checkpoints from before this check carry none."""
    if saved is not None and saved != setup:
        raise SystemExit(f"error: {ckpt_path} was written by a run with other settings ({differences(saved, setup)}); "
                         "rerun with its flags to resume it, or give this run another --out")


def train(model, train_enc: list[dict], val_enc: list[dict], pad_id: int, cfg: TrainConfig,
          ckpt_path: Path | None = None, desc: str = "train") -> dict:
    """Algorithm 1: repeat { sample batch; loss; backward; update LoRA; importance on the
    validation set; prune } until validation loss stops improving. With ratio 0 (and unit
    "parameter") nothing is pruned: that is plain LoRA training (stage 1, "Ours Merge").
    Every trainable adapter is trained; the best epoch's weights are left in the model.
    Resumable: a checkpoint is written atomically after every epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    val_batches = make_batches(val_enc, cfg.micro_batch * 2, pad_id)
    names = M.adapter_names(model)
    init = prune.snapshot(model)  # the merge's starting point, for reset="init"
    grad_state = prune.GradImportance(cfg.beta1, cfg.beta2) if cfg.importance == "grad" else None
    setup = run_setup(cfg, names, train_enc, val_enc)
    if ckpt_path and ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False, map_location=model.device)  # resumable on another device
        check_resumable(ckpt_path, ck.get("setup"), setup)
        load_adapter_state(model, ck["adapters"])
        opt.load_state_dict(ck["optimizer"])
        init, state = ck["init"], ck["state"]
        if grad_state is not None:
            grad_state.load_state_dict(ck["grad_state"])
        print(f"[{desc}] resumed after epoch {state['epoch']}", flush=True)
    else:  # epoch 0, the starting point, is a candidate too: training that only hurts is undone
        loss0 = validation_loss(model, val_batches)
        state = {"epoch": 0, "history": [{"epoch": 0, "val_loss": loss0}], "best_loss": loss0,
                 "best": adapter_state(model, names), "bad": 0}
    model.train()
    start, epochs_here = time.time(), 0
    while state["epoch"] < cfg.epochs and state["bad"] < cfg.patience:
        epoch = state["epoch"] + 1
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout masks: the same after a resume
        batches = make_batches(train_enc, cfg.batch_size, pad_id, seed=cfg.seed * 1000 + epoch)
        losses, bar = [], tqdm(batches, desc=f"[{desc}] epoch {epoch}", leave=False, mininterval=10)
        for batch in bar:  # steps, loss and time left on stderr
            losses.append(algorithm1_step(model, opt, batch, cfg, val_batches, grad_state, init))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        val = validation_loss(model, val_batches)
        state["history"].append({"epoch": epoch, "train_loss": sum(losses) / len(losses), "val_loss": val})
        if val < state["best_loss"]:
            state.update(best_loss=val, best=adapter_state(model, names), bad=0)
        else:
            state["bad"] += 1
        state["epoch"], epochs_here = epoch, epochs_here + 1
        per_epoch = (time.time() - start) / epochs_here
        print(f"[{desc}] epoch {epoch}/{cfg.epochs} train {state['history'][-1]['train_loss']:.4f} "
              f"val {val:.4f} best {state['best_loss']:.4f} ({per_epoch:.0f}s/epoch, at most "
              f"{per_epoch * (cfg.epochs - epoch):.0f}s left)", flush=True)
        if ckpt_path:
            ck = {"setup": setup, "adapters": adapter_state(model, names), "optimizer": opt.state_dict(), "init": init,
                  "state": state, "grad_state": grad_state.state_dict() if grad_state else None}
            data.atomic_write(ckpt_path, lambda f: torch.save(ck, f))
    load_adapter_state(model, state["best"])
    model.eval()
    return {"history": state["history"], "best_val_loss": state["best_loss"],
            "epochs_run": state["epoch"], "sparsity": prune.sparsity(model),
            **({"at_init": prune.sparsity(model, init)} if cfg.reset == "init" else {})}


def adapter_state(model, names) -> dict:
    return {f"{n}/{k}": p.detach().clone() for n in names for k, p in M.adapter_params(model, n).items()}


@torch.no_grad()
def load_adapter_state(model, state: dict):
    for key, value in state.items():
        name, path = key.split("/", 1)
        M.adapter_params(model, name)[path].copy_(value)


def write_json(path: Path, obj):
    data.atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, ensure_ascii=False).encode()))


# ----------------------------------------------------------------------------------------
# Decoding and scoring


def decode(model, tok, task, examples: list[dict], batch_size: int = 16, desc: str = "decode",
           max_source_tokens: int | None = None) -> list[str]:
    """Greedy summaries for examples, batched by similar prompt length."""
    prompts = [data.encode(tok, task, ex["document"], None, max_source_tokens)["input_ids"] for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [""] * len(prompts)
    for k in tqdm(range(0, len(order), batch_size), desc=desc, mininterval=10):
        idx = order[k:k + batch_size]
        gen = M.generate(model, [prompts[i] for i in idx], task.max_target_tokens, tok.eos_ids, tok.pad_id)
        for i, ids in zip(idx, gen):
            out[i] = tok.decode(ids).strip()
    return out


def evaluate(model, tok, task, examples, args, desc) -> tuple[list[str], dict]:
    preds = decode(model, tok, task, examples, args.decode_batch, desc, args.max_source_tokens)
    return preds, metrics.score(task, preds, [ex["references"] for ex in examples])


# ----------------------------------------------------------------------------------------
# Modules (stage 1) and the pipeline of one seed


def model_tag(model_arg: str | None) -> str:
    return "smollm2-135m-instruct" if model_arg is None else Path(str(model_arg)).name


def module_folder(name: str, args) -> Path:
    """A related module: a PEFT folder path as is; a task name: the committed module under
    adapters/<model>/<task>, else the stage-1 cache under <out>/modules/<model>/<task>."""
    if Path(name).is_dir():
        return Path(name)
    committed = ROOT / "adapters" / model_tag(args.model) / name
    return committed if committed.is_dir() else Path(args.out) / "modules" / model_tag(args.model) / name


def module_config(args, seed: int) -> TrainConfig:
    """Stage 1's (and TGT's) training settings: plain LoRA training, nothing pruned."""
    return TrainConfig(lr=args.lr, batch_size=args.batch_size, micro_batch=args.micro_batch,
                       epochs=args.epochs, patience=args.patience, seed=seed)


def check_module(folder: Path, args, seed: int, n_train: int, n_val: int):
    """A cached TGT module is reused only if this run would have trained the same one: else the
    run would report a module made with another --n-train, --lr or --epochs as its own."""
    log = json.loads((folder / "train_log.json").read_text())
    have = {**log, **log.get("config", {}), **json.loads((folder / "adapter_config.json").read_text())}
    want = {"model": model_tag(args.model), "n_train": n_train, "n_val": n_val, "dtype": args.dtype,
            "max_source_tokens": args.max_source_tokens, **asdict(module_config(args, seed)),
            "r": args.rank, "lora_alpha": args.alpha, "lora_dropout": args.dropout}
    if diff := differences(have, want):
        raise SystemExit(f"error: the TGT module {folder} was trained with other settings ({diff}); "
                         "give this run another --out, or delete the folder to train TGT again")


def train_module(model, tok, task_name: str, train_ex, val_ex, folder: Path, args, seed: int) -> dict:
    """Stage 1: one fresh LoRA on a task, saved as a PEFT folder with its training log."""
    task = data.get_task(task_name)
    enc = lambda exs: encode_examples(tok, task, exs, args.max_source_tokens)
    for n in M.adapter_names(model):
        M.remove_adapter(model, n)
    torch.manual_seed(seed)
    M.add_lora(model, "module", r=args.rank, alpha=args.alpha, dropout=args.dropout)
    cfg = module_config(args, seed)
    ckpt = folder.with_name(folder.name + ".ckpt.pt")
    log = train(model, enc(train_ex), enc(val_ex), tok.pad_id, cfg, ckpt, desc=f"stage1 {task_name}")
    M.save_adapter(model, "module", folder, base_model=model_tag(args.model))
    write_json(folder / "train_log.json", {"task": task_name, "model": model_tag(args.model), "n_train": len(train_ex),
                                           "n_val": len(val_ex), "max_source_tokens": args.max_source_tokens,
                                           "dtype": args.dtype, "seed": seed, "config": asdict(cfg), **log})
    ckpt.unlink(missing_ok=True)
    M.remove_adapter(model, "module")
    return log


def ensure_related(model, tok, args) -> dict[str, Path]:
    """Every related module's folder, training the missing ones by stage 1 on their task's
    training split (--max-train examples) with early stopping on --max-val validation examples."""
    folders = {}
    for name in args.related:
        folder = module_folder(name, args)
        if not (folder / "adapter_config.json").is_file():
            print(f"stage 1: training the {name} module ({args.max_train} examples)", flush=True)
            train_module(model, tok, name, *stage1_examples(name, args), folder, args, seed=0)
        folders[module_name(name)] = folder
    return folders


def stage1_examples(task_name: str, args) -> tuple[list[dict], list[dict]]:
    """A related task's stage-1 data: --max-train training and --max-val validation examples."""
    train_ex = data.subsample(data.load_split(task_name, "train", args.data_dir), args.max_train, 0)
    val_ex = data.subsample(data.load_split(task_name, "validation", args.data_dir), args.max_val, 1)
    return train_ex, val_ex


def module_name(name: str) -> str:
    """Adapter name of a related module: its task or folder name (no dots: PyTorch keys)."""
    return Path(name).name.replace(".", "_")


def load_modules(model, folders: dict[str, Path], trainable: bool = True):
    """Exactly these modules on the model (the merge's W0 + sum_i B_i A_i), all trainable."""
    for n in M.adapter_names(model):
        M.remove_adapter(model, n)
    for name, folder in folders.items():
        M.load_adapter(model, folder, name=name, trainable=trainable)


def run_seed(model, tok, task, args, seed: int, related: dict[str, Path]) -> dict:
    """One seed: 50/50 subsample, TGT module if asked, the method, test decoding, scores."""
    t0 = time.time()
    out = Path(args.out) / f"seed{seed}"
    train_ex, val_ex = data.low_resource_splits(task.name, args.n_train, args.n_val, seed, args.data_dir)
    test_ex = data.load_split(task.name, "test", args.data_dir)[: args.max_test]
    modules = dict(related)
    if args.with_target:
        tgt = out / "modules" / "TGT"
        if (tgt / "adapter_config.json").is_file():
            check_module(tgt, args, seed, len(train_ex), len(val_ex))
        else:
            train_module(model, tok, task.name, train_ex, val_ex, tgt, args, seed)
        modules["TGT"] = tgt
    result = {"seed": seed, "method": args.method, "modules": {k: str(v) for k, v in modules.items()},
              "n_train": len(train_ex), "n_val": len(val_ex), "n_test": len(test_ex)}
    if args.method == "zero-shot":
        load_modules(model, {})
    elif args.method == "lora":
        load_modules(model, modules, trainable=False)
    elif args.method == "lorahub":
        import lorahub
        result.update(lorahub.fit(model, tok, task, modules, train_ex, seed, args))
    else:
        result.update(merge_search(model, tok, task, modules, train_ex, val_ex, out, args, seed))
        for name in M.adapter_names(model):
            M.save_adapter(model, name, out / "adapters" / name, base_model=model_tag(args.model))
    preds, scores = evaluate(model, tok, task, test_ex, args, f"test seed {seed}")
    metrics.write_predictions(out / "predictions.jsonl", [e["id"] for e in test_ex], preds)
    result.update(test=scores, wall_time_s=time.time() - t0)
    write_json(out / "result.json", result)
    return result


def validation_scores(model, tok, task, val_ex, args, run_dir: Path, value: float, key: dict) -> dict:
    """A candidate's validation scores for the grid search, cached in run_dir/val.json beside its
    checkpoint: a resumed search does not decode the validation set again for every candidate it
    has finished (90 s each for Japanese on the 2-core CPU, 50 titles). `key` (the checkpoint's settings and
    the best epoch's validation loss) says which weights were scored: more epochs that found no
    better one leave the same weights, a better epoch makes the cache stale."""
    path = run_dir / "val.json"
    if path.is_file() and (cache := json.loads(path.read_text())).get("key") == key:
        print(f"[val {value:g}] validation scores from {path}", flush=True)
        return cache["val_scores"]
    _, scores = evaluate(model, tok, task, val_ex, args, f"val {value:g}")
    write_json(path, {"key": key, "val_scores": scores})
    return scores


def merge_search(model, tok, task, modules, train_ex, val_ex, out: Path, args, seed: int) -> dict:
    """Stage 2 for each candidate Del% (or module threshold); with several candidates, each is
    scored on the validation set by the task metric and the best one is kept (grid search).
    --val-scores scores a lone candidate too, so that runs of one candidate each can be joined
    into one grid search afterwards (experiments.py run --per-candidate)."""
    train_enc, val_enc = (encode_examples(tok, task, exs, args.max_source_tokens) for exs in (train_ex, val_ex))
    candidates = args.threshold if args.unit == "module" else args.ratio
    scored = len(candidates) > 1 or args.val_scores
    runs = {}
    for value in candidates:
        load_modules(model, modules)
        cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, micro_batch=args.micro_batch, epochs=args.epochs,
                          patience=args.patience, seed=seed, importance=args.importance, unit=args.unit,
                          reset=args.reset, **({"threshold": value} if args.unit == "module" else {"ratio": value}))
        run_dir = out / f"{args.unit}-{value:g}"
        log = train(model, train_enc, val_enc, tok.pad_id, cfg, run_dir / "ckpt.pt", desc=f"merge {value:g} seed {seed}")
        if scored:
            log["val_scores"] = validation_scores(model, tok, task, val_ex, args, run_dir, value,
                                                  {"setup": run_setup(cfg, M.adapter_names(model), train_enc, val_enc),
                                                   "best_val_loss": log["best_val_loss"]})
        runs[value] = {"config": asdict(cfg), **log}
        if len(candidates) > 1:  # keep the weights of every candidate to restore the best one
            runs[value]["weights"] = adapter_state(model, M.adapter_names(model))
    best = max(runs, key=lambda v: runs[v].get("val_scores", {}).get(task.metric, 0.0))
    if len(candidates) > 1:
        load_adapter_state(model, runs[best]["weights"])
        for r in runs.values():
            r.pop("weights")
    return {"chosen": best, "candidates": {f"{v:g}": r for v, r in runs.items()}}


# ----------------------------------------------------------------------------------------
# Command line


def parse_values(values: list[str], flag: str, lo: float, hi: float | None) -> list[float]:
    """'0.3', '0.1 0.2', '0.1,0.2' or a range 'start:stop:step' (stop included)."""
    out = []
    for v in ",".join(values).split(","):
        try:
            if ":" in v:
                a, b, s = map(float, v.split(":"))
                if s <= 0:
                    raise SystemExit(f"error: {flag} {v!r}: the step of start:stop:step must be > 0")
                out += [round(a + i * s, 10) for i in range(int(math.floor((b - a) / s + 1e-9)) + 1)]
            elif v.strip():
                out.append(float(v))
        except ValueError:
            raise SystemExit(f"error: {flag} {v!r} is not a number or a start:stop:step range") from None
    bad = [x for x in out if x < lo or (hi is not None and x >= hi)]
    if not out or bad:
        raise SystemExit(f"error: {flag} values must be in [{lo}, {hi if hi is not None else 'inf'})" +
                         (f"; got {bad}" if bad else ""))
    return sorted(set(out))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help="target task (see `python data.py tasks`)")
    p.add_argument("--method", default="merge", choices=["merge", "zero-shot", "lora", "lorahub", "module"],
                   help="merge: the paper's method (Merge with --ratio 0, Merge+Del otherwise); zero-shot, "
                        "lora (one module used as is) and lorahub are the baselines; module: stage 1 only, "
                        "train one LoRA on --task's training split (--max-train) and save it to --out")
    p.add_argument("--ratio", nargs="+", default=None,
                   help="Del%% s in [0, 1) pruned per matrix after every step; several values or a "
                        "start:stop:step range are a grid search on validation (default 0.3)")
    p.add_argument("--related", nargs="*", default=None,
                   help="related modules: task names (trained by stage 1 if not committed/cached) or PEFT "
                        "adapter folders; default dialogsum aeslc (English), livedoor-ja xscitldr-ja (Japanese)")
    p.add_argument("--with-target", action="store_true", help="also train TGT on the target examples and merge it")
    p.add_argument("--importance", default="input", choices=["input", "grad"],
                   help="input: |W|*||X|| on validation (paper); grad: |W*dL/dW| with EMA and uncertainty (ablation)")
    p.add_argument("--unit", default="parameter", choices=["parameter", "module"],
                   help="parameter: lowest s%% per matrix (paper); module: reset whole modules below --threshold")
    p.add_argument("--threshold", nargs="+", default=None,
                   help="--unit module: mean-importance threshold(s); several values are a grid search (default 0.005)")
    p.add_argument("--val-scores", action="store_true",
                   help="score the candidate on the validation set even when it is the only one (grid search "
                        "in pieces: experiments.py run --per-candidate joins such runs)")
    p.add_argument("--reset", default="zero", choices=["zero", "init"], help="pruned values: zero, or merge-start value")
    p.add_argument("--model", default=None, help="HF Llama folder or Hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="base model dtype (bfloat16 is fast on a GPU or a CPU with bf16 instructions; else float32)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when PyTorch sees a GPU, else cpu)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (subsample and training); results averaged")
    p.add_argument("--n-train", type=int, default=50, help="target training examples (paper: 50)")
    p.add_argument("--n-val", type=int, default=50, help="target validation examples (paper: 50)")
    p.add_argument("--max-train", type=int, default=1000, help="stage 1: training examples per related task")
    p.add_argument("--max-val", type=int, default=100, help="stage 1: validation examples per related task")
    p.add_argument("--max-source-tokens", type=int, default=None, help="cut documents to this many tokens (default: per task)")
    p.add_argument("--max-test", type=int, default=None, help="score only the first N test examples (quick look)")
    p.add_argument("--epochs", type=int, default=40, help="at most this many epochs (Table 5: 40)")
    p.add_argument("--patience", type=int, default=3, help="early stopping: epochs without better validation loss")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (Table 5)")
    p.add_argument("--batch-size", type=int, default=16, help="effective batch size (Table 5)")
    p.add_argument("--micro-batch", type=int, default=4, help="examples per forward pass (gradient accumulation)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of new modules (Table 5)")
    p.add_argument("--alpha", type=float, default=32, help="LoRA alpha of new modules (Table 5)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout of new modules (Table 5)")
    p.add_argument("--decode-batch", type=int, default=16, help="prompts per greedy decoding batch")
    p.add_argument("--lorahub-budget", type=int, default=40, help="LoRAHub: NGOpt evaluations")
    p.add_argument("--data-dir", default=None, help="task folders (default: $LORA_MERGE_DATA, else ./data)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<task>-<method>)")
    args = p.parse_args(argv)
    try:
        task = data.get_task(args.task)
    except ValueError as e:
        p.error(str(e))
    # A pruning flag that the chosen method or unit ignores would silently give an unpruned or
    # differently pruned run, so it is an error rather than a no-op.
    if args.ratio is not None and (args.method != "merge" or args.unit != "parameter"):
        p.error(f"--ratio applies to --method merge with --unit parameter (got --method {args.method}, --unit {args.unit})")
    if args.val_scores and args.method != "merge":
        p.error(f"--val-scores applies to --method merge (got --method {args.method})")
    if args.threshold is not None and (args.method != "merge" or args.unit != "module"):
        p.error(f"--threshold applies to --method merge with --unit module (got --method {args.method}, --unit {args.unit})")
    args.ratio = parse_values(args.ratio or ["0.3"], "--ratio", 0.0, 1.0)
    args.threshold = parse_values(args.threshold or ["0.005"], "--threshold", 0.0, None)
    if not args.lr > 0 or not args.alpha > 0 or not 0 <= args.dropout < 1:
        p.error(f"need --lr > 0, --alpha > 0 and 0 <= --dropout < 1 (got {args.lr}, {args.alpha}, {args.dropout})")
    for flag in ("n_train", "n_val", "max_train", "max_val", "epochs", "patience", "batch_size", "micro_batch", "rank",
                 "decode_batch", "lorahub_budget", "max_test"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.related is None:
        args.related = [] if args.method in ("zero-shot", "module") else RELATED[task.language]
    for name in args.related:
        if not Path(name).is_dir() and name not in data.TASKS:
            p.error(f"--related {name!r} is neither an adapter folder nor a known task")
    if args.method == "lora" and len(args.related) + args.with_target != 1:
        p.error("--method lora uses exactly one module: one --related name/folder, or --related with --with-target for TGT")
    args.out = args.out or str(Path("runs") / f"{args.task}-{args.method}")
    args.device = check_device(p, args.device)
    return args, task


def check_device(p, device: str | None) -> str:
    """--device as a string torch accepts, checked now: a missing GPU must not surface as a CUDA
    error after the data and model have loaded."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        p.error(f"--device {device!r} is not a device name (cpu, cuda, cuda:N)")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        p.error(f"--device {device}: PyTorch sees {torch.cuda.device_count()} CUDA device(s) "
                f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'not built in'})")
    if dev.type not in ("cpu", "cuda"):
        p.error(f"--device {device}: only cpu and cuda are supported")
    return device


def cpuinfo() -> str:
    """/proc/cpuinfo's text ("" where there is none, as on macOS or Windows)."""
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.is_file() else ""


def cpu_flags(info: str) -> set[str] | None:
    """The CPU's feature flags from cpuinfo() text (x86's "flags" line, Arm's "Features"); None: not listed."""
    line = next((l for l in info.splitlines() if l.startswith(("flags", "Features"))), None)
    return None if line is None else set(line.split(":", 1)[1].split())


def bf16_isa(info: str) -> str | None:
    """The best instructions the CPU offers oneDNN for bf16 matmuls ("amx_bf16", "avx512_bf16", Arm's
    "bf16", or None), from cpuinfo() text. The model name does not tell it: two 2-core VMs that both call
    themselves "Intel(R) Xeon(R) Processor" ran 200-example SciTLDR Merge+Del at 215 s per 13-step epoch
    and at 43 s per step (~560 s an epoch), the second with avx512_bf16 only (no AMX exposed), where a
    bf16 matmul ran at 181 GFLOP/s against 324 in float32."""
    flags = cpu_flags(info) or set()
    return next((isa for isa in ("amx_bf16", "avx512_bf16", "bf16") if isa in flags), None)


def slow_bf16(dtype: str, device: str, info: str) -> str | None:
    """A warning when bfloat16 would run on a CPU with no bf16 instructions (else None): PyTorch then
    falls back to a slow kernel. On a 2-core AMD EPYC (Zen 3, AVX2 only) a 2048^3 matmul ran at 0.3
    GFLOP/s in bf16 against 103 in float32, and one Merge training step (batch 4 x 512, 3 adapters)
    took 347 s against 16 s. A CPU that lists no flags (no /proc/cpuinfo) is not warned about."""
    if dtype != "bfloat16" or torch.device(device).type != "cpu" or cpu_flags(info) is None or bf16_isa(info):
        return None
    return ("warning: --dtype bfloat16 on a CPU without bf16 instructions (no amx_bf16, avx512_bf16 or bf16 "
            "among /proc/cpuinfo's flags): PyTorch's bf16 matmuls are 20 to 300 times slower here than "
            "float32's. Pass --dtype float32 to run at full speed (its scores differ from a bf16 run's by "
            "rounding, so do not mix the two within one comparison).")


def check_data(task, args):
    """Read every split the run will use, so that a missing folder or a malformed line stops it
    with the file's name in a second, not after the model has loaded or a module has trained."""
    if args.method == "module":
        stage1_examples(task.name, args)
        return
    for split in data.SPLITS:
        data.load_split(task.name, split, args.data_dir)
    for name in args.related:  # related tasks given by name that stage 1 has still to train
        if not (module_folder(name, args) / "adapter_config.json").is_file():
            stage1_examples(name, args)


def summarize(results: list[dict], metric: str) -> dict:
    """Mean and standard deviation over seeds of every test score."""
    keys = results[0]["test"].keys()
    mean = {k: statistics.mean(r["test"][k] for r in results) for k in keys}
    std = {k: statistics.stdev(r["test"][k] for r in results) if len(results) > 1 else 0.0 for k in keys}
    return {"metric": metric, "mean": mean, "std": std}


def main(argv=None) -> dict:
    args, task = parse_args(argv)
    if warning := slow_bf16(args.dtype, args.device, cpuinfo()):
        print(warning, file=sys.stderr, flush=True)
    t0 = time.time()
    try:
        check_data(task, args)
        model, tok = M.load_model(args.model, dtype=args.dtype, device=args.device)
        if tok is None:
            raise ValueError(f"--model {args.model}: the folder has no tokenizer.json")
        # Every module that exists is loaded once now: an adapter made for another base model
        # fails here, before any training.
        folders = {module_name(n): module_folder(n, args) for n in args.related}
        load_modules(model, {n: f for n, f in folders.items() if (f / "adapter_config.json").is_file()})
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.method == "module":
        log = train_module(model, tok, task.name, *stage1_examples(task.name, args), Path(args.out), args,
                           seed=args.seeds[0])
        print(f"{task.name} module: validation loss {log['history'][0]['val_loss']:.4f} untrained -> "
              f"{log['best_val_loss']:.4f}; {args.out}", flush=True)
        return log
    related = ensure_related(model, tok, args)
    results = [run_seed(model, tok, task, args, seed, related) for seed in args.seeds]
    summary = {"task": task.name, "args": {k: v for k, v in vars(args).items()}, "seeds": args.seeds,
               "summary": summarize(results, task.metric), "runs": results, "wall_time_s": time.time() - t0}
    write_json(Path(args.out) / "results.json", summary)
    m = summary["summary"]
    print(f"{task.name} {args.method}: test {task.metric} {m['mean'][task.metric]:.2f} "
          f"(std {m['std'][task.metric]:.2f}, {len(args.seeds)} seed(s)); {Path(args.out) / 'results.json'}", flush=True)
    return summary


if __name__ == "__main__":
    main()
