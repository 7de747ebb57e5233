"""Shared helpers of the bench/ scripts: real scitldr inputs, interleaved timing, environment line.

The 2-core CPU these run on is shared with other jobs, so every measurement interleaves the two
sides (ours, theirs, ours, theirs, ...) and reports medians: background load hits both alike.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

# Waiting OpenMP threads sleep instead of spinning. On a 2-core machine shared with other jobs,
# libgomp's default spin-waiting makes every parallel op wait for a descheduled thread (we
# measured RMSNorm fwd+bwd at 240 ms instead of 29 ms under load): timings then measure the
# scheduler, not the code. Must be set before torch loads libgomp; OMP_WAIT_POLICY=ACTIVE
# in the environment keeps the default behaviour.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCITLDR_JSONL = Path(os.environ.get("SCITLDR_JSONL", "/work/shared/data/scitldr/train.jsonl"))

# The project's scitldr user turn (data.py's SCITLDR), copied so that the benchmark does not
# depend on data.py's other machinery; "{document}" is the abstract.
SCITLDR_PROMPT = ("Write a TLDR by summarizing the following scientific paper in one sentence based on its Key "
                  "Sections (Abstract, Introduction, and Conclusion).\nKey Sections: {document}\nTLDR:")


def read_scitldr(n: int, path: Path = SCITLDR_JSONL) -> list[dict]:
    """The first n rows of scitldr train.jsonl (document = abstract, summary = first TLDR)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (set SCITLDR_JSONL to the scitldr train.jsonl)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) >= n:
                break
    return rows


def encode_example(tok, document: str, summary: str | None = None, max_len: int | None = None) -> dict:
    """Chat prompt (+ summary + end of turn) as ids; labels -100 except on the summary tokens.
    max_len: cut the document (never the instruction, the answer cue or the summary) so that the
    whole example fits, as data.py does: the prompt is rendered around a sentinel and encoded in
    three pieces (for an uncut document the ids equal those of the whole rendered prompt)."""
    sentinel = "@@DOCUMENT@@"
    prefix, suffix = tok.chat_prompt(SCITLDR_PROMPT.replace("{document}", sentinel)).split(sentinel)
    head = prefix.rstrip(" ")
    head_ids, doc_ids, tail_ids = tok.encode(head), tok.encode(prefix[len(head):] + document), tok.encode(suffix)
    target = [] if summary is None else tok.encode(summary) + [tok.end_of_turn_id]
    if max_len is not None:
        doc_ids = doc_ids[:max(0, max_len - len(head_ids) - len(tail_ids) - len(target))]
    prompt = head_ids + doc_ids + tail_ids
    if summary is None:
        return {"input_ids": prompt}
    return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}


def training_batch(tok, batch: int, seq: int, pack: bool = False):
    """(input_ids, labels [batch, seq], number of non-padding tokens) from real scitldr examples, exactly seq wide.

    pack=False (default, as the project trains): one example per row, right-padded with pad_id
    (label -100) or, if longer, with the document cut to fit. pack=True: consecutive whole examples are concatenated
    in a row while they fit, then padded (more label positions, less padding).
    Right padding needs no attention mask under causal attention: real tokens never see the pads,
    so both sides run the same maskless causal attention on identical tensors.
    """
    rows = iter(read_scitldr(10 * batch * max(1, seq // 128)))
    ids, labels, n_real = [], [], 0
    for _ in range(batch):
        row_ids, row_labels = [], []
        while True:
            r = next(rows)
            ex = encode_example(tok, r["document"], r["summary"], max_len=seq if not row_ids else None)
            if row_ids and len(row_ids) + len(ex["input_ids"]) > seq:
                break
            row_ids += ex["input_ids"]
            row_labels += ex["labels"]
            if not pack or len(row_ids) >= seq:
                break
        row_ids, row_labels = row_ids[:seq], row_labels[:seq]
        fill = seq - len(row_ids)
        n_real += len(row_ids)
        ids.append(row_ids + [tok.pad_id] * fill)
        labels.append(row_labels + [-100] * fill)
    return torch.tensor(ids), torch.tensor(labels), n_real


def decode_prompts(tok, batch: int) -> list[list[int]]:
    """batch generation prompts (chat-formatted scitldr abstracts, different lengths)."""
    return [encode_example(tok, r["document"])["input_ids"] for r in read_scitldr(batch)]


def interleave(fns: dict, reps: int, warmup: int = 1, log=None) -> dict[str, list[float]]:
    """Call each fn in turn (A B A B ...) warmup + reps times; seconds per call of the timed reps."""
    times = {k: [] for k in fns}
    for i in range(warmup + reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[k].append(dt)
            if log:
                log(f"  {'warmup' if i < warmup else 'rep'} {i - warmup + 1 if i >= warmup else i + 1} {k}: {dt * 1e3:.0f} ms")
    return times


def med(xs):
    return statistics.median(xs)


def matmul_bench(dtype, n: int = 2048, calls: int = 3):
    """(fn, flops): fn runs `calls` plain n x n x n matmuls in dtype on preallocated inputs,
    flops = 2 n^3 calls, the FLOPs of one fn() call."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    out = torch.empty(n, n, dtype=dtype)

    def fn():
        for _ in range(calls):
            torch.mm(a, b, out=out)

    return fn, 2 * n ** 3 * calls


def environment() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers
    try:
        import peft
        pv = peft.__version__
    except ImportError:
        pv = "-"
    return (f"{date.today()}  {cpu}, {os.cpu_count()} CPU(s), torch threads {torch.get_num_threads()}  "
            f"torch {torch.__version__}  transformers {transformers.__version__}  peft {pv}  "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}  load average {os.getloadavg()[0]:.1f}")


def dtype_arg(s: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "fp32": torch.float32}[s]


def hf_model(dtype):
    """transformers' LlamaForCausalLM on the same checkpoint folder, SDPA attention, eval mode."""
    import warnings

    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from model import resolve_checkpoint
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    folder = resolve_checkpoint(None)
    m = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    return m.eval()
