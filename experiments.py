"""Experiment runner: the paper's Table 2, Table 4 and Figures 4-6 from cached lora_merge runs.

    python experiments.py list                                         # rows, and which are cached
    python experiments.py run --setting ja --rows table2 --seeds 0 1 2 --data-dir ../shared/data
    python experiments.py run --setting ja --rows merge-del-tgt --seeds 0 -- --epochs 2   # lora_merge flags
    python experiments.py report                                       # results/: tables + figures, cache only

One (setting, row, seed) is one `lora_merge.main` call into <root>/<setting>/<row>/seed<k>-run: the
cache unit. A run whose results.json exists is never recomputed, so a killed piece is restarted
with the same command: finished runs are skipped and a half-finished one resumes from lora_merge's
per-epoch checkpoints. Each finished run also gets run.json: its exact command, wall time, machine.
A run cached or started with other flags (another budget; flags compare as argparse reads them,
paths by their last part) is not rerun or resumed but reported as a failure, so one table never
mixes budgets silently: give each budget its own --root.
A grid search too long for one sitting (a Table 4 module row: 6 thresholds, ~2.5 h on a fast CPU)
runs with --per-candidate as one cached run per candidate, <row>/seed<k>-<flag><value> (e.g.
seed0-threshold0.1), each scored on validation; once all are cached they are joined into
seed<k>-run as the one-process search would have written it (join_pieces).

Choices:
- Related modules are trained once per setting by lora_merge's stage 1 (seed 0, all settings'
  rows share them) into <root>/modules/<model>/<task>, and passed to rows as folders.
- TGT depends only on the seed's 50/50 subsample and the training flags, so a +TGT run copies the
  TGT module of any cached run of the same setting and seed with the same such flags (LoRA (TGT)
  runs first) instead of training the same module again; run.json says where it came from.
- Significance (the dagger): one approximate randomization test per row against LoRA (TGT), on
  the seeds' test predictions pooled into one sample of (seed, example id) pairs; for BLEU the
  statistic is corpus BLEU over the pooled sample. Figure 6's cells are tested against LoRA (TGT)
  with as many training examples, and each Merge+Del row against its Merge row (does pruning help?).
- Figure 4 wants the validation score at every Del% of the paper's grid. With a smaller --ratios
  budget, row fig4-del-tgt trains the rest of the grid for a seed, and the report joins its
  candidates with merge-del-tgt's as one grid search (whole_grid).
- Table 4's module unit needs an absolute threshold; THRESHOLDS are grids around the module
  importances measured on the embedded model in the Japanese setting (see there).
- Flags after `--` go to lora_merge after the row's own and win over them (argparse: last wins),
  e.g. budgets, or `--threshold` with module-unit rows only (lora_merge rejects a pruning flag that a
  row's method or unit ignores); a --n-train there would also override Figure 6's rows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import data
import eval as metrics
import lora_merge

SETTINGS = {  # target task, related modules (abbreviation -> task), in the order of the table
    "en": {"task": "scitldr", "related": {"DS": "dialogsum", "AE": "aeslc"}},
    "ja": {"task": "nlp-paper-ja", "related": {"LD": "livedoor-ja", "XT": "xscitldr-ja"}},
}
RATIOS = ["0.1:0.6:0.1"]  # Merge+Del's Del% grid, as the paper's
# --unit module threshold grids (Table 4; the paper's own, 4e-3..1e-2 and 2e-13..7e-13, are for
# Llama-3-8B and its token counts). Measured on the embedded model, nlp-paper-ja, 50 validation
# examples (~46k tokens), Kaiming A and B ~ N(0, 0.01): module-wise input importance spans
# 0.07..1.1 (quartiles 0.5, 0.65, 0.85); grad importance S spans 4e-15..1e-10 after one step and
# grows with its EMA. Each grid runs from pruning almost nothing to almost everything.
THRESHOLDS = {"input": ["0.1", "0.2", "0.3", "0.5", "0.7", "1"],
              "grad": ["1e-13", "1e-12", "1e-11", "1e-10", "1e-9", "1e-8"]}
N_TRAIN = [5, 50, 100, 200]  # Figure 6
FIG6_ROWS = ("lora-tgt", "merge", "merge-tgt", "merge-del", "merge-del-tgt")  # its rows, at each size
TGT_FLAGS = ("model", "dtype", "n_train", "n_val", "max_source_tokens", "epochs", "patience", "lr",
             "batch_size", "micro_batch", "rank", "alpha", "dropout", "data_dir")  # what TGT depends on


def rows(setting: str, ratios: list[str] = RATIOS) -> dict[str, dict]:
    """row id -> {"label", "groups", "flags"}; "@REL" in flags stands for all related module folders,
    "@DS" etc. for one. `ratios`: the Del% grid of the parameter-unit pruning rows."""
    rel = SETTINGS[setting]["related"]
    names = "+".join(rel)
    out = {"zero-shot": ("Zero-shot", ["--method", "zero-shot"])}
    out.update({f"lora-{a}": (f"LoRA ({a})", ["--method", "lora", "--related", f"@{a}"]) for a in rel})
    out["lora-tgt"] = ("LoRA (TGT)", ["--method", "lora", "--related", "--with-target"])
    for rid, label, flags in [("lorahub", "LoRAHub", ["--method", "lorahub"]),
                              ("merge", "Merge", ["--ratio", "0"]), ("merge-del", "Merge+Del", ["--ratio", *ratios])]:
        out[rid] = (f"{label} ({names})", [*flags, "--related", "@REL"])
        out[f"{rid}-tgt"] = (f"{label} ({names}+TGT)", [*flags, "--related", "@REL", "--with-target"])
    table = {rid: {"label": label, "groups": ["table2"], "flags": flags} for rid, (label, flags) in out.items()}
    for rid in ("merge-tgt", "merge-del-tgt"):
        table[rid]["groups"].append("table4")
    for imp in ("input", "grad"):
        for reset in ("zero", "init"):
            table[f"abl-module-{imp}-{reset}"] = {
                "label": f"{imp.capitalize()} / Module / {reset.capitalize()}", "groups": ["table4"],
                "flags": ["--unit", "module", "--threshold", *THRESHOLDS[imp], "--importance", imp, "--reset", reset,
                          "--related", "@REL", "--with-target"]}
            if (imp, reset) != ("input", "zero"):  # that one is merge-del-tgt, the paper's method
                table[f"abl-param-{imp}-{reset}"] = {
                    "label": f"{imp.capitalize()} / Parameter / {reset.capitalize()}", "groups": ["table4"],
                    "flags": ["--ratio", *ratios, "--importance", imp, "--reset", reset, "--related", "@REL",
                              "--with-target"]}
    for rid in FIG6_ROWS:
        table[rid]["groups"].append("fig6")
        for n in N_TRAIN:
            if n != 50:
                table[f"{rid}-n{n}"] = {"label": f"{table[rid]['label']}, {n} examples", "groups": ["fig6"],
                                        "flags": [*table[rid]["flags"], "--n-train", str(n)]}
    # Figure 4's row: the Del% of the paper's grid that --ratios leaves out (module docstring). Each
    # candidate trains from the same start, so this run and merge-del-tgt's are one grid search.
    rest = [f"{v:g}" for v in grid(RATIOS) if v not in grid(ratios)]
    table["fig4-del-tgt"] = {"label": f"{table['merge-del-tgt']['label']}, the rest of the Del% grid",
                             "groups": ["fig4"], "flags": ["--ratio", *rest, "--related", "@REL", "--with-target"]
                             if rest else None}
    return table


def grid(ratios: list[str]) -> list[float]:
    """--ratios as numbers (lora_merge's syntax: '0.3 0.6', '0.3,0.6' or '0.1:0.6:0.1')."""
    return lora_merge.parse_values(ratios, "--ratios", 0.0, 1.0)


def select(setting: str, wanted: list[str], ratios: list[str] = RATIOS) -> list[str]:
    table = rows(setting, ratios)
    out = []
    for w in wanted:
        ids = [r for r in table if (w == "all" or w in table[r]["groups"]) and table[r]["flags"] is not None] or [w]
        for rid in ids:
            if rid not in table:
                raise SystemExit(f"error: unknown row {rid!r}; rows: {', '.join(table)}; groups: all table2 table4 fig4 fig6")
            if table[rid]["flags"] is None:  # named on its own: groups above skip it
                raise SystemExit(f"error: row {rid} has nothing to run with --ratios {' '.join(ratios)}: it is "
                                 f"{table[rid]['label']}")
            out += [rid] if rid not in out else []
    # LoRA (TGT) first: its TGT modules are then copied, not retrained, by the other +TGT rows
    return sorted(out, key=lambda r: not r.startswith("lora-tgt"))


def preloaded_malloc(maps: str) -> str | None:
    """The malloc preloaded in place of glibc's (LD_PRELOAD), read from /proc/<pid>/maps text. It is
    recorded because it changes CPU wall times a lot: on the 2-core Intel Xeon, 200-example SciTLDR
    epochs grew from 215 to 298 s within one process with glibc's malloc (its heap fragments: ~1.4 GB
    in use of ~5 GB) and stayed at 166 s with jemalloc."""
    return next((name for name in ("jemalloc", "tcmalloc", "mimalloc") if f"lib{name}" in maps), None)


def machine() -> dict:
    info = lora_merge.cpuinfo()
    cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
               platform.processor())
    maps = Path("/proc/self/maps")
    malloc = preloaded_malloc(maps.read_text()) if maps.exists() else None
    import torch
    return {"host": platform.node(), "cpu": cpu, "nproc": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "bf16_isa": lora_merge.bf16_isa(info),
            # only when preloaded, so runs made with glibc's malloc keep the machine key they always had
            **({"malloc": malloc} if malloc else {})}


