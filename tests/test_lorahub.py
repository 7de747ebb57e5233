"""LoRAHub baseline: the A/B-separate combination, the L1 objective, and the NGOpt search."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import data
import lorahub
import model as M
from test_model import CONFIGS, DEVICES, make_hf_checkpoint

NAMES = ["xs", "wl", "tgt"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lorahub") / "base"
    make_hf_checkpoint(folder, **CONFIGS["gqa_llama3_rope_untied"])
    return folder


def with_modules(base, names=NAMES, ranks=None):
    """A fresh tiny model holding frozen random modules (r 4, alpha 16 unless told)."""
    model, _ = M.load_model(base)
    for n in names:
        M.add_lora(model, n, r=(ranks or {}).get(n, 4), alpha=16)
        g = torch.Generator().manual_seed(10 + NAMES.index(n))  # a module is the same on any model
        with torch.no_grad():
            for p in M.adapter_params(model, n).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        M.set_trainable(model, n, False)
    return model


def token_batches(n_batches=2, size=3, seed=0):
    """Batches of random ids whose first half is a masked prompt, as data.encode gives."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, 300, (size, 16), generator=g)
        labels = ids.clone()
        labels[:, :8] = -100
        out.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    return out


def tgt_batches(base):
    """token_batches whose targets are the greedy continuations of the base model + module tgt:
    a task on which some w != 0 beats w = 0."""
    teacher = with_modules(base, ["tgt"])
    out = token_batches()
    ids = torch.cat([b["input_ids"] for b in out])
    gen = torch.tensor(M.generate(teacher, ids[:, :8].tolist(), max_new_tokens=8, stop_ids=[-1]))
    for b, g in zip(out, gen.split(len(out[0]["input_ids"]))):
        b["input_ids"][:, 8:] = b["labels"][:, 8:] = g
    return out


def mean_token_loss(model, batches):
    """Mean cross-entropy over all unmasked target tokens, written out by hand."""
    total = count = 0
    with torch.no_grad():
        for b in batches:
            logits = model(b["input_ids"])[:, :-1]
            targets = b["labels"][:, 1:]
            total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += (targets != -100).sum().item()
    return total / count


def test_weights_combine_A_and_B_separately(base):
    model = with_modules(base)
    path = "model.layers.1.self_attn.v_proj"
    layer = M.lora_layers(model)[path]
    As = [layer.lora_A[n].detach().clone() for n in NAMES]
    Bs = [layer.lora_B[n].detach().clone() for n in NAMES]
    w = [0.7, -1.2, 0.4]
    A, B = lorahub.merge_weights(As, Bs, w)
    assert torch.allclose(A, sum(wi * Ai for wi, Ai in zip(w, As)), atol=1e-6)
    assert torch.allclose(B, sum(wi * Bi for wi, Bi in zip(w, Bs)), atol=1e-6)

    tensors = lorahub.take_modules(model, NAMES)
    lorahub.set_merged(model, tensors, w)
    assert M.adapter_names(model) == ["lorahub"]
    layer = M.lora_layers(model)[path]
    assert layer.scaling["lorahub"] == 16 / 4
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        y = layer(x)
    W0x = F.linear(x, layer.weight)
    merged = W0x + (16 / 4) * x @ A.T @ B.T  # (alpha/r) (sum w B)(sum w A) x
    separate = W0x + (16 / 4) * sum(wi * x @ Ai.T @ Bi.T for wi, Ai, Bi in zip(w, As, Bs))
    assert torch.allclose(y, merged, atol=1e-5)
    assert (y - separate).abs().max() > 1e-2  # the cross terms w_i w_j B_i A_j are really there


def test_objective_is_loss_plus_official_l1(base):
    model = with_modules(base)
    batches = token_batches()
    tensors = lorahub.take_modules(model, NAMES)
    for w in ([0.5, -1.0, 0.25], [-1.5, 1.5, 0.0]):
        value = lorahub.objective(model, batches, tensors, w)
        loss = mean_token_loss(model, batches)  # the model now holds the combination w
        assert value - loss == pytest.approx(0.05 * sum(abs(x) for x in w) / len(w), abs=1e-5)


