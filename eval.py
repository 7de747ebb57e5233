"""Scores for generated summaries, as in the paper (Section 4.1.3): ROUGE-1/2/L F1 with the
rouge-score package, corpus BLEU with sacrebleu, Japanese segmented with MeCab first, and the
approximate randomization test (Riezler and Maxwell, 2005) for whether system A beats system B.

    python eval.py --task scitldr --pred a/predictions.jsonl [--against b/predictions.jsonl] [--max-test N]

A predictions file holds one {"id": ..., "prediction": ...} per line; the references are the
task's test split (or --split). Scores are x100.
"""
import argparse
import functools
import json
import sys
from pathlib import Path

import fugashi
import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

import data

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@functools.cache
def tagger() -> fugashi.Tagger:
    return fugashi.Tagger()  # MeCab with the unidic-lite dictionary


def segment(text: str) -> list[str]:
    """MeCab words of a Japanese text, punctuation included; whitespace is not a word."""
    return [word.surface for word in tagger()(text)]


class MecabTokenizer:
    """For rouge_scorer.RougeScorer(tokenizer=...). Its default tokenizer deletes every non-ASCII
    character, which would score any two Japanese texts 0; here the tokens are MeCab's words."""

    def tokenize(self, text: str) -> list[str]:
        return segment(text)


def language_and_metric(task) -> tuple[str, str]:
    """A task name, a data.Task or a (language, metric) pair -> (language, metric)."""
    if isinstance(task, str):
        task = data.get_task(task)
    if isinstance(task, data.Task):
        return task.language, task.metric
    language, metric = task
    return language, metric


@functools.cache
def rouge(language: str) -> rouge_scorer.RougeScorer:
    if language == "ja":
        return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=MecabTokenizer())
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)  # English: its own tokenizer


def rouge_per_example(language: str, predictions: list[str], references: list[list[str]]) -> dict[str, np.ndarray]:
    """F1 x100 of every example against its best-scoring reference, per ROUGE type (rouge-score's
    score_multi; SciTLDR's own evaluation also takes the best of its several TLDRs)."""
    scores = [rouge(language).score_multi(refs, pred) for pred, refs in zip(predictions, references)]
    return {t: np.array([s[t].fmeasure * 100 for s in scores]) for t in ROUGE_TYPES}


def bleu_inputs(language: str, predictions: list[str], references: list[list[str]]):
    """sacrebleu's metric, hypotheses and reference streams. Japanese is MeCab-segmented and joined
    by spaces, then scored with tokenize="none", so that MeCab's words are exactly BLEU's tokens
    (13a would split a few ASCII symbols further; sacrebleu's own ja-mecab uses another
    dictionary). English is left to sacrebleu's standard 13a. An example with fewer references
    than the most has None in the remaining streams, which sacrebleu skips."""
    ja = language == "ja"
    prep = (lambda s: " ".join(segment(s))) if ja else (lambda s: s)
    streams = [[prep(refs[i]) if i < len(refs) else None for refs in references]
               for i in range(max(len(refs) for refs in references))]
    bleu = BLEU(tokenize="none", force=True) if ja else BLEU()  # force: segmented text is meant to look tokenized
    return bleu, [prep(p) for p in predictions], streams