# ----------------------------------------------------------------------------------------
# run


def ensure_modules(setting: str, root: Path, flags: list[str], command_line: str) -> dict[str, str]:
    """abbreviation -> folder of each related module, training the missing ones (stage 1) once.
    flags: a row's lora_merge flags (its pruning flags too, so that a --threshold after -- parses
    with the row's --unit module); the modules are the merge's, whatever the row's method."""
    rel = SETTINGS[setting]["related"]
    la, _ = lora_merge.parse_args(["--task", SETTINGS[setting]["task"], "--out", str(root), *flags,
                                   "--method", "merge", "--related", *rel.values()])
    folders = {a: lora_merge.module_folder(t, la) for a, t in rel.items()}
    if not all((f / "adapter_config.json").is_file() for f in folders.values()):
        import model as M
        t0 = time.time()
        model, tok = M.load_model(la.model, dtype=la.dtype)
        lora_merge.ensure_related(model, tok, la)
        lora_merge.write_json(root / "modules" / f"{setting}-run.json", {
            "command": command_line, "tasks": list(rel.values()),
            "wall_time_s": time.time() - t0, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine()})
    return {a: str(f) for a, f in folders.items()}


def copy_folder(src: Path, dst: Path):
    """src copied to dst whole or not at all (a killed copy leaves only a temporary folder)."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, dst)


def share_tgt(setting_dir: Path, run_dir: Path, argv: list[str], seed: int) -> str | None:
    """Copy a cached TGT module trained with the same seed and flags into this run (see docstring)."""
    la, _ = lora_merge.parse_args(argv)
    dst = run_dir / f"seed{seed}" / "modules" / "TGT"
    if not la.with_target or (dst / "adapter_config.json").is_file():
        return None
    want = {k: getattr(la, k) for k in TGT_FLAGS}
    for res in sorted(setting_dir.glob(f"*/seed{seed}-run/results.json")):
        src = res.parent / f"seed{seed}" / "modules" / "TGT"
        if (src / "adapter_config.json").is_file() and all(
                json.loads(res.read_text())["args"].get(k) == v for k, v in want.items()):
            copy_folder(src, dst)
            return str(src)
    return None


def log_attempt(run_dir: Path, argv: list[str], tgt_from: str | None) -> tuple[float, str | None]:
    """Record this attempt's start, flags and copied TGT module in attempts.json. Return the seconds
    spent by earlier, killed attempts, each from its start to the last file written before the next
    began (its checkpoint), and where the run's TGT module came from: a resumed run finds the copy
    an earlier attempt made already there, so only attempts.json still knows its source."""
    path = run_dir / "attempts.json"
    attempts = json.loads(path.read_text()) if path.is_file() else []
    if attempts:
        last = max((p.stat().st_mtime for p in run_dir.rglob("*") if p.is_file() and p != path), default=0)
        attempts[-1]["ended"] = max(last, attempts[-1]["started"])
    attempts.append({"started": time.time(), "argv": argv, "tgt_from": tgt_from})
    lora_merge.write_json(path, attempts)
    return (sum(a["ended"] - a["started"] for a in attempts[:-1]),
            next((a["tgt_from"] for a in attempts if a.get("tgt_from")), None))


def substitute(flags: list[str], folders: dict[str, str]) -> list[str]:
    """A row's flags with "@REL" / "@DS" replaced by the related modules' folders (or names)."""
    return [x for f in flags for x in (folders.values() if f == "@REL" else
                                       [folders[f[1:]]] if f.startswith("@") else [f])]


def recorded_argv(run_dir: Path) -> list[str] | None:
    """The flags a run was made with: run.json's once finished, else its first attempt's (a killed
    run resumed with other flags would mix two budgets in one row). None: nothing recorded."""
    finished, attempts = run_dir / "run.json", run_dir / "attempts.json"
    if finished.is_file():
        return json.loads(finished.read_text())["argv"]
    first = json.loads(attempts.read_text())[0] if attempts.is_file() else {}
    return first.get("argv")


def options(argv: list[str]) -> dict[str, list[str]]:
    """argv as argparse reads it: each --option with the values after it, a repeated one's last
    occurrence winning ("" holds what comes before the first option)."""
    read, option = {"": []}, ""
    for a in argv:
        if a.startswith("--"):
            read.pop(a, None)  # the last occurrence wins, wherever it stands
            read[option := a] = []
        else:
            read[option].append(a)
    return read


def comparable(argv: list[str]) -> dict[str, list[str]]:
    """argv's options with every path cut to its last part: the same run made in another clone (or
    with the modules named rather than given as folders, or a flag given twice) compares equal."""
    return {o: [Path(a).name if "/" in a else a for a in values] for o, values in options(argv).items()}


def one_candidate(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with the grid that flag searches narrowed to value, scored on validation (--val-scores)
    since the pick among the candidates is made later, from the pieces."""
    kept = [x for o, values in options(argv).items() if o != flag for x in (o, *values) if x]
    return [*kept, flag, value, "--val-scores"]


