"""The experiment runner: row table, caching/resume of runs, and the report built from the cache."""
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import data
import eval as metrics
import experiments as E
import lora_merge

DATA = Path(os.environ.get("LORA_MERGE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TAG = "smollm2-135m-instruct"


def fake_modules(root: Path):
    """Related-module folders as the runner expects them, so that nothing trains stage 1."""
    for spec in E.SETTINGS.values():
        for task in spec["related"].values():
            folder = root / "modules" / TAG / task
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "adapter_config.json").write_text("{}")


def test_every_row_parses_as_lora_merge_flags(tmp_path):
    fake_modules(tmp_path)
    for setting, spec in E.SETTINGS.items():
        table = E.rows(setting)
        assert {"zero-shot", "lora-tgt", "merge", "merge-del-tgt", "abl-module-grad-init", "merge-del-n5"} <= set(table)
        assert len([r for r in table if "table2" in table[r]["groups"]]) == 10
        assert len([r for r in table if "table4" in table[r]["groups"]]) == 9  # Merge baseline + 8 configurations
        folders = {a: str(tmp_path / "modules" / TAG / t) for a, t in spec["related"].items()}
        assert table["fig4-del-tgt"]["flags"] is None  # the default grid is the paper's: nothing left for Figure 4
        table["fig4-del-tgt"] = E.rows(setting, ["0.3", "0.6"])["fig4-del-tgt"]  # a budget of two Del%
        for rid, row in table.items():
            flags = [x for f in row["flags"] for x in
                     (folders.values() if f == "@REL" else [folders[f[1:]]] if f.startswith("@") else [f])]
            args, task = lora_merge.parse_args(["--task", spec["task"], *flags])
            assert task.name == spec["task"]
            if rid == "lora-tgt":  # LoRA (TGT): no related module, the target's only
                assert args.method == "lora" and args.related == [] and args.with_target
            if rid.startswith("merge-del"):
                assert args.ratio == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
            if rid.startswith("abl-module"):
                assert args.unit == "module" and len(args.threshold) > 1 and args.with_target
            if rid == "fig4-del-tgt":  # the rest of the paper's grid, with merge-del-tgt's other flags
                assert args.ratio == [0.1, 0.2, 0.4, 0.5] and args.with_target and args.related == list(folders.values())
        with pytest.raises(SystemExit, match="fig4-del-tgt has nothing to run"):
            E.select(setting, ["fig4-del-tgt"])
        assert "fig4-del-tgt" not in E.select(setting, ["all"]) and E.select(setting, ["fig4"], ["0.3"]) == ["fig4-del-tgt"]


def fake_main(calls):
    """Stands in for lora_merge.main: records the call and writes what a finished run writes."""
    def main(argv):
        args, task = lora_merge.parse_args(argv)
        calls.append({"argv": argv, "tgt_present": (Path(args.out) / f"seed{args.seeds[0]}" / "modules" / "TGT"
                                                    / "adapter_config.json").is_file()})
        seed = args.seeds[0]
        if args.with_target:
            tgt = Path(args.out) / f"seed{seed}" / "modules" / "TGT"
            tgt.mkdir(parents=True, exist_ok=True)
            (tgt / "adapter_config.json").write_text(json.dumps({"trained_by": args.out}))
        result = {"seed": seed, "method": args.method, "test": {"rougeL": 30.0 + seed, "bleu": 5.0}}
        lora_merge.write_json(Path(args.out) / f"seed{seed}" / "result.json", result)
        summary = {"task": task.name, "args": vars(args), "seeds": args.seeds, "runs": [result], "wall_time_s": 1.0}
        lora_merge.write_json(Path(args.out) / "results.json", summary)
        return summary
    return main


def test_run_caches_each_seed_and_resumes(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    fake_modules(root)
    calls = []
    monkeypatch.setattr(lora_merge, "main", fake_main(calls))
    tiny = ["--n-train", "4", "--n-val", "2", "--epochs", "1", "--batch-size", "2", "--micro-batch", "2",
            "--max-source-tokens", "48"]
    cmd = ["run", "--setting", "en", "--rows", "merge-del-tgt", "zero-shot", "lora-tgt", "--seeds", "0", "1",
           "--root", str(root), "--max-test", "2", "--data-dir", str(DATA), "--", *tiny]
    assert E.main(cmd) == 0
    rows_called = [Path(c["argv"][c["argv"].index("--out") + 1]).parent.name for c in calls]
    assert rows_called == ["lora-tgt"] * 2 + ["merge-del-tgt"] * 2 + ["zero-shot"] * 2  # LoRA (TGT) first
    merge = [c for c in calls if "merge-del-tgt" in " ".join(c["argv"])]
    assert all(c["tgt_present"] for c in merge)  # copied from LoRA (TGT), not trained again
    # the committed module where the repo has one, else the runner's own stage-1 folder
    committed = lora_merge.ROOT / "adapters" / TAG / "dialogsum"
    expected = committed if (committed / "adapter_config.json").is_file() else root / "modules" / TAG / "dialogsum"
    assert str(expected) in merge[0]["argv"]
    assert calls[0]["argv"][-len(tiny):] == tiny and "--max-test" in calls[0]["argv"]
    run_json = json.loads((root / "en" / "merge-del-tgt" / "seed1-run" / "run.json").read_text())
    assert run_json["tgt_from"] == str(root / "en" / "lora-tgt" / "seed1-run" / "seed1" / "modules" / "TGT")
    assert run_json["command"].startswith("python lora_merge.py --task scitldr") and run_json["wall_time_s"] >= 0
    assert run_json["runner_command"] == "python experiments.py " + " ".join(cmd)

    same = ["--task", "scitldr", "--method", "lora", "--related", "--with-target", "--seeds", "0", "--out",
            str(tmp_path / "x"), "--data-dir", str(DATA), *tiny]
    assert E.share_tgt(root / "en", tmp_path / "x", same + ["--n-val", "3"], 0) is None  # other subsample
    assert E.share_tgt(root / "en", tmp_path / "x", same, 0).endswith("lora-tgt/seed0-run/seed0/modules/TGT")

    calls.clear()
    assert E.main(cmd) == 0
    assert calls == []  # everything cached: lora_merge.main is never called again
    (root / "en" / "zero-shot" / "seed1-run" / "results.json").unlink()  # as if killed in that run
    assert E.main(cmd) == 0
    assert len(calls) == 1 and calls[0]["argv"][calls[0]["argv"].index("--seeds") + 1] == "1"
    attempts = json.loads((root / "en" / "zero-shot" / "seed1-run" / "attempts.json").read_text())
    assert len(attempts) == 2 and attempts[0]["ended"] >= attempts[0]["started"]
    run_json = json.loads((root / "en" / "zero-shot" / "seed1-run" / "run.json").read_text())
    assert run_json["earlier_attempts_s"] == attempts[0]["ended"] - attempts[0]["started"]

    (root / "en" / "merge-del-tgt" / "seed1-run" / "results.json").unlink()  # killed after TGT was copied
    calls.clear()
    assert E.main(cmd) == 0 and len(calls) == 1 and calls[0]["tgt_present"]
    run_json = json.loads((root / "en" / "merge-del-tgt" / "seed1-run" / "run.json").read_text())
    assert run_json["tgt_from"] == str(root / "en" / "lora-tgt" / "seed1-run" / "seed1" / "modules" / "TGT")


def test_ratios_flag_sets_the_del_grid_and_leaves_merge_at_zero(tmp_path, monkeypatch, capsys):
    fake_modules(tmp_path)
    calls = []
    monkeypatch.setattr(lora_merge, "main", fake_main(calls))
    assert E.main(["run", "--setting", "en", "--rows", "merge", "merge-del", "abl-param-grad-init", "--seeds", "0",
                   "--ratios", "0.1", "0.5", "--root", str(tmp_path), "--data-dir", str(DATA)]) == 0
    ratio = {Path(c["argv"][c["argv"].index("--out") + 1]).parent.name:
             c["argv"][c["argv"].index("--ratio") + 1:c["argv"].index("--ratio") + 3] for c in calls}
    assert ratio["merge"][0] == "0" and ratio["merge"][1].startswith("--")
    assert ratio["merge-del"] == ["0.1", "0.5"] and ratio["abl-param-grad-init"] == ["0.1", "0.5"]

    # another budget over the same cache: refused per run, nothing recomputed or overwritten
    calls.clear()
    before = (tmp_path / "en" / "merge-del" / "seed0-run" / "results.json").read_text()
    assert E.main(["run", "--setting", "en", "--rows", "merge", "merge-del", "--seeds", "0", "--ratios", "0.2",
                   "--root", str(tmp_path), "--data-dir", str(DATA)]) == 1
    out = capsys.readouterr().out
    assert calls == [] and "[en/merge-del seed 0] cached with other flags" in out and "[en/merge seed 0] cached:" in out
    assert (tmp_path / "en" / "merge-del" / "seed0-run" / "results.json").read_text() == before


def test_list_shows_cached_and_unfinished_runs_in_columns(tmp_path, monkeypatch, capsys):
    fake_modules(tmp_path)
    monkeypatch.setattr(lora_merge, "main", fake_main([]))
    assert E.main(["run", "--setting", "en", "--rows", "zero-shot", "--seeds", "0", "2", "--root", str(tmp_path)]) == 0
    (tmp_path / "en" / "merge" / "seed1-run").mkdir(parents=True)  # a killed run: no results.json
    capsys.readouterr()
    assert E.main(["list", "--root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    line = {tuple(l.split()[:2]): l for l in lines if not l.startswith("module")}
    assert line["en", "zero-shot"].endswith("cached seeds: [0, 2]") and line["ja", "zero-shot"].endswith("cached seeds: -")
    assert line["en", "merge"].endswith("cached seeds: -  unfinished: ['seed1-run']")
    assert len({l.index("cached seeds:") for k, l in line.items() if k[0] == "en"}) == 1  # one column
    assert sum(l.startswith("module ") and l.endswith(": trained") for l in lines) == 4  # fake_modules' four


def test_failed_run_is_reported_and_not_cached(tmp_path, monkeypatch, capsys):
    def broken(argv):
        raise RuntimeError("boom")
    monkeypatch.setattr(lora_merge, "main", broken)
    assert E.main(["run", "--setting", "ja", "--rows", "zero-shot", "--seeds", "0", "--root", str(tmp_path)]) == 1
    assert "FAILED" in capsys.readouterr().out
    assert not (tmp_path / "ja" / "zero-shot" / "seed0-run" / "results.json").exists()
    with pytest.raises(SystemExit):
        E.main(["run", "--setting", "ja", "--rows", "no-such-row", "--root", str(tmp_path)])

    # the unfinished run is resumed only with the flags it was started with
    calls = []
    monkeypatch.setattr(lora_merge, "main", fake_main(calls))
    cmd = ["run", "--setting", "ja", "--rows", "zero-shot", "--seeds", "0", "--root", str(tmp_path)]
    assert E.main([*cmd, "--", "--max-test", "5"]) == 1
    assert calls == [] and "[ja/zero-shot seed 0] started with other flags, not resumed" in capsys.readouterr().out
    assert E.main(cmd) == 0 and len(calls) == 1
    assert (tmp_path / "ja" / "zero-shot" / "seed0-run" / "results.json").is_file()


def piece_main(calls, val: dict[float, float], broken: float | None = None):
    """Stands in for lora_merge.main on one-candidate module-unit runs: validation BLEU val[threshold],
    test BLEU 10 x threshold, a prediction naming the threshold; the candidate `broken` raises."""
    def main(argv):
        args, task = lora_merge.parse_args(argv)
        (v,), seed = args.threshold, args.seeds[0]
        calls.append({"threshold": v, "val_scores": args.val_scores})
        if v == broken:
            raise RuntimeError("killed")
        out = Path(args.out) / f"seed{seed}"
        tgt = out / "modules" / "TGT"
        tgt.mkdir(parents=True, exist_ok=True)
        (tgt / "adapter_config.json").write_text(json.dumps({"trained_by": args.out}))
        metrics.write_predictions(out / "predictions.jsonl", ["t0"], [f"threshold {v:g}"])
        result = {"seed": seed, "method": "merge", "modules": {"TGT": str(tgt)}, "chosen": v,
                  "candidates": {f"{v:g}": {"val_scores": {"bleu": val[v]}, "epochs_run": 2}},
                  "test": {"bleu": 10 * v, "rougeL": 1.0}, "wall_time_s": 2.0}
        lora_merge.write_json(out / "result.json", result)
        lora_merge.write_json(Path(args.out) / "results.json", {"task": task.name, "args": vars(args), "seeds": [seed],
                                                                "runs": [result], "wall_time_s": 3.0})
    return main


def test_per_candidate_runs_each_candidate_and_joins_them(tmp_path, monkeypatch, capsys):
    """--per-candidate: each threshold of a module row is a cached run of its own (scored on
    validation), a failed one is retried by the next piece, and once all are cached they are joined
    into the row's run: the best validation score (the smaller threshold on a tie), its test score
    and predictions, every candidate's log, the pieces' commands and times."""
    fake_modules(tmp_path)
    calls = []
    cmd = ["run", "--setting", "ja", "--rows", "abl-module-input-zero", "--seeds", "0", "--root", str(tmp_path),
           "--per-candidate", "--", "--threshold", "0.1", "0.2", "0.3"]
    monkeypatch.setattr(lora_merge, "main", piece_main(calls, {0.1: 5.0, 0.2: 7.0, 0.3: 7.0}, broken=0.2))
    assert E.main(cmd) == 1
    assert calls == [{"threshold": v, "val_scores": True} for v in (0.1, 0.2, 0.3)]
    row = tmp_path / "ja" / "abl-module-input-zero"
    assert not (row / "seed0-run").exists() and E.cached(tmp_path, "ja", "abl-module-input-zero") == []
    assert "abl-module-input-zero threshold 0.2 seed 0" in capsys.readouterr().out.splitlines()[-1]
    assert E.main(["list", "--root", str(tmp_path)]) == 0
    assert "pieces: ['seed0-threshold0.1', 'seed0-threshold0.2 (unfinished)', 'seed0-threshold0.3']" in capsys.readouterr().out

    calls.clear()
    monkeypatch.setattr(lora_merge, "main", piece_main(calls, {0.1: 5.0, 0.2: 7.0, 0.3: 7.0}))
    assert E.main(cmd) == 0 and calls == [{"threshold": 0.2, "val_scores": True}]  # only the missing one
    (run,) = E.cached(tmp_path, "ja", "abl-module-input-zero")
    assert run["chosen"] == 0.2 and run["test"]["bleu"] == 2.0 and run["wall_time_s"] == 6.0
    assert {v: c["val_scores"]["bleu"] for v, c in run["candidates"].items()} == {"0.1": 5.0, "0.2": 7.0, "0.3": 7.0}
    assert E.predictions([run]) == {(0, "t0"): "threshold 0.2"} and run["args"]["threshold"] == [0.1, 0.2, 0.3]
    assert (row / "seed0-run" / "seed0" / "modules" / "TGT" / "adapter_config.json").is_file()
    assert run["modules"]["TGT"] == str(row / "seed0-run" / "seed0" / "modules" / "TGT")
    info = run["run"]
    assert [p["dir"] for p in info["pieces"]] == ["seed0-threshold0.1", "seed0-threshold0.2", "seed0-threshold0.3"]
    assert info["wall_time_s"] == sum(p["wall_time_s"] for p in info["pieces"])
    assert all(p["command"].endswith(f"--threshold {v} --val-scores") and p["command"].count("--threshold") == 1
               for p, v in zip(info["pieces"], (0.1, 0.2, 0.3)))  # each piece's command names its candidate only
    # the joined run is the row's cached run: another piece, with or without --per-candidate, runs nothing
    calls.clear()
    assert E.main(cmd) == 0 and E.main([c for c in cmd if c != "--per-candidate"]) == 0 and calls == []


@pytest.mark.skipif(not (DATA / "scitldr").is_dir(), reason="needs the real data")
def test_per_candidate_pieces_equal_the_one_process_grid_search(tmp_path):
    """The premise of --per-candidate, on the embedded model: two Del% run as two pieces and joined
    give what one lora_merge grid search over both gives (pick, every candidate's validation loss
    and scores, test scores and predictions)."""
    dtype = "bfloat16" if lora_merge.bf16_isa(lora_merge.cpuinfo()) else "float32"  # bf16 crawls on AVX2 only
    tiny = ["--n-train", "4", "--n-val", "1", "--epochs", "1", "--batch-size", "2", "--micro-batch", "2",
            "--max-source-tokens", "48", "--dtype", dtype]
    cmd = ["run", "--setting", "en", "--rows", "merge-del", "--seeds", "0", "--ratios", "0.2", "0.5",
           "--max-test", "1", "--data-dir", str(DATA)]
    assert E.main([*cmd, "--root", str(tmp_path / "whole"), "--", *tiny]) == 0
    assert E.main([*cmd, "--root", str(tmp_path / "pieces"), "--per-candidate", "--", *tiny]) == 0
    (whole,), (joined,) = (E.cached(tmp_path / r, "en", "merge-del") for r in ("whole", "pieces"))
    assert len(joined["run"]["pieces"]) == 2 and "pieces" not in whole["run"]
    assert list(joined["run"]) == [*whole["run"], "pieces"]  # run.json says the same things of both
    assert joined["chosen"] == whole["chosen"] and joined["test"] == whole["test"]
    for v in ("0.2", "0.5"):
        a, b = whole["candidates"][v], joined["candidates"][v]
        assert a["val_scores"] == b["val_scores"] and a["history"] == b["history"] and a["sparsity"] == b["sparsity"]
    assert E.predictions([whole]) == E.predictions([joined])


def test_committed_pieces_stay_cached_under_their_runner_command(tmp_path, monkeypatch, capsys):
    """Each committed --per-candidate piece is found cached when its recorded runner command runs
    again (on a copy of its row): a change to how the runner writes a piece's flags must not make
    hours of committed pieces "other flags". Only the row's missing candidates would train."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # the recorded --data-dir and the committed modules are found from here
    pieces = [p for p in (repo / "results" / "runs").glob("*/*/seed*-*")
              if re.fullmatch(r"seed\d+-(threshold|ratio)[\d.]+", p.name) and (p / "results.json").is_file()]
    assert pieces, "no committed piece"
    trained = []
    monkeypatch.setattr(lora_merge, "main", lambda argv: trained.append(lora_merge.parse_args(argv)[0].out))
    for row in {p.parent for p in pieces}:
        shutil.copytree(row, tmp_path / row.parent.name / row.name)
    for command in {json.loads((p / "run.json").read_text())["runner_command"] for p in pieces}:
        argv = shlex.split(command)[2:]  # after "python experiments.py"
        argv[argv.index("--root") + 1] = str(tmp_path)
        E.main(argv)
    out = capsys.readouterr().out
    assert "other flags" not in out
    for p in pieces:
        copy = tmp_path / p.parent.parent.name / p.parent.name / p.name
        joined = copy.with_name(p.name.split("-")[0] + "-run") / "results.json"
        assert joined.is_file() or f"cached: {copy}" in out, p
        assert str(copy) not in trained


def test_committed_tgt_modules_pass_the_reuse_check(monkeypatch):
    """A later piece copies the committed TGT modules into its +TGT runs: each must pass
    lora_merge's check against the flags of the run that trained it (else no piece could reuse it)."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # the recorded commands, as the report prints them, run from here
    checked = 0
    for tgt in (repo / "results" / "runs").glob("*/*/seed*-run/seed*/modules/TGT"):
        run_dir = tgt.parents[2]
        command = E.portable(json.loads((run_dir / "run.json").read_text())["command"])
        args, _ = lora_merge.parse_args(shlex.split(command)[2:])  # after "python lora_merge.py"
        result = json.loads((tgt.parents[1] / "result.json").read_text())
        lora_merge.check_module(tgt, args, result["seed"], result["n_train"], result["n_val"])
        with pytest.raises(SystemExit, match="lr: 0.0001 there, 0.001 now"):
            args.lr = 1e-3
            lora_merge.check_module(tgt, args, result["seed"], result["n_train"], result["n_val"])
        checked += 1
    assert checked, "no committed TGT module"


@pytest.mark.skipif(not (DATA / "scitldr").is_dir(), reason="needs the real data")
def test_real_zero_shot_run_end_to_end(tmp_path):
    """One real lora_merge run through the runner: embedded model, one test example."""
    cmd = ["run", "--setting", "en", "--rows", "zero-shot", "--seeds", "0", "--root", str(tmp_path),
           "--max-test", "1", "--data-dir", str(DATA), "--", "--dtype", "float32"]
    assert E.main(cmd) == 0
    run = E.cached(tmp_path, "en", "zero-shot")
    assert len(run) == 1 and run[0]["n_test"] == 1 and 0 <= run[0]["test"]["rougeL"] <= 100
    assert len(metrics.read_predictions(tmp_path / "en" / "zero-shot" / "seed0-run" / "seed0" / "predictions.jsonl")) == 1
    mtime = (tmp_path / "en" / "zero-shot" / "seed0-run" / "results.json").stat().st_mtime
    assert E.main(cmd) == 0  # cached: returns at once, nothing rewritten
    assert (tmp_path / "en" / "zero-shot" / "seed0-run" / "results.json").stat().st_mtime == mtime


# ----------------------------------------------------------------------------------------
# report


REFS = [f"the model learns summaries of paper number {i}" for i in range(8)]
WEAK = [f"a survey of unrelated topic {i}" for i in range(8)]


def write_cached(root: Path, data_dir: Path, row: str, seed: int, score: float, preds: list[str], chosen=None,
                 val: dict | None = None):
    """A finished run as the runner caches it; val: Del% -> validation score of its candidates."""
    run_dir = root / "en" / row / f"seed{seed}-run"
    result = {"seed": seed, "method": "merge", "test": {"rouge1": 1.0, "rouge2": 2.0, "rougeL": score, "bleu": 3.0}}
    if chosen is not None:
        result["chosen"] = chosen
        val = val or {v: 20 + 10 * v + seed for v in (0.1, 0.2, 0.3)}
        result["candidates"] = {f"{v:g}": {"val_scores": {"rougeL": s}, "sparsity": {"TGT": v}} for v, s in val.items()}
    args = {"task": "scitldr", "data_dir": str(data_dir), "n_train": 50}
    lora_merge.write_json(run_dir / "results.json", {"task": "scitldr", "args": args, "seeds": [seed],
                                                    "runs": [result], "wall_time_s": 10.0})
    lora_merge.write_json(run_dir / "run.json", {"command": f"python lora_merge.py --task scitldr {row} {seed}",
                                                "runner_command": "python experiments.py run --setting en",
                                                "wall_time_s": 100.0 + seed, "finished": f"2025-01-0{seed + 1}",
                                                "machine": {"cpu": "test cpu", "nproc": 2, "torch": "x"}})
    (run_dir / f"seed{seed}").mkdir(parents=True, exist_ok=True)
    metrics.write_predictions(run_dir / f"seed{seed}" / "predictions.jsonl", [f"t{i}" for i in range(8)], preds)


def cell(md: str, label: str) -> list[str]:
    line = next(l for l in md.splitlines() if l.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_numbers_equal_the_cache(tmp_path):
    data_dir, root, out = tmp_path / "data", tmp_path / "cache", tmp_path / "results"
    (data_dir / "scitldr").mkdir(parents=True)
    (data_dir / "scitldr" / "test.jsonl").write_text("".join(
        json.dumps({"id": f"t{i}", "document": "doc", "summary": r}) + "\n" for i, r in enumerate(REFS)))
    weak = WEAK
    scores = {"lora-tgt": [30.0, 31.5, 29.25], "merge": [40.0, 42.0, 41.0], "zero-shot": [10.0, 12.0, 17.0],
              "merge-del-tgt": [35.0, 36.0, 37.5], "lora-tgt-n5": [20.0, 21.0], "merge-n5": [22.0, 23.0],
              "merge-tgt": [38.0, 39.0]}
    # At 5 examples Merge writes what LoRA (TGT) writes: Figure 6 must test it against LoRA (TGT)
    # at 5 (p = 1), not at 50, where the same predictions would be significantly better.
    preds = {"lora-tgt": weak, "merge": REFS, "zero-shot": weak, "merge-del-tgt": weak[:4] + REFS[4:],
             "lora-tgt-n5": REFS, "merge-n5": REFS, "merge-tgt": REFS}
    for row, values in scores.items():
        for seed, v in enumerate(values):
            write_cached(root, data_dir, row, seed, v, preds[row], chosen=0.1 * (seed + 1) if "del" in row else None)
    fig5_values = {"TGT": lambda l, p: l + 1, "dialogsum": lambda l, p: 2 * l if p == "q_proj" else 1}
    importance = [{"module": f"model.layers.{l}.self_attn.{p}", "adapter": a, "importance": f(l, p)}
                  for l in range(3) for p in ("q_proj", "v_proj") for a, f in fig5_values.items()]
    lora_merge.write_json(root / "en" / "merge-del-tgt" / "seed0-run" / "importance-seed0.json", importance)

    out.mkdir()
    (out / "discussion.md").write_text("## Discussion\n\nHand-written prose about the tables.\n")
    assert E.main(["report", "--root", str(root), "--out", str(out), "--shuffles", "2000"]) == 0
    md = (out / "README.md").read_text()
    assert "## Discussion\n\nHand-written prose about the tables.\n" in md  # kept verbatim, before the tables
    assert md.index("## Discussion") < md.index("### Table 2")
    task = data.get_task("scitldr")
    table2 = {}
    for row, values in scores.items():
        if row.endswith("-n5"):
            continue
        label = E.rows("en")[row]["label"]
        got = table2[row] = cell(md, label)
        assert got[1].split(" †")[0] == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
        assert got[2] == ", ".join(map(str, range(len(values))))
        chars = lambda texts: sum(len(t) for t in texts)
        assert got[5] == f"{chars(preds[row]) / chars(REFS):.2f}"  # same examples each seed: the ratio of one
        if row == "lora-tgt":
            assert got[4] == "-" and "†" not in got[1]
            continue
        k = len(values)  # seeds shared with LoRA (TGT)
        ref = metrics.approx_randomization(task, preds[row] * k, weak * k, [[r] for r in REFS] * k, shuffles=2000)
        assert got[4] == f"{ref['p']:.4f}" and ("†" in got[1]) == (ref["p"] < 0.05)
    assert "†" in cell(md, E.rows("en")["merge"]["label"])[1]  # all 24 pairs better: significant
    assert "†" not in cell(md, "Zero-shot")[1]  # the same predictions as LoRA (TGT): p = 1
    assert cell(md, E.rows("en")["merge-del-tgt"]["label"])[3] == "10, 20, 30"  # chosen Del% per seed
    assert cell(md, E.rows("en")["merge"]["label"])[3] == "-"  # one candidate: nothing was chosen
    assert cell(md, E.rows("en")["lorahub"]["label"])[1] == "not run"
    t4 = md.split("### Table 4")[1].split("###")[0]
    assert t4.split("\n\n")[1] == "not run"  # no ablation row cached: merge-del-tgt alone is no Table 4
    assert f"total wall time {sum(100.0 + s for v in scores.values() for s in range(len(v))) / 3600:.2f} h" in md
    assert "test cpu" in md and "python experiments.py run --setting en" in md
    for fig in ("fig4_en.png", "fig5_en.png", "fig6_en.png"):
        assert (out / fig).stat().st_size > 1000 and f"]({fig})" in md
    assert "fig4: not run" in md.split("## ja")[1] and "fig6: not run" in md.split("## ja")[1]
    # Figure 5's numbers from the cached importances, over the 6 linears
    fig5 = md.split("Figure 5's numbers")[1].split("\n\n")[1]
    assert "over the 6 adapted linears" in md
    tgt, ds = ([f(l, p) for l in range(3) for p in ("q_proj", "v_proj")] for f in fig5_values.values())
    r = f"{statistics.correlation(tgt, ds):.4f}"  # 0.6489: dialogsum's v_proj does not follow the layers
    assert cell(fig5, "TGT") == ["TGT", "2", "1", "3", "1.0000", r]
    assert cell(fig5, "dialogsum") == ["dialogsum", "1.5", "0", "4", r, "1.0000"]
    fig6 = md.split("Figure 6's numbers")[1].split("## ja")[0]  # the numbers behind the plot, 50 examples cached
    for row in ("lora-tgt", "merge", "merge-del-tgt"):  # at 50: Table 2's cells, p and all
        got = table2[row]
        at50 = f"{got[1]} (3 seeds)" if row == "lora-tgt" else f"{got[1]} (3 seeds; p {got[4]})"
        assert cell(fig6, E.rows("en")[row]["label"])[2:] == [at50, "not run", "not run"]
    assert cell(fig6, E.rows("en")["lora-tgt"]["label"])[1] == "20.50 ± 0.71 (2 seeds)"
    assert cell(fig6, E.rows("en")["merge"]["label"])[1] == "22.50 ± 0.71 (2 seeds; p 1.0000)"
    assert "†" in cell(fig6, E.rows("en")["merge"]["label"])[2]
    assert cell(fig6, E.rows("en")["merge-del-tgt"]["label"])[1] == "not run"
    assert cell(fig6, E.rows("en")["merge-del"]["label"])[1:] == ["not run"] * 4
    pruning = md.split("### Merge+Del against Merge")[1].split("###")[0]
    # merge-del-tgt has seeds 0-2, merge-tgt 0-1: the test pairs the two shared seeds only
    ref = metrics.approx_randomization(task, (weak[:4] + REFS[4:]) * 2, REFS * 2, [[r] for r in REFS] * 2, shuffles=2000)
    label = f"{E.rows('en')['merge-del-tgt']['label']} − {E.rows('en')['merge-tgt']['label']}"
    assert cell(pruning, label)[1:] == ["not run", f"{ref['diff']:+.2f}{' †' * (ref['p'] < 0.05)} (2 seeds; p "
                                                   f"{ref['p']:.4f})", "not run", "not run"]
    assert ref["diff"] < 0  # half the examples worse than Merge's exact references
    assert cell(pruning, f"{E.rows('en')['merge-del']['label']} − {E.rows('en')['merge']['label']}")[1:] == \
        ["not run"] * 4  # merge is cached, merge-del is not
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temp files


def test_whole_del_grid_joins_the_budget_run_and_the_fig4_run(tmp_path):
    """Figure 4's whole grid: merge-del-tgt's Del% (30, 60) and fig4-del-tgt's (10, 20, 40, 50) of
    one seed are one grid search; its pick and test score come from the run that holds the best
    validation score, and a seed without the fig4 run is left out."""
    data_dir, root, out = tmp_path / "data", tmp_path / "cache", tmp_path / "results"
    (data_dir / "scitldr").mkdir(parents=True)
    (data_dir / "scitldr" / "test.jsonl").write_text("".join(
        json.dumps({"id": f"t{i}", "document": "doc", "summary": r}) + "\n" for i, r in enumerate(REFS)))
    weak = WEAK
    for seed in (0, 1, 2):
        write_cached(root, data_dir, "merge-del-tgt", seed, 30.0, weak, chosen=0.3, val={0.3: 25.0, 0.6: 24.0})
    # seed 0: 10% beats the budget's pick; seed 1: 10% ties with 30% and wins as the smaller Del%
    write_cached(root, data_dir, "fig4-del-tgt", 0, 35.0, REFS, chosen=0.1, val={0.1: 27.0, 0.2: 26.0, 0.4: 22.0, 0.5: 21.0})
    write_cached(root, data_dir, "fig4-del-tgt", 1, 33.0, REFS, chosen=0.1, val={0.1: 25.0, 0.2: 20.0, 0.4: 20.0, 0.5: 19.0})
    out.mkdir()
    assert E.main(["report", "--root", str(root), "--out", str(out), "--shuffles", "2000"]) == 0
    md = (out / "README.md").read_text().split("## ja")[0]
    assert cell(md, "0") == ["0", "27.00", "26.00", "25.00", "22.00", "21.00", "24.00", "10", "35.00", "30", "30.00"]
    assert cell(md, "1") == ["1", "25.00", "20.00", "25.00", "20.00", "19.00", "24.00", "10", "33.00", "30", "30.00"]
    assert "| 2 |" not in md.split("whole Del% grid")[1]  # seed 2 has no fig4 run
    ref = metrics.approx_randomization(data.get_task("scitldr"), REFS * 2, weak * 2, [[r] for r in REFS] * 2, shuffles=2000)
    assert f"pooled over 2 seed(s): {ref['diff']:+.2f} (p {ref['p']:.4f})" in md and ref["diff"] > 0
    assert (out / "fig4_en.png").stat().st_size > 1000


def test_table4_rows_show_scores_picks_and_reset_shares_from_the_cache(tmp_path):
    """Table 4 once an ablation row is cached: each row's test score over its seeds, the threshold
    (module unit) or Del% (parameter unit) its search picked per seed, and the share of its
    adapters at their reset value at the pick (zeros, or merge-start values for an Init row), and its
    paired test against Merge without pruning and against the paper's Input / Parameter / Zero; rows
    not cached say so, and Figure 4 draws the module thresholds."""
    data_dir, root, out = tmp_path / "data", tmp_path / "cache", tmp_path / "results"
    (data_dir / "scitldr").mkdir(parents=True)
    (data_dir / "scitldr" / "test.jsonl").write_text("".join(
        json.dumps({"id": f"t{i}", "document": "doc", "summary": r}) + "\n" for i, r in enumerate(REFS)))
    write_cached(root, data_dir, "merge-tgt", 0, 40.0, REFS)
    write_cached(root, data_dir, "merge-del-tgt", 0, 41.0, REFS, chosen=0.3, val={0.3: 25.0, 0.6: 24.0})
    for seed, (score, pick) in enumerate([(36.0, 0.6), (39.0, 0.3)]):  # the pick's sparsity is the Del% itself
        write_cached(root, data_dir, "abl-param-grad-zero", seed, score, WEAK, chosen=pick,
                     val={0.3: 20.0 + 5 * (pick == 0.3), 0.6: 20.0 + 5 * (pick == 0.6)})
    write_cached(root, data_dir, "abl-module-input-init", 0, 30.0, REFS, chosen=0.5, val={0.2: 21.0, 0.5: 22.0, 1.0: 18.0})
    write_cached(root, data_dir, "abl-param-input-init", 0, 33.0, REFS, chosen=0.3, val={0.3: 23.0, 0.6: 22.0})
    for row, pick, at_init in [("abl-module-input-init", "0.5", {"TGT": 0.25, "dialogsum": 0.15}),
                               ("abl-param-input-init", "0.3", None)]:  # Init rows: the share is at_init, not zeros
        path = root / "en" / row / "seed0-run" / "results.json"
        results = json.loads(path.read_text())
        cand = results["runs"][0]["candidates"][pick]
        cand.update(config={"reset": "init"}, sparsity={"TGT": 0.0, "dialogsum": 0.0})
        if at_init:
            cand["at_init"] = at_init
        lora_merge.write_json(path, results)
    out.mkdir()
    assert E.main(["report", "--root", str(root), "--out", str(out), "--shuffles", "200"]) == 0
    t4 = (out / "README.md").read_text().split("## ja")[0].split("### Table 4")[1].split("###")[0]
    same = "+0.00 (p 1.0000)"  # Merge, Merge+Del and the Input rows all wrote REFS
    assert cell(t4, E.rows("en")["merge-tgt"]["label"] + " (no pruning)")[1:] == ["40.00", "0", "-", "-", "-", "-", same]
    assert cell(t4, "Input / Parameter / Zero (= Merge+Del +TGT)")[1:] == ["41.00", "0", "-", "30", "30.0", same, "-"]
    # Grad / Parameter / Zero wrote WEAK with both seeds; each test pairs the seeds it shares with
    # the other row: seed 0 only, so 8 pairs, the same for both baselines (which wrote REFS)
    ref = metrics.approx_randomization(data.get_task("scitldr"), WEAK, REFS, [[r] for r in REFS], shuffles=200)
    worse = f"{ref['diff']:+.2f} † (p {ref['p']:.4f})"
    assert ref["diff"] < -50 and ref["p"] < 0.05
    assert cell(t4, "Grad / Parameter / Zero")[1:] == ["37.50 ± 2.12", "0, 1", "-", "60, 30", "45.0", worse, worse]
    assert cell(t4, "Input / Module / Init")[1:] == ["30.00", "0", "0.5", "-", "20.0", same, same]
    assert cell(t4, "Input / Parameter / Init")[1:] == ["33.00", "0", "-", "30", "-", same, same]  # no at_init: no share
    for label in ("Input / Module / Zero", "Grad / Module / Zero", "Grad / Module / Init", "Grad / Parameter / Init"):
        assert cell(t4, label)[1] == "not run"
    assert (out / "fig4_en.png").stat().st_size > 1000


def test_committed_results_are_the_report_of_the_committed_cache(tmp_path, monkeypatch):
    """results/README.md is exactly what `experiments.py report` makes of the committed cache
    results/runs: no number in it was typed or left stale after a run was added."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # the cached runs name their data as ../shared/data, beside the repository
    (tmp_path / "discussion.md").write_text((repo / "results" / "discussion.md").read_text())
    assert E.main(["report", "--root", "results/runs", "--out", str(tmp_path)]) == 0
    strip = lambda md: [line for line in md.splitlines() if not line.startswith("python experiments.py report")]
    assert strip((tmp_path / "README.md").read_text()) == strip((repo / "results" / "README.md").read_text())
    for fig in (repo / "results").glob("fig*.png"):
        assert (tmp_path / fig.name).is_file(), f"{fig.name} is committed but no longer made from the cache"


def test_reported_commands_name_folders_of_this_clone():
    """The committed runs recorded the related modules as absolute folders of the clone that ran
    them; the report prints them from the repository root, so each printed command runs here."""
    repo = Path(__file__).resolve().parents[1]
    recorded = [json.loads(p.read_text())["command"] for p in (repo / "results" / "runs").glob("*/*/*/run.json")]
    with_modules = [c for c in recorded if "/adapters/" in c]
    assert with_modules, "no committed run names a related module"
    for command in with_modules:
        shown = E.portable(command).split()
        folders = [a for a in shown if "adapters/" in a]
        assert folders and all(not a.startswith("/") and (repo / a / "adapter_config.json").is_file()
                               for a in folders), shown
        assert E.comparable(shown) == E.comparable(command.split())  # the same run, only the paths differ


def test_machine_names_a_preloaded_malloc_and_only_then():
    """run.json's machine names a malloc preloaded in place of glibc's, since it changes CPU wall
    times; a process on glibc's malloc gets no key, so its runs group with the runs made before."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    shown = subprocess.run([sys.executable, "-c", "import json, experiments; print(json.dumps(experiments.machine()))"],
                           cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, check=True)
    machine = json.loads(shown.stdout)
    assert machine["nproc"] == os.cpu_count() and "malloc" not in machine
    # a jemalloc line as /proc/<pid>/maps shows it, added to a real map of this (glibc) process
    own = Path("/proc/self/maps").read_text()
    line = "7f888d009000-7f888d0af000 r-xp 00009000 fe:00 5595137  /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
    assert E.preloaded_malloc(own) is None and E.preloaded_malloc(own + line) == "jemalloc"


def test_machine_names_the_cpus_bf16_instructions():
    """run.json's machine says whether the CPU has AMX, avx512_bf16 or neither for bf16 matmuls: the
    model name alone ("Intel(R) Xeon(R) Processor") hid a 2.6x slower VM without AMX."""
    info = Path("/proc/cpuinfo").read_text()
    flags = next(line for line in info.splitlines() if line.startswith("flags"))
    bare = " ".join(f for f in flags.split() if not (f.startswith("amx") or f == "avx512_bf16"))
    assert lora_merge.bf16_isa(info.replace(flags, bare)) is None
    assert lora_merge.bf16_isa(info.replace(flags, bare + " avx512_bf16")) == "avx512_bf16"
    assert lora_merge.bf16_isa(info.replace(flags, bare + " avx512_bf16 amx_tile amx_bf16")) == "amx_bf16"
    assert E.machine()["bf16_isa"] == lora_merge.bf16_isa(info)
