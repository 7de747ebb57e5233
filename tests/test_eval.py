"""eval.py against the libraries it wraps, on real references from ../shared/data."""
import json
import random
import subprocess
import sys
from pathlib import Path

import fugashi
import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import eval as ev  # noqa: E402


def refs_of(task: str, split: str = "test", n: int | None = None) -> list[list[str]]:
    return [ex["references"] for ex in data.load_split(task, split, DATA)[:n]]


def others(refs: list[list[str]], seed: int = 0) -> list[str]:
    """A clearly worse system: each example gets another example's first reference."""
    preds = [r[0] for r in refs]
    random.Random(seed).shuffle(preds)
    return preds


def lcs_f1(ref: list[str], pred: list[str]) -> float:
    """ROUGE-L F1 from scratch: longest common subsequence by dynamic programming."""
    table = [[0] * (len(pred) + 1) for _ in range(len(ref) + 1)]
    for i, r in enumerate(ref):
        for j, p in enumerate(pred):
            table[i + 1][j + 1] = table[i][j] + 1 if r == p else max(table[i][j + 1], table[i + 1][j])
    lcs = table[-1][-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(ref) + len(pred))


# -----------------------------------------------------------------------------------------------
# Japanese

def test_japanese_rouge_is_mecab_words():
    exs = data.load_split("nlp-paper-ja", "test", DATA)[:30]
    preds, refs = [ex["document"][:40] for ex in exs], [ex["references"] for ex in exs]
    tagger = fugashi.Tagger()
    words = lambda s: [w.surface for w in tagger(s)]
    expected = np.mean([lcs_f1(words(r[0]), words(p)) for p, r in zip(preds, refs)]) * 100
    got = ev.score("nlp-paper-ja", preds, refs)
    assert got["rougeL"] > 5 and got["rougeL"] == pytest.approx(expected, abs=1e-9)
    # what the custom tokenizer is for: rouge-score's default deletes every non-ASCII character
    default = rouge_scorer.RougeScorer(["rougeL"])
    ref = refs[0][0]
    assert default._tokenizer.tokenize(ref) == [] and default.score(ref, ref)["rougeL"].fmeasure == 0


def test_japanese_identical_strings_score_100():
    refs = refs_of("livedoor-ja", n=20)
    got = ev.score(("ja", "bleu"), [r[0] for r in refs], refs)
    assert got["rouge1"] == got["rouge2"] == got["rougeL"] == 100.0
    assert got["bleu"] == pytest.approx(100.0)


def test_japanese_bleu_is_sacrebleu_on_mecab_words():
    exs = data.load_split("nlp-paper-ja", "test", DATA)
    preds, refs = [ex["document"][:30] for ex in exs], [ex["references"] for ex in exs]
    seg = lambda s: " ".join(w.surface for w in fugashi.Tagger()(s))
    expected = sacrebleu.corpus_bleu([seg(p) for p in preds], [[seg(r[0]) for r in refs]], tokenize="none").score
    assert ev.score("nlp-paper-ja", preds, refs)["bleu"] == pytest.approx(expected, abs=1e-9) and expected > 1


# -----------------------------------------------------------------------------------------------
# English equals the libraries' own results

def test_english_rouge_equals_rouge_score_best_reference():
    refs = refs_of("scitldr", n=80)  # 2 to 4 TLDRs each
    preds = others(refs)
    preds[:10] = [r[-1] for r in refs[:10]]  # some predictions match a later reference exactly
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    got = ev.score("scitldr", preds, refs)
    for t in ["rouge1", "rouge2", "rougeL"]:
        best = [max(scorer.score(r, p)[t].fmeasure for r in rs) for p, rs in zip(preds, refs)]
        assert got[t] == pytest.approx(100 * np.mean(best), abs=1e-9)
    assert got["rougeL"] > 25  # the 10 exact matches count as 100