def portable(command: str) -> str:
    """A recorded command with the committed modules' absolute folders (/.../adapters/<model>/<task>)
    shown from the repository root, so that it runs as printed from any clone."""
    return shlex.join([a[a.index("/adapters/") + 1:] if a.startswith("/") and "/adapters/" in a else a
                       for a in shlex.split(command)])


def run_record(args, rid: str, seed: int, argv: list[str], tgt_from: str | None, wall_time_s: float,
               earlier_attempts_s: float, machine_info: dict, **more) -> dict:
    """run.json: what made a finished run and on what, the same keys first for one run and a joined one."""
    return {"setting": args.setting, "row": rid, "seed": seed, "argv": argv,
            "command": shlex.join(["python", "lora_merge.py", *argv]), "runner_command": args.command_line,
            "tgt_from": tgt_from, "wall_time_s": wall_time_s, "earlier_attempts_s": earlier_attempts_s,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info, **more}


def run_unit(args, rid: str, seed: int, run_dir: Path, argv_of, label: str) -> str | None:
    """One lora_merge call into run_dir, unless it is cached there. argv_of(folders): its flags, given
    the related modules' folders (or names). Returns why it failed, or None."""
    name = f"[{args.setting}/{label} seed {seed}]"
    done, before = (run_dir / "results.json").is_file(), recorded_argv(run_dir)
    if before is not None and comparable(before) != comparable(argv_of(SETTINGS[args.setting]["related"])):
        print(f"{name} {'cached' if done else 'started'} with other flags, not {'rerun' if done else 'resumed'} "
              f"(a budget of its own wants its own --root): {shlex.join(before)}; delete {run_dir} to make it anew",
              flush=True)
        return "other flags"
    if done:
        print(f"{name} cached: {run_dir}", flush=True)
        return None
    argv = argv_of(related_folders(args, rid))
    print(f"{name} python lora_merge.py {shlex.join(argv)}", flush=True)
    (run_dir / f"seed{seed}").mkdir(parents=True, exist_ok=True)  # zero-shot writes there first
    t0 = time.time()
    earlier, tgt_from = log_attempt(run_dir, argv, share_tgt(Path(args.root) / args.setting, run_dir, argv, seed))
    try:
        lora_merge.main(argv)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - one broken row must not stop a piece of hours
        print(f"{name} FAILED: {e!r}", flush=True)
        return "failed"
    lora_merge.write_json(run_dir / "run.json",
                          run_record(args, rid, seed, argv, tgt_from, time.time() - t0 + earlier, earlier, machine()))
    return None


def common_flags(args) -> list[str]:
    """The runner's flags that every lora_merge call gets."""
    return [*(["--data-dir", args.data_dir] if args.data_dir else []),
            *(["--max-test", str(args.max_test)] if args.max_test else [])]


def related_folders(args, rid: str) -> dict[str, str]:
    """The related modules' folders for a row that names them (trained first if missing), else {}."""
    row_flags = rows(args.setting, args.ratios)[rid]["flags"]
    if not any(f.startswith("@") for f in row_flags):
        return {}
    flags = substitute(row_flags, SETTINGS[args.setting]["related"])
    return ensure_modules(args.setting, Path(args.root), [*flags, *common_flags(args), *args.extra], args.command_line)


def candidate_pieces(argv: list[str], run_dir: Path) -> list[tuple[Path, str, str]]:
    """--per-candidate: (piece folder, grid flag, value) for each candidate of the grid that argv
    searches; [] where there is no grid (one candidate) to split."""
    la, _ = lora_merge.parse_args(argv)
    flag, values = ("--threshold", la.threshold) if la.unit == "module" else ("--ratio", la.ratio)
    if la.method != "merge" or len(values) < 2:
        return []
    seed = run_dir.name.removesuffix("-run")
    return [(run_dir.with_name(f"{seed}-{flag[2:]}{v:g}"), flag, f"{v:g}") for v in values]