def check(predictions: list[str], references: list[list[str]]) -> None:
    if not predictions or len(predictions) != len(references):
        raise ValueError(f"need one or more predictions, one per reference list; got {len(predictions)} "
                         f"predictions and {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("every example needs at least one reference")


def score(task, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """ROUGE-1/2/L (mean F1 over examples) and corpus BLEU, x100. `task` is a task name, a
    data.Task or a (language, metric) pair; the task's own metric is out[task.metric]."""
    check(predictions, references)
    language, _ = language_and_metric(task)
    out = {t: float(v.mean()) for t, v in rouge_per_example(language, predictions, references).items()}
    bleu, hyps, streams = bleu_inputs(language, predictions, references)
    out["bleu"] = bleu.corpus_score(hyps, streams).score
    return out


def approx_randomization(task, predictions_a: list[str], predictions_b: list[str], references: list[list[str]],
                         metric: str | None = None, shuffles: int = 10000, seed: int = 0) -> dict:
    """Two-sided approximate randomization test on the same examples (Riezler and Maxwell, 2005).

    Under the null hypothesis A and B are exchangeable, so each shuffle swaps their outputs on a
    random half of the examples and recomputes the corpus score difference; p = (count + 1) /
    (shuffles + 1), count = shuffles whose |difference| reaches the observed one. Both metrics are
    sums of per-example statistics, so a shuffle is one matrix product: ROUGE sums per-example F1;
    BLEU sums sacrebleu's per-sentence sufficient statistics (lengths, n-gram matches and totals,
    the ones sacrebleu's own paired test uses) and recomputes corpus BLEU from the totals.
    """
    check(predictions_a, references)
    check(predictions_b, references)
    language, task_metric = language_and_metric(task)
    metric = metric or task_metric
    if shuffles < 1:
        raise ValueError(f"shuffles must be >= 1, got {shuffles}")
    n = len(references)
    if metric == "bleu":
        bleu, hyps_a, streams = bleu_inputs(language, predictions_a, references)
        _, hyps_b, _ = bleu_inputs(language, predictions_b, references)
        stats_a = np.array(bleu._extract_corpus_statistics(hyps_a, streams), dtype=np.float64)  # (N, 10)
        stats_b = np.array(bleu._extract_corpus_statistics(hyps_b, streams), dtype=np.float64)

        def corpus(totals: np.ndarray) -> np.ndarray:  # (S, 10) summed statistics -> (S,) BLEU
            return np.array([bleu._compute_score_from_stats(row).score for row in np.rint(totals).astype(np.int64)])
    elif metric in ROUGE_TYPES:
        stats_a = rouge_per_example(language, predictions_a, references)[metric][:, None]  # (N, 1)
        stats_b = rouge_per_example(language, predictions_b, references)[metric][:, None]

        def corpus(totals: np.ndarray) -> np.ndarray:  # (S, 1) summed F1 -> (S,) mean F1
            return totals[:, 0] / n
    else:
        raise ValueError(f"unknown metric {metric!r}; use bleu or one of {ROUGE_TYPES}")

    total_a, total_b, delta = stats_a.sum(0), stats_b.sum(0), stats_b - stats_a
    a, b = corpus(total_a[None])[0], corpus(total_b[None])[0]
    observed = abs(a - b)
    rng, count = np.random.default_rng(seed), 0
    for start in range(0, shuffles, 1000):  # chunks keep the (S, N) swap matrix small
        swap = rng.integers(0, 2, size=(min(1000, shuffles - start), n)).astype(np.float64)  # 1: swap A, B
        moved = swap @ delta  # (S, 10) or (S, 1): on swapped examples A gets B's statistics and B gets A's
        diff = np.abs(corpus(total_a + moved) - corpus(total_b - moved))
        count += int(np.sum(diff >= observed - 1e-9))  # tolerance: the same sum in another order
    return {"metric": metric, "a": float(a), "b": float(b), "diff": float(a - b),
            "p": (count + 1) / (shuffles + 1), "shuffles": shuffles, "seed": seed}


# -----------------------------------------------------------------------------------------------
# predictions files and the command line

def write_predictions(path: str | Path, ids: list[str], predictions: list[str]) -> None:
    """One {"id", "prediction"} per line, written to a temp file and renamed into place."""
    lines = [json.dumps({"id": i, "prediction": p}, ensure_ascii=False) + "\n" for i, p in zip(ids, predictions)]
    data.atomic_write(Path(path), lambda f: f.write("".join(lines).encode("utf-8")))


def read_predictions(path: str | Path) -> dict[str, str]:
    """id -> prediction; a broken line is reported by file and line number."""
    path, out = Path(path), {}
    # split("\n"), not splitlines(): that also breaks at U+2028 etc., which JSON strings may hold
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[str(row["id"])] = row["prediction"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{lineno}: expected a JSON object with 'id' and 'prediction'") from None
    if not out:
        raise ValueError(f"{path}: no predictions (empty file)")
    return out


def align(predictions: dict[str, str], examples: list[dict], path: str, where: str) -> list[str]:
    """Predictions in the order of the examples; every example needs one, and nothing else."""
    ids = [str(ex["id"]) for ex in examples]
    extra = sorted(set(predictions) - set(ids))
    if extra:
        raise ValueError(f"{path}: {len(extra)} ids are not in {where}, e.g. {extra[:3]}; wrong --task or --split?")
    missing = [i for i in ids if i not in predictions]
    if missing:
        raise ValueError(f"{path}: no prediction for {len(missing)} of the {len(ids)} examples of {where}, "
                         f"e.g. {missing[:3]}")
    return [predictions[i] for i in ids]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--pred", required=True, help="predictions.jsonl: {id, prediction} per line")
    parser.add_argument("--against", help="a second predictions file: adds the significance test")
    parser.add_argument("--split", default="test")
    parser.add_argument("--data-dir", default=None, help="default: $LORA_MERGE_DATA, else ./data")
    parser.add_argument("--metric", default=None, choices=["bleu", *ROUGE_TYPES],
                        help="metric of the test (default: the task's)")
    parser.add_argument("--shuffles", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-test", type=int, default=None,
                        help="score the first N examples of the split, as lora_merge.py --max-test wrote them")
    args = parser.parse_args(argv)
    if args.shuffles < 1:
        parser.error("--shuffles must be >= 1")
    if args.max_test is not None and args.max_test < 1:
        parser.error("--max-test must be >= 1")

    task = data.get_task(args.task)
    examples = data.load_split(args.task, args.split, args.data_dir)[: args.max_test]
    references = [ex["references"] for ex in examples]
    where = f"{args.task}/{args.split}" + (f" (first {len(examples)})" if args.max_test else "")
    preds = align(read_predictions(args.pred), examples, args.pred, where)
    out = {"task": task.name, "split": args.split, "n": len(examples), "metric": task.metric,
           "scores": score(task, preds, references)}
    if args.against:
        other = align(read_predictions(args.against), examples, args.against, where)
        out["against"] = score(task, other, references)
        out["significance"] = approx_randomization(task, preds, other, references, metric=args.metric,
                                                   shuffles=args.shuffles, seed=args.seed)
    return out


if __name__ == "__main__":
    try:
        print(json.dumps(main(), indent=2, ensure_ascii=False))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
