"""prune.py on a tiny real Llama with three random adapters and padded validation batches."""
import pytest
import torch

import model as M
import prune as P
from test_model import CONFIGS, make_hf_checkpoint

ADAPTERS = {"a": (8, 32), "b": (4, 16), "c": (6, 12)}  # name -> (r, alpha): different ranks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prune") / "base"
    make_hf_checkpoint(folder, **CONFIGS["gqa_llama3_rope_untied"])
    return folder


def merged(checkpoint, dtype=torch.float32):
    """The base model with three adapters, A and B random (trained-looking) and no zeros."""
    model, _ = M.load_model(checkpoint, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    for name, (r, alpha) in ADAPTERS.items():
        M.add_lora(model, name, r=r, alpha=alpha, dropout=0.3)
        with torch.no_grad():
            for p in M.adapter_params(model, name).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def val_batches(seed=0):
    """Two batches [3, 12]: one left-padded, one right-padded, rows of different lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lens, left in [([12, 7, 3], True), ([9, 12, 5], False)]:
        ids = torch.randint(0, 300, (3, 12), generator=g)
        mask = torch.zeros(3, 12, dtype=torch.long)
        for i, n in enumerate(lens):
            if left:
                mask[i, 12 - n:] = 1
            else:
                mask[i, :n] = 1
        out.append((ids, mask))
    return out


def norms_by_hand(model, batches):
    """Capture each LoRA layer's input with a plain hook, then take norms over real tokens."""
    layers, seen = M.lora_layers(model), {}
    handles = [layer.register_forward_pre_hook(lambda m, args, p=path: seen[p].append(args[0]))
               for path, layer in layers.items()]
    model.eval()
    X = {path: [] for path in layers}
    with torch.no_grad():
        for ids, mask in batches:
            seen.update({path: [] for path in layers})
            model.hidden(ids, attention_mask=mask)
            for path in layers:
                X[path].append(seen[path][0][mask.bool()].float())  # [n_real, in]
    for h in handles:
        h.remove()
    out = {}
    for path, layer in layers.items():
        x = torch.cat(X[path])  # [N, in]
        out[path] = {"x": x.norm(dim=0)} | {n: (x @ A.T).norm(dim=0) for n, A in layer.lora_A.items()}
    return out, X


def importance_by_hand(model, norms):
    out = {}
    for path, layer in M.lora_layers(model).items():
        for n in layer.lora_A:
            out[(path, n, "A")] = layer.lora_A[n].detach().abs() * norms[path]["x"]  # [r, in]
            out[(path, n, "B")] = layer.lora_B[n].detach().abs() * norms[path][n]  # [out, r]
    return out


def test_input_norms_match_hand_computation_and_ignore_padding(checkpoint):
    model = merged(checkpoint)
    model.train()
    batches = val_batches()
    norms = P.collect_input_norms(model, batches)
    assert model.training  # train mode restored, and every hook removed
    assert all(not layer._forward_pre_hooks for layer in M.lora_layers(model).values())
    expected, X = norms_by_hand(model, batches)
    assert set(norms) == set(expected) and len(norms) == 6  # q_proj, v_proj in 3 layers
    for path in expected:
        assert set(norms[path]) == {"x", "a", "b", "c"}
        for k in expected[path]:
            assert torch.allclose(norms[path][k], expected[path][k], rtol=1e-5), (path, k)
    assert norms["model.layers.0.self_attn.q_proj"]["b"].shape == (4,)
    # the hooked input really is layer 0's input: input_layernorm of the token embeddings
    ids, mask = batches[0]
    with torch.no_grad():
        x0 = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))[mask.bool()]
    assert torch.allclose(X["model.layers.0.self_attn.v_proj"][0], x0, atol=1e-6)
    # other ids at the padding positions: same norms
    g = torch.Generator().manual_seed(9)
    repadded = [(torch.where(m.bool(), i, torch.randint(0, 300, i.shape, generator=g)), m) for i, m in batches]
    again = P.collect_input_norms(model, repadded)
    for path in norms:
        for k in norms[path]:
            assert torch.allclose(again[path][k], norms[path][k], rtol=1e-6, atol=1e-6), (path, k)