def join_pieces(args, rid: str, seed: int, run_dir: Path, pieces: list[Path], argv: list[str]):
    """Write into run_dir what lora_merge's one-process grid search over the pieces' candidates writes:
    every candidate's log, the pick (best validation score, the smaller value on a tie: pieces come
    in ascending order and max keeps the first) and its test predictions and scores. Each candidate
    starts from the same merge with the same seeds in either case, so the two agree (a test checks
    it on the embedded model). run.json adds each piece's command, wall time and machine."""
    parts = [json.loads((p / "results.json").read_text()) for p in pieces]
    infos = [json.loads((p / "run.json").read_text()) for p in pieces]
    metric, runs = data.get_task(parts[0]["task"]).metric, [s["runs"][0] for s in parts]
    best = max(range(len(runs)), key=lambda i: runs[i]["candidates"][f"{runs[i]['chosen']:g}"]["val_scores"][metric])
    seed_dir, held = run_dir / f"seed{seed}", pieces[best] / f"seed{seed}"
    joined = {**runs[best], "candidates": {v: c for r in runs for v, c in r["candidates"].items()},
              "wall_time_s": sum(r["wall_time_s"] for r in runs)}
    if (held / "modules" / "TGT").is_dir():  # kept beside the run, as every +TGT run keeps its own
        if not (seed_dir / "modules" / "TGT" / "adapter_config.json").is_file():
            (seed_dir / "modules").mkdir(parents=True, exist_ok=True)
            copy_folder(held / "modules" / "TGT", seed_dir / "modules" / "TGT")
        joined["modules"] = {**joined["modules"], "TGT": str(seed_dir / "modules" / "TGT")}
    predictions = (held / "predictions.jsonl").read_bytes()
    data.atomic_write(seed_dir / "predictions.jsonl", lambda f: f.write(predictions))
    lora_merge.write_json(seed_dir / "result.json", joined)
    grid_key = "threshold" if parts[best]["args"]["unit"] == "module" else "ratio"
    machines = {json.dumps({k: v for k, v in i["machine"].items() if k != "host"}, sort_keys=True) for i in infos}
    lora_merge.write_json(run_dir / "run.json", run_record(
        args, rid, seed, argv, infos[best]["tgt_from"], sum(i["wall_time_s"] for i in infos),
        sum(i["earlier_attempts_s"] for i in infos),
        infos[best]["machine"] if len(machines) == 1 else {"cpu": "several: see pieces"},
        pieces=[{"dir": p.name, **{k: i[k] for k in ("command", "runner_command", "wall_time_s", "finished",
                                                      "machine")}} for p, i in zip(pieces, infos)]))
    lora_merge.write_json(run_dir / "results.json", {
        "task": parts[0]["task"], "args": {**parts[best]["args"], grid_key: [r["chosen"] for r in runs],
                                           "out": str(run_dir)},
        "seeds": [seed], "summary": lora_merge.summarize([joined], metric), "runs": [joined],
        "wall_time_s": sum(s["wall_time_s"] for s in parts)})
    print(f"[{args.setting}/{rid} seed {seed}] joined {len(pieces)} pieces into {run_dir}: chose "
          f"{runs[best]['chosen']:g}", flush=True)


def run(args, extra: list[str]) -> int:
    setting_dir, table, failed = Path(args.root) / args.setting, rows(args.setting, args.ratios), []
    args.extra, common = extra, common_flags(args)
    for rid in select(args.setting, args.rows, args.ratios):
        for seed in args.seeds:
            run_dir = setting_dir / rid / f"seed{seed}-run"

            def argv_of(folders, out=run_dir):
                return ["--task", SETTINGS[args.setting]["task"], *substitute(table[rid]["flags"], folders),
                        "--seeds", str(seed), "--out", str(out), *common, *extra]
            pieces = []
            if args.per_candidate and not (run_dir / "results.json").is_file():
                try:
                    pieces = candidate_pieces(argv_of(SETTINGS[args.setting]["related"]), run_dir)
                except SystemExit as e:  # a bad flag after --: this row fails, the others still run
                    print(f"[{args.setting}/{rid} seed {seed}] FAILED: {e!r}", flush=True)
                    failed.append(f"{rid} seed {seed}")
                    continue
            units = [(d, lambda folders, d=d, f=f, v=v: one_candidate(argv_of(folders, d), f, v), f"{rid} {f[2:]} {v}")
                     for d, f, v in pieces] or [(run_dir, argv_of, rid)]
            for unit_dir, unit_argv, label in units:
                if (why := run_unit(args, rid, seed, unit_dir, unit_argv, label)) is not None:
                    failed.append(f"{label} seed {seed}" + (f" ({why})" if why != "failed" else ""))
            if pieces and all((d / "results.json").is_file() for d, _, _ in pieces):
                join_pieces(args, rid, seed, run_dir, [d for d, _, _ in pieces], argv_of(related_folders(args, rid)))
    if failed:
        print(f"failed ({len(failed)}): {', '.join(failed)}", flush=True)
    return 1 if failed else 0


def cached(root: Path, setting: str, rid: str) -> list[dict]:
    """The finished runs of one row, by seed: the per-seed result plus run.json as "run"."""
    out = []
    for res in sorted((root / setting / rid).glob("seed*-run/results.json")):
        summary = json.loads(res.read_text())
        run_json = res.parent / "run.json"
        for r in summary["runs"]:
            out.append({**r, "dir": str(res.parent), "args": summary["args"],
                        "run": json.loads(run_json.read_text()) if run_json.is_file() else {}})
    return sorted(out, key=lambda r: r["seed"])


def list_rows(args) -> int:
    for folder in sorted(Path(args.root).glob("modules/*/*")):
        print(f"module {folder}: {'trained' if (folder / 'adapter_config.json').is_file() else 'unfinished'}")
    for setting in SETTINGS:
        table = rows(setting)
        width = max(len(row["label"]) for row in table.values())
        gwidth = max(len(",".join(row["groups"])) for row in table.values())
        for rid, row in table.items():
            seeds = [r["seed"] for r in cached(Path(args.root), setting, rid)]
            partial = [p.name for p in sorted((Path(args.root) / setting / rid).glob("seed*-run"))
                       if not (p / "results.json").is_file()]
            pieces = [p.name + ("" if (p / "results.json").is_file() else " (unfinished)")
                      for p in sorted((Path(args.root) / setting / rid).glob("seed*-*")) if not p.name.endswith("-run")]
            print(f"{setting}  {rid:24} {row['label']:{width}} {','.join(row['groups']):{gwidth}} "
                  f"cached seeds: {seeds or '-'}" + (f"  unfinished: {partial}" if partial else "")
                  + (f"  pieces: {pieces}" if pieces else ""))
    return 0


# ----------------------------------------------------------------------------------------
# report: reads the cache only (and, once, the base model for Figure 5's importances)


def mean_std(values: list[float]) -> str:
    """"mean ± std" over seeds; one seed has no spread to show, so just its score."""
    mean = f"{statistics.mean(values):.2f}"
    return f"{mean} ± {statistics.stdev(values):.2f}" if len(values) > 1 else mean


def scores_of(runs: list[dict], metric: str) -> list[float]:
    return [r["test"][metric] for r in runs]


def predictions(runs: list[dict]) -> dict[tuple[int, str], str]:
    """(seed, example id) -> test prediction, over all the row's seeds."""
    return {(r["seed"], i): p for r in runs for i, p in
            metrics.read_predictions(Path(r["dir"]) / f"seed{r['seed']}" / "predictions.jsonl").items()}


def pooled_test(task, a: dict, b: dict, refs: dict, shuffles: int) -> dict | None:
    """Approximate randomization of A against B (predictions() of two rows) on all their common
    seeds, paired by (seed, example id): one test per row, as the module docstring says."""
    keys = sorted(k for k in set(a) & set(b) if k[1] in refs)
    if not keys:
        return None
    return metrics.approx_randomization(task, [a[k] for k in keys], [b[k] for k in keys],
                                        [refs[k[1]] for k in keys], shuffles=shuffles)