def test_english_bleu_equals_sacrebleu_single_and_multi_reference():
    refs = refs_of("aeslc", n=300)
    preds = others(refs)
    expected = sacrebleu.corpus_bleu(preds, [[r[0] for r in refs]]).score
    assert ev.score("aeslc", preds, refs)["bleu"] == pytest.approx(expected, abs=1e-9)
    refs = refs_of("dialogsum")  # three references per example
    preds = [ex["document"].split("\n")[0] for ex in data.load_split("dialogsum", "test", DATA)]
    streams = [[r[i] for r in refs] for i in range(3)]
    assert ev.score("dialogsum", preds, refs)["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score)


def test_variable_reference_counts():
    refs = refs_of("scitldr", n=50)
    assert len({len(r) for r in refs}) > 1
    preds = others(refs)
    one_ref_each = ev.score("scitldr", preds, [r[:1] for r in refs])
    all_refs = ev.score("scitldr", preds, refs)
    assert all_refs["rougeL"] >= one_ref_each["rougeL"] and all_refs["bleu"] > 0


def test_bad_score_inputs():
    with pytest.raises(ValueError, match="one per reference list"):
        ev.score("scitldr", ["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="one or more"):
        ev.score("scitldr", [], [])
    with pytest.raises(ValueError, match="known tasks"):
        ev.score("sci-tldr", ["a"], [["a"]])


# -----------------------------------------------------------------------------------------------
# approximate randomization

@pytest.mark.parametrize("task,metric", [("scitldr", "rougeL"), ("scitldr", "bleu"), ("nlp-paper-ja", "bleu")])
def test_ar_identical_systems_p_is_1(task, metric):
    refs = refs_of(task, n=100)
    preds = others(refs)
    out = ev.approx_randomization(task, preds, list(preds), refs, metric=metric, shuffles=500)
    assert out["diff"] == 0 and out["p"] == 1.0


@pytest.mark.parametrize("task,metric", [("scitldr", "rougeL"), ("scitldr", "bleu"), ("nlp-paper-ja", "bleu")])
def test_ar_clearly_better_system_small_p(task, metric):
    refs = refs_of(task, n=200)
    best, worse = [r[0] for r in refs], others(refs)
    out = ev.approx_randomization(task, best, worse, refs, metric=metric, shuffles=1000, seed=3)
    assert out["p"] == pytest.approx(1 / 1001)  # no shuffle reaches the observed difference
    assert out["a"] == pytest.approx(ev.score(task, best, refs)[metric])  # BLEU from summed statistics
    assert out["b"] == pytest.approx(ev.score(task, worse, refs)[metric])
    assert ev.approx_randomization(task, worse, best, refs, metric=metric, shuffles=1000, seed=3)["p"] == out["p"]


def test_ar_close_systems_not_significant_and_seeded():
    refs = refs_of("nlp-paper-ja")
    a, b = others(refs, seed=1), others(refs, seed=2)  # two equally bad systems
    p = ev.approx_randomization("nlp-paper-ja", a, b, refs, shuffles=1000, seed=0)["p"]
    assert p > 0.05
    assert ev.approx_randomization("nlp-paper-ja", a, b, refs, shuffles=1000, seed=0)["p"] == p


# -----------------------------------------------------------------------------------------------
# command line and predictions files

@pytest.fixture
def pred_files(tmp_path):
    exs = data.load_split("nlp-paper-ja", "test", DATA)
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    ev.write_predictions(good, [ex["id"] for ex in exs], [ex["summary"] for ex in exs])
    ev.write_predictions(bad, [ex["id"] for ex in exs][::-1], others([ex["references"] for ex in exs])[::-1])
    return good, bad


def test_cli_scores_and_significance(pred_files):
    good, bad = pred_files
    out = ev.main(["--task", "nlp-paper-ja", "--pred", str(good), "--against", str(bad),
                   "--data-dir", str(DATA), "--shuffles", "200"])
    assert out["n"] == 100 and out["metric"] == "bleu" and out["scores"]["bleu"] == pytest.approx(100)
    assert out["against"]["bleu"] < 20 and out["significance"]["p"] == pytest.approx(1 / 201)


def test_cli_prints_json(pred_files):
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--task", "nlp-paper-ja", "--pred",
                        str(pred_files[0]), "--data-dir", str(DATA)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["scores"]["rougeL"] == 100.0


def test_cli_errors(pred_files, tmp_path, capsys):
    good, _ = pred_files
    run = lambda *args: ev.main(["--pred", str(good), "--data-dir", str(DATA), *args])
    with pytest.raises(ValueError, match="100 ids are not in scitldr/test.*wrong --task"):
        run("--task", "scitldr")
    with pytest.raises(ValueError, match="known tasks"):
        run("--task", "nlp-paper-jp")
    with pytest.raises(FileNotFoundError, match="no 'test' split"):
        run("--task", "xscitldr-ja")
    half = tmp_path / "half.jsonl"
    half.write_text("".join(good.read_text(encoding="utf-8").splitlines(keepends=True)[:50]), encoding="utf-8")
    with pytest.raises(ValueError, match="no prediction for 50 of the 100 examples of nlp-paper-ja/test"):
        ev.main(["--task", "nlp-paper-ja", "--pred", str(half), "--data-dir", str(DATA)])
    out = ev.main(["--task", "nlp-paper-ja", "--pred", str(half), "--data-dir", str(DATA), "--max-test", "50"])
    assert out["n"] == 50 and out["scores"]["bleu"] == pytest.approx(100)  # a --max-test run's file scores
    with pytest.raises(ValueError, match=r"ids are not in nlp-paper-ja/test \(first 10\)"):
        ev.main(["--task", "nlp-paper-ja", "--pred", str(half), "--data-dir", str(DATA), "--max-test", "10"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty file"):
        ev.read_predictions(empty)
    for flags, message in [(["--shuffles", "0"], "--shuffles must be >= 1"), (["--metric", "rouge-l"], "--metric"),
                           (["--max-test", "0"], "--max-test must be >= 1")]:
        with pytest.raises(SystemExit):
            run("--task", "nlp-paper-ja", "--against", str(good), *flags)
        assert message in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a", "prediction": "x"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: expected a JSON object with 'id' and 'prediction'"):
        ev.read_predictions(broken)