def test_search_runs_budget_from_zero_and_leaves_the_merged_adapter(base):
    batches = tgt_batches(base)
    model = with_modules(base)
    layer = M.lora_layers(model)["model.layers.0.self_attn.q_proj"]
    As = [layer.lora_A[n].detach().clone() for n in NAMES]
    Bs = [layer.lora_B[n].detach().clone() for n in NAMES]
    at_zero = mean_token_loss(M.load_model(base)[0], batches)  # w = 0: the base model, no penalty

    out = lorahub.search(model, batches, NAMES, budget=10, seed=3)
    w = [out["lorahub_weights"][n] for n in NAMES]
    assert list(out["lorahub_weights"]) == NAMES
    assert all(-1.5 <= x <= 1.5 for x in w)
    assert len(out["lorahub_history"]) == 10
    # NGOpt (COBYLA here) asks for the initial point first, as in the official code's runs
    assert out["lorahub_history"][0] == pytest.approx(at_zero, abs=1e-5)
    assert out["lorahub_objective"] == min(out["lorahub_history"]) <= out["lorahub_history"][0]
    assert out["lorahub_objective"] < out["lorahub_history"][0]  # it found something better than 0

    assert M.adapter_names(model) == ["lorahub"]
    A, B = lorahub.merge_weights(As, Bs, w)
    assert torch.equal(layer.lora_A["lorahub"], A) and torch.equal(layer.lora_B["lorahub"], B)
    assert not layer.lora_A["lorahub"].requires_grad
    # the reported best score is that of the weights left on the model
    left = mean_token_loss(model, batches) + lorahub.l1_regularization(w)
    assert left == pytest.approx(out["lorahub_objective"], abs=1e-5)

    again = lorahub.search(with_modules(base), batches, NAMES, budget=10, seed=3)
    assert again == out  # same seed, same weights and history


def test_modules_of_different_rank_or_alpha_are_refused(base):
    model = with_modules(base, ranks={"wl": 8})
    with pytest.raises(ValueError, match=r"same rank and alpha.*wl: \(8, 16\)"):
        lorahub.search(model, token_batches(), NAMES, budget=3, seed=0)


class CharTokenizer:
    """Just what data.encode needs, with ids inside the tiny model's 300-token vocabulary."""
    pad_id, end_of_turn_id = 0, 1

    def chat_prompt(self, text):
        return f"<u>{text}<a>"

    def encode(self, text):
        return [2 + ord(c) % 290 for c in text]


@pytest.mark.parametrize("device", DEVICES)
def test_fit_loads_folders_tokenizes_and_merges(base, tmp_path, device):
    folders = {}
    src = with_modules(base, NAMES[:2])
    for n in NAMES[:2]:
        M.save_adapter(src, n, tmp_path / n)
        folders[n] = tmp_path / n
    train_ex = [{"document": f"document number {i} " * 3, "summary": f"summary {i}"} for i in range(5)]
    args = SimpleNamespace(lorahub_budget=6, micro_batch=2, batch_size=4, max_source_tokens=None)
    model, _ = M.load_model(base, device=device)
    M.add_lora(model, "leftover")  # fit starts from exactly the given modules
    out = lorahub.fit(model, CharTokenizer(), data.get_task("scitldr"), folders, train_ex, seed=0, args=args)
    assert set(out) == {"lorahub_weights", "lorahub_objective", "lorahub_history"}
    assert len(out["lorahub_history"]) == 6 and M.adapter_names(model) == ["lorahub"]
    path = "model.layers.2.self_attn.v_proj"
    layer, ref = M.lora_layers(model)[path], M.lora_layers(src)[path]
    A, B = lorahub.merge_weights([ref.lora_A[n] for n in NAMES[:2]], [ref.lora_B[n] for n in NAMES[:2]],
                                 list(out["lorahub_weights"].values()))
    assert layer.lora_A["lorahub"].device.type == device
    assert torch.allclose(layer.lora_A["lorahub"].cpu(), A) and torch.allclose(layer.lora_B["lorahub"].cpu(), B)
    assert not model.training
    ids = M.generate(model, [[5, 6, 7]], max_new_tokens=3, stop_ids=[1])  # ready for decoding
    assert len(ids[0]) <= 3
    json.dumps(out)  # merged into result.json


@pytest.mark.parametrize("cut", [None, 5])
def test_fit_cuts_documents_to_max_source_tokens(base, tmp_path, monkeypatch, cut):
    """--max-source-tokens reaches LoRAHub's training examples as it reaches every other path."""
    src = with_modules(base, NAMES[:1])
    M.save_adapter(src, NAMES[0], tmp_path / NAMES[0])
    seen = []
    monkeypatch.setattr(lorahub, "search", lambda model, batches, names, budget, seed: seen.extend(batches) or
                        {"lorahub_weights": {NAMES[0]: 0.0}, "lorahub_objective": 0.0, "lorahub_history": [0.0]})
    task, tok = data.get_task("scitldr"), CharTokenizer()
    train_ex = [{"document": "a long document " * 10, "summary": "s"}]
    args = SimpleNamespace(lorahub_budget=1, micro_batch=1, batch_size=1, max_source_tokens=cut)
    model, _ = M.load_model(base)
    lorahub.fit(model, tok, task, {NAMES[0]: tmp_path / NAMES[0]}, train_ex, seed=0, args=args)
    want = data.encode(tok, task, train_ex[0]["document"], "s", cut)["input_ids"]
    assert seen[0]["input_ids"][0].tolist() == want
    assert (len(want) < len(data.encode(tok, task, train_ex[0]["document"], "s")["input_ids"])) == (cut is not None)