def test_bf16_model_gives_float32_norms_close_to_float32_model(checkpoint):
    batches = val_batches()
    n32 = P.collect_input_norms(merged(checkpoint), batches)
    n16 = P.collect_input_norms(merged(checkpoint, torch.bfloat16), batches)
    for path in n32:
        for k in n32[path]:
            assert n16[path][k].dtype == torch.float32
            assert torch.allclose(n16[path][k], n32[path][k], rtol=0.05), (path, k)


@pytest.mark.parametrize("ratio", [0.3, 0.55])
def test_zero_prunes_exactly_the_lowest_importance_entries_of_each_matrix(checkpoint, ratio):
    model = merged(checkpoint)
    batches = val_batches()
    by_hand = importance_by_hand(model, norms_by_hand(model, batches)[0])
    before = {k: p.detach().clone() for k, p in P.matrices(model).items()}
    counts = P.prune_(model, P.input_importance(model, P.collect_input_norms(model, batches)), ratio)
    for key, p in P.matrices(model).items():
        k = round(ratio * p.numel())
        zeroed = p.detach() == 0
        assert zeroed.sum().item() == k, key
        s = by_hand[key]
        assert s[zeroed].max() <= s[~zeroed].min(), key  # the k lowest, by the test's own |W|*||X||
        assert torch.equal(p[~zeroed], before[key][~zeroed]), key  # the rest bit-for-bit unchanged
    for name in ADAPTERS:
        sizes = [p.numel() for (_, n, _), p in P.matrices(model).items() if n == name]
        assert counts[name] == {"pruned": sum(round(ratio * s) for s in sizes), "numel": sum(sizes)}
        assert P.sparsity(model)[name] == counts[name]["pruned"] / counts[name]["numel"]


def test_init_restores_merge_start_values_at_pruned_positions_only(checkpoint):
    model = merged(checkpoint)
    start = P.snapshot(model)
    with torch.no_grad():  # stand-in for some training steps: every entry has moved
        for p in P.matrices(model).values():
            p.add_(torch.randn_like(p) * 0.05)
    trained = P.snapshot(model)
    scores = P.input_importance(model, P.collect_input_norms(model, val_batches()))
    P.prune_(model, scores, 0.4, reset="init", init=start)
    for key, p in P.matrices(model).items():
        lowest = torch.zeros(p.numel(), dtype=torch.bool)
        lowest[torch.argsort(scores[key].flatten())[:round(0.4 * p.numel())]] = True
        lowest = lowest.view_as(p)
        assert torch.equal(p[lowest], start[key][lowest]), key
        assert torch.equal(p[~lowest], trained[key][~lowest]), key
    for name in ADAPTERS:  # what results.json reports as at_init: the share just reset, per adapter
        sizes = [p.numel() for (_, n, _), p in P.matrices(model).items() if n == name]
        assert P.sparsity(model, start)[name] == sum(round(0.4 * s) for s in sizes) / sum(sizes)
        assert P.sparsity(model)[name] == 0  # no entry went to zero: the zero count misses an init reset
    with pytest.raises(ValueError, match="init"):
        P.prune_(model, scores, 0.4, reset="init")


def test_ratio_zero_prunes_nothing(checkpoint):
    model = merged(checkpoint)
    before = P.snapshot(model)
    counts = P.prune_(model, P.input_importance(model, P.collect_input_norms(model, val_batches())), 0.0)
    assert all(c["pruned"] == 0 for c in counts.values())
    assert all(torch.equal(p, before[k]) for k, p in P.matrices(model).items())
    assert all(v == 0 for v in P.sparsity(model).values())


def test_adapters_are_ranked_separately(checkpoint):
    """Scaling adapter b by 1000 leaves a's pruned entries as they were; a ranking across
    adapters would then prune a alone. Norms are held fixed so only b's |W| changes."""
    model = merged(checkpoint)
    norms = P.collect_input_norms(model, val_batches())
    scores = P.input_importance(model, norms)
    saved = P.snapshot(model)
    P.prune_(model, scores, 0.3)
    zeros_before = {k: p == 0 for k, p in P.matrices(model).items() if k[1] == "a"}
    with torch.no_grad():
        for k, p in P.matrices(model).items():
            p.copy_(saved[k] * (1000 if k[1] == "b" else 1))
    scores = P.input_importance(model, norms)
    path = "model.layers.1.self_attn.q_proj"
    sa, sb = scores[(path, "a", "A")].flatten(), scores[(path, "b", "A")].flatten()
    lowest_overall = torch.argsort(torch.cat([sa, sb]))[:round(0.3 * (sa.numel() + sb.numel()))]
    assert (lowest_overall < sa.numel()).sum() > 1.4 * round(0.3 * sa.numel())  # teeth: a global rank prunes a more
    P.prune_(model, scores, 0.3)
    for k, z in zeros_before.items():
        assert torch.equal(P.matrices(model)[k] == 0, z), k