def tester(task, runs: dict, refs: dict | None, shuffles: int):
    """test(a, b): pooled_test of cached row a against row b (row ids), or None without references.
    Each pair is computed once per report, in either order (Table 2 and Figure 6's 50-example column share theirs;
    Table 4 tests Merge against Merge+Del, which the pruning table tested the other way round), and each
    row's predictions are read once (LoRA (TGT)'s are the baseline of every row)."""
    memo, preds = {}, {}

    def read(rid: str) -> dict:
        if rid not in preds:
            preds[rid] = predictions(runs[rid])
        return preds[rid]

    def test(a: str, b: str) -> dict | None:
        if refs is not None and (a, b) not in memo:
            flipped = memo.get((b, a))  # symmetric: the same p and shuffles, a and b swapped (diff = a - b anew)
            memo[a, b] = pooled_test(task, read(a), read(b), refs, shuffles) if flipped is None else \
                {**flipped, "a": flipped["b"], "b": flipped["a"], "diff": flipped["b"] - flipped["a"]}
        return memo.get((a, b))
    return test


def difference(result: dict, seeds: str = "") -> str:
    """A paired test as a table cell: A − B, † at p < 0.05, and p (after the seeds it pooled, if given)."""
    return f"{result['diff']:+.2f}{' †' * (result['p'] < 0.05)} ({seeds + '; ' if seeds else ''}p {result['p']:.4f})"


def chosen(runs: list[dict], scale: float = 1.0) -> str:
    """The value picked by grid search on validation, per seed ("-" without a grid)."""
    return ", ".join(f"{r['chosen'] * scale:g}" for r in runs if len(r.get("candidates", {})) > 1) or "-"


def reset_share(runs: list[dict]) -> str:
    """Share of the adapters' entries at their reset value at the chosen candidate, mean over
    adapters and seeds, %: exact zeros ("sparsity"), or for reset="init" merge-start values
    ("at_init"; an Init run without it has no share to show, its zeros would read ~0)."""
    picks = [r["candidates"][f"{r['chosen']:g}"] for r in runs if "chosen" in r]
    shares = [c.get("at_init" if c.get("config", {}).get("reset") == "init" else "sparsity") for c in picks]
    vals = [statistics.mean(s.values()) * 100 for s in shares if s]
    return f"{statistics.mean(vals):.1f}" if vals else "-"


def length_ratio(preds: dict, refs: dict) -> str:
    """Mean prediction length (predictions() of a row) over mean length of the first reference, in
    characters, on the same examples: a small model's failure to stop (>> 1) or to say enough (<< 1)
    shows up here."""
    pairs = [(p, refs[i][0]) for (_, i), p in preds.items() if i in refs]
    return f"{sum(len(p) for p, _ in pairs) / sum(len(r) for _, r in pairs):.2f}" if pairs else "-"


def table2(setting: str, task, runs: dict, refs: dict | None, test) -> list[str]:
    lines = [f"| Row | {task.metric} (mean ± std) | seeds | Del% (per seed) | p vs LoRA (TGT) | length / ref |",
             "|---|---|---|---|---|---|"]
    for rid, row in rows(setting).items():
        if "table2" not in row["groups"]:
            continue
        rs = runs[rid]
        if not rs:
            lines.append(f"| {row['label']} | not run | | | | |")
            continue
        cell, p, preds = mean_std(scores_of(rs, task.metric)), "-", predictions(rs)
        result = test(rid, "lora-tgt") if rid != "lora-tgt" else None
        if result is not None:
            p, cell = f"{result['p']:.4f}", cell + (" †" if result["p"] < 0.05 else "")
        lines.append(f"| {row['label']} | {cell} | {', '.join(str(r['seed']) for r in rs)} | {chosen(rs, 100)} | {p} | "
                     f"{length_ratio(preds, refs) if refs is not None else '-'} |")
    return lines


def table4(setting: str, task, runs: dict, test) -> list[str]:
    """Each configuration's score, pick and reset share, and two paired tests on the pooled seeds:
    against Merge without pruning (does this pruning help?) and against the paper's configuration,
    Input / Parameter / Zero (is this variant worse?). The cells are "difference (p)", † at p < 0.05."""
    lines = [f"| Importance / Unit / Reset | {task.metric} (mean ± std) | seeds | Thresh (per seed) | "
             "Del% (per seed) | reset % | − no pruning (p) | − Input / Parameter / Zero (p) |",
             "|---|---|---|---|---|---|---|---|"]
    order = ["merge-tgt", *[f"abl-module-{i}-{z}" for i in ("input", "grad") for z in ("zero", "init")],
             "merge-del-tgt", "abl-param-input-init", "abl-param-grad-zero", "abl-param-grad-init"]
    labels = {"merge-tgt": rows(setting)["merge-tgt"]["label"] + " (no pruning)",
              "merge-del-tgt": "Input / Parameter / Zero (= Merge+Del +TGT)"}

    def against(rid: str, base: str) -> str:
        result = test(rid, base) if rid != base and runs[base] else None
        return "-" if result is None else difference(result)

    for rid in order:
        rs, label = runs[rid], labels.get(rid) or rows(setting)[rid]["label"]
        if not rs:
            lines.append(f"| {label} | not run | | | | | | |")
            continue
        module = rid.startswith("abl-module")
        lines.append(f"| {label} | {mean_std(scores_of(rs, task.metric))} | {', '.join(str(r['seed']) for r in rs)} | "
                     f"{chosen(rs) if module else '-'} | {'-' if module or rid == 'merge-tgt' else chosen(rs, 100)} | "
                     f"{reset_share(rs)} | {against(rid, 'merge-tgt')} | {against(rid, 'merge-del-tgt')} |")
    return lines


def savefig(fig, path: Path):
    import matplotlib.pyplot as plt
    data.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def curve(ax, rs: list[dict], metric: str, label: str, scale: float = 1.0):
    """Validation score against candidate value: mean ± std over the seeds."""
    by_value = {}
    for r in rs:
        for v, c in r.get("candidates", {}).items():
            if "val_scores" in c:
                by_value.setdefault(float(v) * scale, []).append(c["val_scores"][metric])
    xs = sorted(by_value)
    if xs:
        ax.errorbar(xs, [statistics.mean(by_value[x]) for x in xs],
                    [statistics.stdev(by_value[x]) if len(by_value[x]) > 1 else 0 for x in xs], marker="o", capsize=3, label=label)
    return bool(xs)


