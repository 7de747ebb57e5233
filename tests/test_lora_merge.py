"""Algorithm 1 (lora_merge.py): pruning after each step, resuming, and the CLI end to end."""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lora_merge as LM
import model as M
import prune
from test_model import CONFIGS, CUDA, DEVICES, make_hf_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
# bf16 (the default users run) where the CPU has bf16 instructions; float32 where bf16 would crawl
# (AVX2 only: these two CLI runs took 345 and 322 s in bf16, most of CI's 20 minutes)
TEST_DTYPE = "bfloat16" if LM.bf16_isa(LM.cpuinfo()) else "float32"
TINY_FLAGS = ["--n-train", "4", "--n-val", "2", "--batch-size", "2", "--micro-batch", "2",
              "--max-source-tokens", "48", "--max-test", "2", "--decode-batch", "2", "--data-dir", str(DATA),
              "--dtype", TEST_DTYPE]


@pytest.fixture
def tiny(tmp_path):
    make_hf_checkpoint(tmp_path / "base", **CONFIGS["gqa_llama3_rope_untied"])
    model, _ = M.load_model(tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    for name in ["r1", "r2"]:
        M.add_lora(model, name, dropout=0.0)
        with torch.no_grad():
            for p in M.adapter_params(model, name).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def token_batches(n, seed, pad_left=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (n, 12), generator=g)
    mask = torch.ones(n, 12, dtype=torch.long)
    mask[0, :4] = 0  # one padded row
    labels = ids.clone()
    labels[:, :6] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def lowest_by_input_importance(model, val):
    """Independent |W| * ||X|| ranking: inputs captured by plain hooks, padding dropped by hand."""
    inputs = {}

    def keep_input(path):
        def hook(module, args, output):
            inputs[path] = args[0]  # returns None: the output is left as it is
        return hook

    hooks = [layer.register_forward_hook(keep_input(path)) for path, layer in M.lora_layers(model).items()]
    with torch.no_grad():
        model.hidden(val["input_ids"], val["attention_mask"])
    for h in hooks:
        h.remove()
    keep = val["attention_mask"].bool()
    masks = {}
    for path, layer in M.lora_layers(model).items():
        x = inputs[path][keep]  # [tokens, in]
        for name in layer.lora_A:
            A, B = layer.lora_A[name].detach(), layer.lora_B[name].detach()
            for which, W, feat in (("A", A, x), ("B", B, x @ A.T)):
                score = (W.abs() * feat.norm(dim=0)[None]).flatten()
                k = round(0.4 * score.numel())
                m = torch.zeros_like(score, dtype=torch.bool)
                m[score.argsort(stable=True)[:k]] = True
                masks[(path, name, which)] = m.view_as(W)
    return masks


@pytest.mark.parametrize("reset", ["zero", "init"])
def test_prune_step_changes_weights_only_where_the_rules_say(tiny, reset):
    """One Algorithm-1 step with s=0.4 equals the same step unpruned, except at exactly the
    lowest-|W|*||X|| 40% of each matrix, which hold zero (or the merge-start value)."""
    batch, val = token_batches(2, 1), token_batches(3, 2)
    plain, pruned = tiny, copy.deepcopy(tiny)
    start = prune.snapshot(pruned)
    for model, ratio in ((plain, 0.0), (pruned, 0.4)):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        cfg = LM.TrainConfig(micro_batch=1, ratio=ratio, reset=reset)
        model.train()
        LM.algorithm1_step(model, opt, batch, cfg, [val], None, start)
    expected_masks = lowest_by_input_importance(plain, val)  # importance after the update
    after_plain, after_pruned = prune.matrices(plain), prune.matrices(pruned)
    for key, W in after_plain.items():
        mask = expected_masks[key]
        assert mask.sum() == round(0.4 * W.numel())
        target = torch.zeros_like(W) if reset == "zero" else start[key]
        expected = torch.where(mask, target, W.detach())
        assert torch.equal(after_pruned[key].detach(), expected), key
        assert not torch.equal(W.detach(), start[key])  # the step itself changed the matrix


def test_micro_batches_cut_to_their_own_length_give_the_full_batch_gradient(tiny):
    """step_loss sorts a step's examples by length and drops each micro-batch's padding columns:
    the loss and gradients must equal one forward/backward over the whole padded batch."""
    g = torch.Generator().manual_seed(3)
    examples = []
    for n in (5, 12, 7, 9, 3):  # right padded, as data.collate pads for training
        ids = torch.randint(0, 300, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    batch = LM.make_batches(examples, 5, pad_id=0, seed=1)[0]
    assert batch["input_ids"].shape == (5, 12)
    grads = []
    for micro in (5, 2):
        tiny.zero_grad(set_to_none=True)
        loss = LM.step_loss(tiny, batch, micro)
        grads.append((loss, {n: p.grad.clone() for n, p in tiny.named_parameters() if p.requires_grad}))
    (loss_full, full), (loss_cut, cut) = grads
    assert abs(loss_full - loss_cut) < 1e-5
    for n in full:
        torch.testing.assert_close(cut[n], full[n], rtol=1e-4, atol=1e-6)


def test_evaluation_batches_group_similar_lengths_and_keep_every_example():
    examples = [{"input_ids": [1] * n, "labels": [1] * n} for n in (9, 2, 7, 3, 8, 1)]
    batches = LM.make_batches(examples, 2, pad_id=0)  # seed None: evaluation order
    assert [b["input_ids"].shape[1] for b in batches] == [2, 7, 9]
    assert sorted(int(n) for b in batches for n in b["attention_mask"].sum(1)) == [1, 2, 3, 7, 8, 9]


def test_killed_training_resumes_to_the_same_weights(tiny, tmp_path):
    train_set = [{k: v[i].tolist() for k, v in token_batches(4, 5).items() if k != "attention_mask"} for i in range(4)]
    val_set = train_set[:2]
    cfg = LM.TrainConfig(lr=1e-2, batch_size=2, micro_batch=1, epochs=3, patience=10, ratio=0.3)
    other = copy.deepcopy(tiny)
    for n in M.adapter_names(other):  # dropout on: its masks must also be replayed after a resume
        for layer in M.lora_layers(other).values():
            layer.dropout_p[n] = 0.3
    straight = copy.deepcopy(other)
    log = LM.train(straight, train_set, val_set, 0, cfg, tmp_path / "a.pt")
    first = LM.train(other, train_set, val_set, 0, LM.TrainConfig(**{**cfg.__dict__, "epochs": 1}), tmp_path / "b.pt")
    assert first["epochs_run"] == 1
    resumed = LM.train(other, train_set, val_set, 0, cfg, tmp_path / "b.pt")  # picks up at epoch 2
    assert resumed["epochs_run"] == 3
    assert [h["val_loss"] for h in resumed["history"]] == [h["val_loss"] for h in log["history"]]
    for k, p in prune.matrices(straight).items():
        assert torch.equal(p, prune.matrices(other)[k]), k


@pytest.mark.parametrize("reset", ["zero", "init"])
def test_train_reports_the_share_at_the_reset_value(tiny, reset):
    """train()'s sparsity counts exact zeros; with reset="init" it also reports at_init, the share
    of entries back at their merge-start value: the pruned share, which zeros cannot show there."""
    train_set = [{k: v[i].tolist() for k, v in token_batches(4, 5).items() if k != "attention_mask"} for i in range(4)]
    cfg = LM.TrainConfig(lr=1e-2, batch_size=2, micro_batch=1, epochs=1, patience=10, ratio=0.3, reset=reset)
    log = LM.train(tiny, train_set, train_set[:2], 0, cfg)
    assert log["history"][1]["val_loss"] < log["history"][0]["val_loss"]  # the pruned epoch is the one kept
    names = set(M.adapter_names(tiny))
    shares = log["at_init"] if reset == "init" else log["sparsity"]
    assert set(shares) == names and all(abs(v - 0.3) < 0.01 for v in shares.values()), shares
    if reset == "init":
        assert all(v < 0.05 for v in log["sparsity"].values())  # few entries are zero after an init reset
    else:
        assert "at_init" not in log


@CUDA
@pytest.mark.parametrize("variant", [{}, {"importance": "grad"}, {"reset": "init"}])
def test_training_on_cuda_matches_cpu_and_its_checkpoint_resumes_on_cpu(tiny, tmp_path, variant):
    """The same float32 steps on both devices give the same loss, gradients and pruning (up to
    rounding), with either importance and either reset, and a checkpoint written on the GPU
    resumes on a CPU-only machine."""
    train_set = [{k: v[i].tolist() for k, v in token_batches(4, 5).items() if k != "attention_mask"} for i in range(4)]
    batch = LM.make_batches(train_set, 4, pad_id=0, seed=0)[0]
    cpu, gpu, start = tiny, copy.deepcopy(tiny).to("cuda"), copy.deepcopy(tiny)
    assert abs(LM.step_loss(cpu, batch, 2) - LM.step_loss(gpu, batch, 2)) < 1e-5
    for (n, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-4, atol=1e-6, msg=n)
    for m in (cpu, gpu):
        m.zero_grad(set_to_none=True)
    cfg = LM.TrainConfig(lr=1e-2, batch_size=2, micro_batch=1, epochs=1, patience=10, ratio=0.3, **variant)
    logs = [LM.train(m, train_set, train_set[:2], 0, cfg, tmp_path / f"{i}.pt") for i, m in enumerate((cpu, gpu))]
    torch.testing.assert_close([h["val_loss"] for h in logs[1]["history"]],
                               [h["val_loss"] for h in logs[0]["history"]], rtol=1e-4, atol=0)
    init, same, total = prune.snapshot(start), 0, 0
    for k, p in prune.matrices(cpu).items():
        q = prune.matrices(gpu)[k].cpu()
        reset_to = torch.zeros_like(p) if cfg.reset == "zero" else init[k]  # where a pruned entry lands
        assert (q == reset_to).sum() >= round(0.3 * q.numel()), k
        same, total = same + ((p == reset_to) == (q == reset_to)).sum().item(), total + p.numel()
    assert same / total > 0.99  # a near-tie at the cut may rank the other way on the other device
    resumed = LM.train(start, train_set, train_set[:2], 0, LM.TrainConfig(**{**cfg.__dict__, "epochs": 2}),
                       tmp_path / "1.pt")  # the GPU run's checkpoint, on the CPU
    assert resumed["epochs_run"] == 2 and resumed["history"][:2] == logs[1]["history"]


def test_checkpoint_of_other_settings_is_not_resumed(tiny, tmp_path):
    """A checkpoint resumes only into the run that wrote it: another --reset, --lr, another set of
    adapters or other examples stop with a message naming the checkpoint; more epochs continue."""
    train_set = [{k: v[i].tolist() for k, v in token_batches(4, 5).items() if k != "attention_mask"} for i in range(4)]
    cfg = LM.TrainConfig(lr=1e-2, batch_size=2, micro_batch=1, epochs=1, ratio=0.3)
    ckpt = tmp_path / "c.pt"
    LM.train(copy.deepcopy(tiny), train_set, train_set[:2], 0, cfg, ckpt)
    for change, expected in [(dict(reset="init"), "reset: 'zero' there, 'init' now"),
                             (dict(lr=1e-3), "lr: 0.01 there, 0.001 now")]:
        with pytest.raises(SystemExit, match=expected) as e:
            LM.train(copy.deepcopy(tiny), train_set, train_set[:2], 0, LM.TrainConfig(**{**cfg.__dict__, **change}), ckpt)
        assert str(ckpt) in str(e.value)
    with pytest.raises(SystemExit, match="examples: "):
        LM.train(copy.deepcopy(tiny), train_set[1:], train_set[:2], 0, cfg, ckpt)
    fewer = copy.deepcopy(tiny)
    M.remove_adapter(fewer, "r2")
    with pytest.raises(SystemExit, match="adapters: \\['r1', 'r2'\\] there, \\['r1'\\] now"):
        LM.train(fewer, train_set, train_set[:2], 0, cfg, ckpt)
    more = LM.train(copy.deepcopy(tiny), train_set, train_set[:2], 0, LM.TrainConfig(**{**cfg.__dict__, "epochs": 2}), ckpt)
    assert more["epochs_run"] == 2  # a larger budget continues the same run


def run_cli(args, tmp_path, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "lora_merge.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def related_module(tmp_path_factory):
    """A small real PEFT module for the embedded model (random B so it does something)."""
    folder = tmp_path_factory.mktemp("mods") / "rel"
    model, _ = M.load_model()
    M.add_lora(model, "rel")
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in M.adapter_params(model, "rel").items():
            if n.endswith("lora_B"):
                p.normal_(0, 1e-3)
    M.save_adapter(model, "rel", folder)
    return folder


@pytest.mark.parametrize("device", DEVICES)
def test_cli_merge_del_end_to_end(tmp_path, related_module, device):
    out = tmp_path / "run"
    flags = ["--task", "scitldr", "--related", str(related_module), "--with-target", "--ratio", "0.2,0.4",
             "--epochs", "1", "--out", str(out), "--device", device, *TINY_FLAGS]
    summary = LM.main(flags)
    assert summary["args"]["device"] == device
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"]["mean"]["rougeL"] == summary["summary"]["mean"]["rougeL"]
    run = saved["runs"][0]
    assert run["chosen"] in (0.2, 0.4) and set(run["candidates"]) == {"0.2", "0.4"}
    for cand in run["candidates"].values():
        assert "rougeL" in cand["val_scores"] and len(cand["history"]) == 2
        assert set(cand["sparsity"]) == {"rel", "TGT"}
    preds = [json.loads(line) for line in (out / "seed0" / "predictions.jsonl").read_text().splitlines()]
    test_ids = [json.loads(line)["id"] for line in (DATA / "scitldr" / "test.jsonl").read_text().splitlines()[:2]]
    assert [p["id"] for p in preds] == test_ids
    fresh, _ = M.load_model()  # on the CPU, whichever device trained them
    for name in ("rel", "TGT"):
        assert M.load_adapter(fresh, out / "seed0" / "adapters" / name) == name
    assert (out / "seed0" / "modules" / "TGT" / "train_log.json").is_file()
    # a rerun resumes every finished candidate from its checkpoint and its cached validation scores,
    # unless the cache is of other weights: 0.2's cache is marked, 0.4's has another best epoch
    hit, stale = (out / "seed0" / f"parameter-{v}" / "val.json" for v in ("0.2", "0.4"))
    for path, key_change in ((hit, 0.0), (stale, 1.0)):
        cache = json.loads(path.read_text())
        assert cache["val_scores"] == run["candidates"][path.parent.name.split("-")[1]]["val_scores"]
        cache["key"]["best_val_loss"] += key_change
        cache["val_scores"]["rougeL"] = 99.0
        path.write_text(json.dumps(cache))
    again = LM.main(flags)
    assert again["runs"][0]["candidates"]["0.2"]["val_scores"]["rougeL"] == 99.0 and again["runs"][0]["chosen"] == 0.2
    assert again["runs"][0]["candidates"]["0.4"]["val_scores"] == run["candidates"]["0.4"]["val_scores"]
    # the same --out with another subsample: its TGT module is not silently reused
    with pytest.raises(SystemExit, match="TGT module .*n_train: 4 there, 3 now"):
        LM.main([*flags, "--n-train", "3"])


def test_cli_killed_run_resumes(tmp_path, related_module):
    args = ["--task", "scitldr", "--related", str(related_module), "--ratio", "0.3", "--epochs", "3",
            "--patience", "10", "--out", "run", *TINY_FLAGS]
    ckpt = tmp_path / "run" / "seed0" / "parameter-0.3" / "ckpt.pt"
    proc = run_cli(args, tmp_path, start_new_session=True)
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), proc.communicate()[0] if proc.poll() is not None else "no checkpoint in time"
    os.killpg(proc.pid, signal.SIGKILL)  # killed mid-training, after at least one epoch
    proc.wait()
    assert not (tmp_path / "run" / "results.json").exists()
    done = run_cli(args, tmp_path)
    output = done.communicate(timeout=600)[0]
    assert done.returncode == 0, output
    assert "resumed after epoch" in output
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(result["runs"][0]["candidates"]["0.3"]["history"]) == 4  # epoch 0 + 3 epochs


@pytest.mark.parametrize("flags, message", [
    (["--ratio", "1.0"], "--ratio values must be in"),
    (["--ratio", "abc"], "is not a number"),
    (["--task", "nope"], "unknown task 'nope'"),
    (["--related", "not-a-task"], "neither an adapter folder nor a known task"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--patience", "0"], "--patience must be >= 1"),
    (["--max-test", "0"], "--max-test must be >= 1"),
    (["--method", "lorahub", "--lorahub-budget", "0"], "--lorahub-budget must be >= 1"),
    (["--ratio", "0.1:0.5:0"], "the step of start:stop:step must be > 0"),
    (["--unit", "module", "--threshold", "0.1:0.5:-0.1"], "--threshold '0.1:0.5:-0.1': the step"),
    (["--method", "lora", "--related", "dialogsum", "--ratio", "0.3"], "--ratio applies to --method merge"),
    (["--unit", "module", "--ratio", "0.3"], "--ratio applies to --method merge with --unit parameter"),
    (["--threshold", "0.01"], "--threshold applies to --method merge with --unit module"),
    (["--method", "zero-shot", "--val-scores"], "--val-scores applies to --method merge"),
    (["--lr", "0"], "need --lr > 0"),
    (["--dropout", "1"], "0 <= --dropout < 1"),
    (["--device", "gpu0"], "--device 'gpu0' is not a device name"),
    (["--device", "mps"], "--device mps: only cpu and cuda"),
    (["--device", "cuda:7"], "--device cuda:7: PyTorch sees"),  # no test machine has 8 GPUs
])
def test_bad_flags_fail_before_any_work(flags, message, capsys):
    argv = ["--task", "scitldr", *flags] if flags[0] != "--task" else flags
    with pytest.raises(SystemExit) as e:
        LM.parse_args(argv)
    assert message in str(e.value) + capsys.readouterr().err


def test_bf16_on_a_cpu_without_bf16_instructions_warns(tmp_path, monkeypatch, capsys):
    """bf16 matmuls on a CPU without bf16 instructions crawl (an AMD EPYC Zen 3: a Merge step 347 s
    against 16 s in float32), so the CLI says so and names --dtype float32, from this machine's own
    /proc/cpuinfo with its bf16 flags taken out or put in."""
    info = Path("/proc/cpuinfo").read_text()
    flags = next(line for line in info.splitlines() if line.startswith("flags"))
    bare = " ".join(f for f in flags.split() if f not in ("amx_bf16", "avx512_bf16"))
    without = info.replace(flags, bare)
    assert "--dtype float32" in LM.slow_bf16("bfloat16", "cpu", without)
    assert LM.slow_bf16("float32", "cpu", without) is None
    assert LM.slow_bf16("bfloat16", "cuda", without) is None
    assert LM.slow_bf16("bfloat16", "cpu", info.replace(flags, bare + " avx512_bf16")) is None
    assert LM.slow_bf16("bfloat16", "cpu", "") is None  # no /proc/cpuinfo: nothing known, nothing said
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp\n"
    assert LM.slow_bf16("bfloat16", "cpu", arm) and not LM.slow_bf16("bfloat16", "cpu", arm.replace("asimddp", "asimddp bf16"))
    # the CLI prints it first, before anything loads (here the data folder is missing)
    monkeypatch.setattr(LM, "cpuinfo", lambda: without)
    with pytest.raises(SystemExit, match="scitldr"):
        LM.main(["--task", "scitldr", "--device", "cpu", "--data-dir", str(tmp_path)])
    assert "--dtype float32" in capsys.readouterr().err


def test_pruning_flags_keep_their_defaults_where_they_apply():
    args, _ = LM.parse_args(["--task", "scitldr"])
    assert (args.ratio, args.threshold) == ([0.3], [0.005])
    args, _ = LM.parse_args(["--task", "scitldr", "--unit", "module", "--threshold", "0.002", "0.005"])
    assert args.threshold == [0.002, 0.005]


@pytest.mark.parametrize("method", ["merge", "module"])
def test_bad_data_fails_before_the_model_loads(tmp_path, method, monkeypatch):
    """A malformed line in any split the run reads stops it at once, naming the file and line."""
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")
    monkeypatch.setattr(M, "load_model", no_model)
    for split in ("train", "validation", "test"):
        (tmp_path / "data" / "scitldr").mkdir(parents=True, exist_ok=True)
        lines = (DATA / "scitldr" / f"{split}.jsonl").read_text().splitlines()[:5]
        (tmp_path / "data" / "scitldr" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    bad = tmp_path / "data" / "scitldr" / "test.jsonl" if method == "merge" else \
        tmp_path / "data" / "scitldr" / "validation.jsonl"
    bad.write_text(bad.read_text() + '{"document": "no summary"}\n')
    with pytest.raises(SystemExit, match=f"{bad}:6: missing field"):
        LM.main(["--task", "scitldr", "--method", method, "--data-dir", str(tmp_path / "data"),
                 "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit, match="no data for task 'scitldr'"):
        LM.main(["--task", "scitldr", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])


def test_adapter_for_another_base_model_fails_before_training(tmp_path):
    make_hf_checkpoint(tmp_path / "other", **CONFIGS["mha_tied"])
    other, _ = M.load_model(tmp_path / "other")
    M.add_lora(other, "w")
    M.save_adapter(other, "w", tmp_path / "w")
    t = time.time()
    with pytest.raises(SystemExit, match="another base model"):
        LM.main(["--task", "scitldr", "--related", str(tmp_path / "w"), "--out", str(tmp_path / "o"), *TINY_FLAGS])
    assert not (tmp_path / "o").exists()
    assert time.time() - t < 60


def test_ratio_ranges_parse():
    assert LM.parse_values(["0.1:0.6:0.1"], "--ratio", 0, 1) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert LM.parse_values(["0.3"], "--ratio", 0, 1) == [0.3]
    assert LM.parse_values(["0", "0.2,0.1"], "--ratio", 0, 1) == [0.0, 0.1, 0.2]