def test_grad_importance_follows_the_ema_and_uncertainty_formulas(checkpoint):
    """beta = 0.5, one matrix with W and grad set by hand; I = |W g| = 2, 6, 4 over three steps:
    I_bar = 1, 3.5, 3.75; U_bar = 0.5, 1.5, 0.875 (|I - I_bar| with the new I_bar); S = I_bar U_bar."""
    model = merged(checkpoint)
    M.set_trainable(model, "c", False)  # frozen: no gradient, no score
    gi = P.GradImportance(beta1=0.5, beta2=0.5)
    key = ("model.layers.0.self_attn.q_proj", "a", "B")
    for step, (w, g, expected) in enumerate([(2.0, 1.0, 0.5), (3.0, 2.0, 5.25), (-1.0, 4.0, 3.28125)]):
        for k, p in P.matrices(model).items():
            with torch.no_grad():
                p.fill_(w)
            p.grad = torch.full_like(p, g) if p.requires_grad else None
        scores = gi.update(model)
        assert not any(k[1] == "c" for k in scores)
        assert torch.equal(scores[key], torch.full_like(scores[key], expected)), step
        if step == 1:
            resumed = P.GradImportance()
            resumed.load_state_dict(gi.state_dict())
    assert torch.equal(resumed.update(model)[key], scores[key])  # state_dict resumes exactly
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="after backward"):
        gi.update(model)


def test_pruned_entries_are_trained_again(checkpoint):
    """A real step: backward, AdamW, grad importance, zero-prune; the next step moves the
    zeroed entries again (they keep requires_grad and stay the optimizer's Parameters)."""
    model = merged(checkpoint)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    gi = P.GradImportance()
    ids = torch.randint(0, 300, (2, 10))
    model.train()
    model.loss(ids, ids).backward()
    opt.step()
    P.prune_(model, gi.update(model), 0.5)
    opt.zero_grad()
    pruned = {k: p == 0 for k, p in P.matrices(model).items()}
    assert all(p.requires_grad for p in P.matrices(model).values())
    model.loss(ids, ids).backward()
    assert all((p.grad[pruned[k]] != 0).all() for k, p in P.matrices(model).items())  # not momentum alone
    opt.step()
    assert all((p[pruned[k]] != 0).all() for k, p in P.matrices(model).items())


def test_module_prune_resets_exactly_the_modules_below_threshold(checkpoint):
    model = merged(checkpoint)
    start = P.snapshot(model)
    norms = P.collect_input_norms(model, val_batches())
    scores = P.input_importance(model, norms)
    means = P.module_importance(scores)
    assert len(means) == 6 * 3
    for (path, n), v in means.items():
        sA, sB = scores[(path, n, "A")], scores[(path, n, "B")]
        assert v == pytest.approx(((sA.sum() + sB.sum()) / (sA.numel() + sB.numel())).item(), rel=1e-5)
    threshold = sorted(means.values())[7]  # 7 modules strictly below
    with torch.no_grad():  # move every entry so "init" is visible
        for p in P.matrices(model).values():
            p.mul_(-2)
    moved = P.snapshot(model)
    for reset in ["zero", "init"]:
        with torch.no_grad():
            for k, p in P.matrices(model).items():
                p.copy_(moved[k])
        low = P.module_prune_(model, scores, threshold, reset=reset, init=start)
        assert sorted(low) == sorted(m for m, v in means.items() if v < threshold) and len(low) == 7
        for (path, n, ab), p in P.matrices(model).items():
            if (path, n) in low:
                assert torch.equal(p, torch.zeros_like(p) if reset == "zero" else start[(path, n, ab)])
            else:
                assert torch.equal(p, moved[(path, n, ab)])