def whole_grid(runs: dict, metric: str) -> list[dict]:
    """Each seed cached in both merge-del-tgt and fig4-del-tgt, as one grid search over the union of
    their candidates: {"seed", "val": {Del%: validation score}, "chosen", "holder": the run that
    holds the pick (and its test predictions), "budget": merge-del-tgt's run}. The pick is the best
    validation score, the smaller Del% on a tie, as lora_merge picks: the holder picked it too."""
    rest, out = {r["seed"]: r for r in runs["fig4-del-tgt"]}, []
    for budget in runs["merge-del-tgt"]:
        if budget["seed"] not in rest:
            continue
        held = {float(v): (r, c["val_scores"][metric]) for r in (budget, rest[budget["seed"]])
                for v, c in r.get("candidates", {}).items() if "val_scores" in c}
        val = {v: score for v, (_, score) in sorted(held.items())}
        if not val:  # single-candidate runs are not scored on validation
            continue
        best = max(val, key=val.get)
        out.append({"seed": budget["seed"], "val": val, "chosen": best, "holder": held[best][0], "budget": budget})
    return out


def whole_grid_table(task, grids: list[dict], refs: dict | None, shuffles: int) -> list[str]:
    """The numbers of Figure 4's whole-grid curve, per seed, and the pick's test score against the
    budget's pick (its Table 2 score), pooled over the seeds by the usual test."""
    m, values = task.metric, sorted({v for g in grids for v in g["val"]})
    lines = [f"Figure 4's whole Del% grid (Merge+Del +TGT; the Del% of `--ratios` from merge-del-tgt, the others "
             f"from fig4-del-tgt, same seed): validation {m} at each Del%, the Del% a grid search over all of "
             f"them picks and its test {m}, against the pick from `--ratios` alone (Table 2's).", "",
             f"| seed | {' | '.join(f'{v * 100:g}' for v in values)} | whole grid: Del% | test | "
             "`--ratios`: Del% | test |", "|---" * (len(values) + 5) + "|"]
    for g in grids:
        val = " | ".join(f"{g['val'][v]:.2f}" if v in g["val"] else "-" for v in values)
        lines.append(f"| {g['seed']} | {val} | {g['chosen'] * 100:g} | {g['holder']['test'][m]:.2f} | "
                     f"{g['budget']['chosen'] * 100:g} | {g['budget']['test'][m]:.2f} |")
    result = pooled_test(task, predictions([g["holder"] for g in grids]), predictions([g["budget"] for g in grids]),
                         refs, shuffles) if refs is not None else None
    if result is not None:
        lines += ["", f"Whole grid minus `--ratios`, pooled over {len(grids)} seed(s): {result['diff']:+.2f} "
                      f"(p {result['p']:.4f})."]
    return lines


def figure4(setting: str, task, runs: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    done = [curve(left, runs[rid], task.metric, rows(setting)[rid]["label"]) for rid in runs if rid.startswith("abl-module")]
    done += [curve(right, runs[rid], task.metric, rows(setting)[rid]["label"], 100)
             for rid in ("merge-del", "merge-del-tgt", "abl-param-input-init", "abl-param-grad-zero", "abl-param-grad-init")]
    grids = whole_grid(runs, task.metric)
    if grids:  # each seed's whole grid as one run, so that curve() averages the seeds that have it
        seeds = ", ".join(str(g["seed"]) for g in grids)
        done.append(curve(right, [{"candidates": {f"{v:g}": {"val_scores": {task.metric: s}} for v, s in g["val"].items()}}
                                  for g in grids], task.metric,
                          f"{rows(setting)['merge-del-tgt']['label']}, whole grid (seed {seeds})", 100))
    left.set(xscale="log", xlabel="module threshold", ylabel=f"validation {task.metric}", title="Module")
    right.set(xlabel="Del% (parameter)", ylabel=f"validation {task.metric}", title="Parameter")
    for ax in (left, right):
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"Figure 4 ({setting}, {task.name}): validation score against pruning hyperparameter")
    savefig(fig, path) if any(done) else plt.close(fig)
    return any(done)


def importance_path(run: dict) -> Path:
    """Where Figure 5's importances of one run are cached (committed; its adapters are not)."""
    return Path(run["dir"]) / f"importance-seed{run['seed']}.json"


def module_importances(run: dict, data_dir) -> list[dict]:
    """Figure 5's numbers for one cached run: module-wise input importance of its final adapters on
    its seed's validation subsample (as the merge measured them), cached at importance_path."""
    path = importance_path(run)
    if path.is_file():
        return json.loads(path.read_text())
    import model as M
    import prune
    a, seed = run["args"], run["seed"]
    task = data.get_task(a["task"])
    model, tok = M.load_model(a["model"], dtype=a["dtype"])
    for folder in sorted((Path(run["dir"]) / f"seed{seed}" / "adapters").iterdir()):
        M.load_adapter(model, folder, name=folder.name, trainable=False)
    _, val = data.low_resource_splits(task.name, a["n_train"], a["n_val"], seed, data_dir or a["data_dir"])
    batches = lora_merge.make_batches(lora_merge.encode_examples(tok, task, val, a["max_source_tokens"]),
                                      a["micro_batch"] * 2, tok.pad_id)
    norms = prune.collect_input_norms(model, ((b["input_ids"], b["attention_mask"]) for b in batches))
    out = [{"module": p, "adapter": n, "importance": v}
           for (p, n), v in prune.module_importance(prune.input_importance(model, norms)).items()]
    lora_merge.write_json(path, out)
    return out


def figure5_run(runs: dict) -> dict | None:
    """The run Figure 5 shows: the first Merge+Del run with cached importances or the final
    adapters to measure them from."""
    rs = [r for rid in ("merge-del-tgt", "merge-del") for r in runs[rid]
          if importance_path(r).is_file() or (Path(r["dir"]) / f"seed{r['seed']}" / "adapters").is_dir()]
    return rs[0] if rs else None


def figure5(setting: str, run: dict, values: list[dict], path: Path) -> str:
    """Plots module_importances(run) per layer and linear; returns the run's name for the caption."""
    import matplotlib.pyplot as plt
    projs = sorted({v["module"].rsplit(".", 1)[1] for v in values})
    fig, axes = plt.subplots(1, len(projs), figsize=(5.5 * len(projs), 4), squeeze=False)
    for ax, proj in zip(axes[0], projs):
        for name in sorted({v["adapter"] for v in values}):
            pts = sorted((int(v["module"].split(".layers.")[1].split(".")[0]), v["importance"]) for v in values
                         if v["adapter"] == name and v["module"].endswith("." + proj))
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker=".", label=name)
        ax.set(xlabel="layer", ylabel="mean |W| * ||X|| of the module", title=proj)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
    source = f"{Path(run['dir']).parent.name} seed {run['seed']}"
    fig.suptitle(f"Figure 5 ({setting}): module-wise input importance of the final adapters of {source}")
    savefig(fig, path)
    return source


def figure5_table(values: list[dict]) -> list[str]:
    """Figure 5's numbers per module: the range the paper quotes, and how closely two modules'
    importances follow each other across the adapted linears (Pearson r), which tells whether
    a module threshold would cut by module (the paper's reading) or by layer."""
    import numpy as np
    by = {}  # adapter -> {linear: importance}
    for v in values:
        by.setdefault(v["adapter"], {})[v["module"]] = v["importance"]
    names = sorted(by)
    linears = sorted(set.intersection(*(set(d) for d in by.values())))
    vec = {n: np.array([by[n][m] for m in linears]) for n in names}
    lines = [f"Figure 5's numbers (module-wise input importance over the {len(linears)} adapted linears; r: "
             "Pearson correlation of two modules' importances across them):", "",
             "| Module | mean | min | max | " + " | ".join(f"r ({n})" for n in names) + " |",
             "|---" * (4 + len(names)) + "|"]
    for n in names:
        x = vec[n]
        rs = [f"{np.corrcoef(x, vec[m])[0, 1]:.4f}" for m in names]
        lines.append(f"| {n} | {x.mean():.3g} | {x.min():.3g} | {x.max():.3g} | " + " | ".join(rs) + " |")
    return lines


def size_header(first: str) -> list[str]:
    """Header of a Markdown table with one column per Figure 6 training-set size."""
    return [f"| {first} | {' | '.join(f'{n} examples' for n in N_TRAIN)} |", "|---|" + "---|" * len(N_TRAIN)]


def n_seeds(k: int) -> str:
    """"1 seed", "3 seeds": the seed count written in Figure 6's cells and the pruning table."""
    return f"{k} seed{'s' * (k > 1)}"


def sized(rid: str, n: int) -> str:
    """Figure 6's row id for a Table 2 row trained on n target examples (50 is Table 2's own)."""
    return rid if n == 50 else f"{rid}-n{n}"


def size_scores(task, runs: dict, rid: str) -> list[tuple[int, list[float]]]:
    """Figure 6's points for one row: (target training examples, test scores over seeds), cached sizes only."""
    pts = [(n, scores_of(runs[sized(rid, n)], task.metric)) for n in N_TRAIN]
    return [(n, s) for n, s in pts if s]


def table6(setting: str, task, runs: dict, test) -> list[str]:
    """The numbers behind Figure 6, so a reader need not read them off the plot. Each cell is tested
    like Table 2's rows, against LoRA (TGT) trained on the same number of examples."""
    lines = size_header("Row")
    for rid in FIG6_ROWS:
        cells = []
        for n in N_TRAIN:
            rs = runs[sized(rid, n)]
            if not rs:
                cells.append("not run")
                continue
            cell, note = mean_std(scores_of(rs, task.metric)), n_seeds(len(rs))
            result = test(sized(rid, n), sized("lora-tgt", n)) if rid != "lora-tgt" else None
            if result is not None:
                cell, note = cell + (" †" if result["p"] < 0.05 else ""), f"{note}; p {result['p']:.4f}"
            cells.append(f"{cell} ({note})")
        lines.append(f"| {rows(setting)[rid]['label']} | {' | '.join(cells)} |")
    return lines


def pruning_table(setting: str, runs: dict, test) -> list[str]:
    """Does pruning help? Each Merge+Del row against the Merge row with the same modules, at each
    training-set size: the difference of their pooled scores on the seeds both have, and its p."""
    lines = size_header("Merge+Del − Merge")
    for pruned in ("merge-del", "merge-del-tgt"):
        merged, cells = pruned.replace("merge-del", "merge"), []
        for n in N_TRAIN:
            a, b = sized(pruned, n), sized(merged, n)
            result, seeds = test(a, b), n_seeds(len({r["seed"] for r in runs[a]} & {r["seed"] for r in runs[b]}))
            cells.append("not run" if result is None else difference(result, seeds))
        lines.append(f"| {rows(setting)[pruned]['label']} − {rows(setting)[merged]['label']} | {' | '.join(cells)} |")
    return lines


def figure6(setting: str, task, runs: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for rid in FIG6_ROWS:
        pts = size_scores(task, runs, rid)
        if pts:
            ax.errorbar([n for n, _ in pts], [statistics.mean(s) for _, s in pts],
                        [statistics.stdev(s) if len(s) > 1 else 0 for _, s in pts], marker="o", capsize=3,
                        label=rows(setting)[rid]["label"])
    ax.set(xscale="log", xlabel="target training examples", ylabel=f"test {task.metric}",
           title=f"Figure 6 ({setting}, {task.name}): training set size", xticks=N_TRAIN, xticklabels=N_TRAIN)
    if not ax.lines:
        plt.close(fig)
        return False
    ax.legend(fontsize=7)
    savefig(fig, path)
    return True


def report(args) -> int:
    root, out = Path(args.root), Path(args.out)
    md, all_runs, modules = ["# Results", ""], [], sorted(root.glob("modules/*-run.json"))
    md += ["Every number and figure here is generated by `experiments.py report` from the cached runs under "
           f"`{root}`; nothing is typed by hand. Scores are x100 on the test split (`--max-test` limits it; see "
           "the commands). † marks p < 0.05 in an approximate randomization test against LoRA (TGT), "
           f"{args.shuffles} shuffles, on the seeds' predictions pooled into one sample of (seed, example) pairs "
           "(for BLEU: corpus BLEU of the pooled sample). Del% is the grid-searched ratio chosen on validation "
           "per seed; reset % the share of the adapters' entries at their reset value at the chosen candidate (zero, or "
           "for Init rows their merge-start value); length / ref the mean "
           "prediction length over the mean reference length, in characters.", ""]
    notes = out / "discussion.md"  # the one hand-written part: prose about the tables, kept apart
    md += [notes.read_text().strip(), ""] if notes.is_file() else []
    for setting, spec in SETTINGS.items():
        task, runs = data.get_task(spec["task"]), {rid: cached(root, setting, rid) for rid in rows(setting)}
        all_runs += [r for rs in runs.values() for r in rs]
        related = ", ".join(f"{a} = `{t}`" for a, t in spec["related"].items())
        md += [f"## {setting}: target `{task.name}` ({task.metric}), related {related}", "", "### Table 2", ""]
        refs, data_dir = None, args.data_dir or next((r["args"]["data_dir"] for rs in runs.values() for r in rs), None)
        try:
            if any(runs.values()):  # the references every test needs
                refs = {str(ex["id"]): ex["references"] for ex in data.load_split(task.name, "test", data_dir)}
        except FileNotFoundError as e:
            md += [f"(no significance marks: {e})", ""]
        test = tester(task, runs, refs, args.shuffles)
        md += table2(setting, task, runs, refs, test)
        md += ["", "### Merge+Del against Merge", "", f"Does pruning help? {task.metric} of each Merge+Del row minus the "
               "Merge row with the same modules and training-set size, pooled over the seeds both have; p and † by "
               "the same test as above, here against Merge.", "", *pruning_table(setting, runs, test)]
        md += ["", "### Table 4 (ablation of Merge+Del, +TGT)", ""]
        md += ([f"Each configuration's {task.metric} minus that of Merge without pruning, and minus that of the paper's "
                 "configuration (Input / Parameter / Zero), pooled over the seeds both rows have; p and † by the same "
                 "test as above.", "", *table4(setting, task, runs, test)]
               if any(runs[r] for r in runs if r.startswith("abl-")) else ["not run"])
        md += ["", "### Figures", ""]
        run5 = figure5_run(runs)
        values5 = run5 and module_importances(run5, data_dir)  # read (or measured) once: plot and table
        for name, made in [(f"fig4_{setting}.png", figure4(setting, task, runs, out / f"fig4_{setting}.png")),
                           (f"fig5_{setting}.png", run5 and figure5(setting, run5, values5, out / f"fig5_{setting}.png")),
                           (f"fig6_{setting}.png", figure6(setting, task, runs, out / f"fig6_{setting}.png"))]:
            md += [f"![{name}]({name})" + (f" (from {made})" if isinstance(made, str) else "") if made
                   else f"{name.split('_')[0]}: not run", ""]
            if name.startswith("fig4") and (grids := whole_grid(runs, task.metric)):
                md += [*whole_grid_table(task, grids, refs, args.shuffles), ""]
            if name.startswith("fig5") and made:
                md += [*figure5_table(values5), ""]
            if name.startswith("fig6") and made:
                md += [f"Figure 6's numbers ({task.metric}, mean ± std over seeds; p and † against LoRA (TGT) with as "
                       "many training examples):", "", *table6(setting, task, runs, test), ""]
    mods = [json.loads(p.read_text()) for p in modules]
    # what ran: a run joined from --per-candidate pieces (join_pieces) ran as its pieces' commands
    ran = sorted((u for r in all_runs for u in r["run"].get("pieces", [r["run"]])), key=lambda u: u.get("finished", ""))
    commands = list(dict.fromkeys(u["runner_command"] for u in ran if u.get("runner_command")))
    machines = {}  # machine (without host name) -> the runs made on it, so GPU and CPU seeds can be told apart
    for r in all_runs + [{"run": m} for m in mods]:
        if r["run"].get("machine"):
            key = json.dumps({k: v for k, v in r["run"]["machine"].items() if k != "host"}, sort_keys=True)
            machines.setdefault(key, []).append(r)
    most = max(machines, key=lambda m: len(machines[m]), default=None)
    run_name = lambda r: f"{r['run']['setting']}/{r['run']['row']} seed {r['seed']}" if "row" in r["run"] else "a module"
    wall = sum(r["run"].get("wall_time_s", 0) for r in all_runs) + sum(m["wall_time_s"] for m in mods)
    md += ["## How these were produced", "", "```", *[c for c in dict.fromkeys(m["command"] for m in mods)
                                                       if c not in commands], *commands,
           args.command_line, "```", "",
           f"Runs cached: {len(all_runs)}; total wall time {wall / 3600:.2f} h ({wall:.0f} s; related-module "
           f"training {sum(m['wall_time_s'] for m in mods):.0f} s of it).", "", "Machine(s):", "",
           *[f"- {m}: {len(rs)} run{'s' * (len(rs) != 1)}, {sum(r['run'].get('wall_time_s', 0) for r in rs) / 3600:.2f} h"
             + ("" if m == most else ": " + ", ".join(sorted(map(run_name, rs)))) for m, rs in sorted(machines.items())],
           "", "<details><summary>every lora_merge command</summary>", "",
           "```", *[portable(u["command"]) for r in all_runs for u in r["run"].get("pieces", [r["run"]])
                    if u.get("command")], "```", "</details>", ""]
    data.atomic_write(out / "README.md", lambda f: f.write("\n".join(md).encode()))
    print(f"wrote {out / 'README.md'}")
    return 0


# ----------------------------------------------------------------------------------------
# command line


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command_line = shlex.join(["python", "experiments.py", *argv])
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (setting, row, seed) units that are not cached yet")
    r.add_argument("--setting", required=True, choices=list(SETTINGS))
    r.add_argument("--rows", nargs="+", required=True, help="row ids or groups: all table2 table4 fig4 fig6")
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--max-test", type=int, default=None, help="score only the first N test examples")
    r.add_argument("--data-dir", default=None, help="passed to lora_merge (default: $LORA_MERGE_DATA, else ./data)")
    r.add_argument("--per-candidate", action="store_true", help="run each candidate of a grid row (Del%% or "
                   "module threshold) as a cached run of its own, and join them once all are cached: a grid "
                   "too long for one sitting then runs in pieces")
    r.add_argument("--ratios", nargs="+", default=RATIOS, help="Del%% grid of the Merge+Del and parameter-unit "
                   "ablation rows, as lora_merge's --ratio takes it (default: the paper's 0.1:0.6:0.1); a flag "
                   "after -- cannot do this, as it would also turn the Merge rows' ratio 0 into a grid")
    for s in (r, sub.add_parser("list", help="rows and their cached seeds"),
              rep := sub.add_parser("report", help="results/README.md and figures from the cache")):
        s.add_argument("--root", default="results/runs", help="the cache (its small files are committed: "
                                                               "results/runs/.gitignore)")
    rep.add_argument("--out", default="results")
    rep.add_argument("--data-dir", default=None, help="test references for the significance test "
                                                       "(default: the runs' own --data-dir)")
    rep.add_argument("--shuffles", type=int, default=10000, help="approximate randomization shuffles")
    args = p.parse_args(argv)
    args.command_line = command_line
    if extra and args.command != "run":
        p.error("lora_merge flags after -- go with `run` only")
    return {"run": lambda: run(args, extra), "list": lambda: list_rows(args), "report": lambda: report(args)}[args.command]()


if __name__ == "__main__":
    sys.exit(main())
