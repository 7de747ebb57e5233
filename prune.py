"""Importance and pruning of LoRA parameters: the eval/prune steps of Algorithm 1 (Section 3.2).

After every optimizer step of the merge, the importance of each LoRA weight is measured on the
validation set and the lowest s% of each matrix are reset (zeroed, or restored to their values
at the start of the merge); they keep requires_grad, so the next step trains them again.

    norms = collect_input_norms(model, val_batches)       # rerun after EVERY optimizer step
    prune_(model, input_importance(model, norms), ratio=0.3)

Importance (Section 3.2, after Wanda): I(W_ij) = |W_ij| * ||X_j||_2, X_j the j-th input feature
of the matrix over the validation tokens. Appendix C's ablation, |W * grad| smoothed as in
AdaLoRA, is GradImportance. Table 4's module-level unit is module_prune_.

Choices where the paper is silent:
- A_i's input is the wrapped linear's input x; B_i's input is A_i x *before* the alpha/r scaling
  (the forward folds alpha/r into B). A constant per adapter does not change rankings inside a
  matrix; it only shifts module-level means (thresholds, Figure 5).
- Norms use every non-padding validation token (prompt and answer), without dropout, in float32.
  ||X_j||_2 grows with sqrt(number of tokens), so module thresholds depend on the set's size.
- The ranking is per matrix: A_i and B_i of one adapter at one linear are ranked separately,
  because their inputs (d_in features vs r features) differ in scale. k = round(s * numel)
  (Python's round, half to even); ties go to the lower flat index (stable argsort).
- "init" means the values at the start of the merge (snapshot()), not LoRA's random init.
- The optimizer's state (AdamW moments) of pruned entries is left as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model import lora_layers


def matrices(model) -> dict[tuple[str, str, str], torch.nn.Parameter]:
    """(module path, adapter, "A" | "B") -> the LoRA parameter: the key of every score below."""
    out = {}
    for path, layer in lora_layers(model).items():
        for name in layer.lora_A:
            out[(path, name, "A")], out[(path, name, "B")] = layer.lora_A[name], layer.lora_B[name]
    return out


def snapshot(model) -> dict:
    """Copies of all adapter matrices, taken at the start of the merge for reset="init"."""
    return {key: p.detach().clone() for key, p in matrices(model).items()}


def collect_input_norms(model, batches) -> dict[str, dict[str, torch.Tensor]]:
    """path -> {"x": ||X_j||_2 [in] (A's input), adapter: ||(A x)_j||_2 [r] (B's input)}.

    batches: (input_ids [B, T], attention_mask [B, T], 1 = real token). Uses the current
    weights: an update of earlier layers' adapters changes later layers' inputs, and an update
    of A_i changes B_i's input, so Algorithm 1 reruns this after every optimizer step.
    Runs model.hidden (no vocab projection), so an adapter on lm_head would see no tokens.
    """
    layers = lora_layers(model)
    if any("x" in layer.lora_A for layer in layers.values()):
        raise ValueError('an adapter named "x" clashes with the key of the layer input norms')
    device = next(model.parameters()).device
    sq = {path: {"x": torch.zeros(layer.in_features, device=device)}  # sums of squares, float32
          | {n: torch.zeros(A.shape[0], device=device) for n, A in layer.lora_A.items()}
          for path, layer in layers.items()}
    current = {}  # the running batch's padding mask: hooks only see the layer input

    def hook_for(path):
        def hook(layer, args):
            x = args[0][current["keep"]].float()  # [N, in], real tokens only (pads may hold anything)
            sq[path]["x"] += x.pow(2).sum(0)  # [in]
            for n, A in layer.lora_A.items():
                sq[path][n] += F.linear(x, A.float()).pow(2).sum(0)  # [N, r] -> [r]
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(path)) for path, layer in layers.items()]
    was_training = model.training
    model.eval()  # no dropout: the norms describe the model as it runs on the validation set
    try:
        with torch.no_grad():
            for ids, mask in batches:
                current["keep"] = mask.to(device).bool()  # [B, T]
                model.hidden(ids.to(device), attention_mask=mask.to(device))  # logits not needed
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {path: {k: v.sqrt() for k, v in d.items()} for path, d in sq.items()}


def input_importance(model, norms) -> dict[tuple[str, str, str], torch.Tensor]:
    """The paper's I(W_ij) = |W_ij| * ||X_j||_2 for every A_i [r, in] and B_i [out, r]."""
    scores = {}
    for (path, name, m), p in matrices(model).items():
        feature_norms = norms[path]["x" if m == "A" else name]  # [in] for A, [r] for B
        scores[(path, name, m)] = p.detach().float().abs() * feature_norms[None, :]  # same shape as p
    return scores


class GradImportance:
    """Appendix C: I = |W * grad| smoothed as in AdaLoRA (Zhang et al., 2022, 2023):

        I_bar(t) = b1 I_bar(t-1) + (1 - b1) I(t)
        U_bar(t) = b2 U_bar(t-1) + (1 - b2) |I(t) - I_bar(t)|    (the NEW I_bar, as written)
        S(t)     = I_bar(t) * U_bar(t)

    I_bar and U_bar start at zero, without bias correction, as in peft's AdaLoRA
    RankAllocator.update_ipt (PLATON's original code instead smooths the previous step's I).
    Call update() after backward and the optimizer step, before zero_grad: like AdaLoRA, W is
    then the updated weight and grad the gradient that produced it.
    """

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85):
        self.beta1, self.beta2 = beta1, beta2
        self.I_bar, self.U_bar = {}, {}

    @torch.no_grad()
    def update(self, model) -> dict[tuple[str, str, str], torch.Tensor]:
        scores = {}
        for key, p in matrices(model).items():
            if not p.requires_grad:
                continue  # a frozen adapter has no gradient and is not pruned
            if p.grad is None:
                raise RuntimeError(f"{key} has no .grad: call update() after backward, before zero_grad")
            I = (p.float() * p.grad.float()).abs()  # [same shape as p]
            I_bar = self.beta1 * self.I_bar.get(key, torch.zeros_like(I)) + (1 - self.beta1) * I
            U_bar = self.beta2 * self.U_bar.get(key, torch.zeros_like(I)) + (1 - self.beta2) * (I - I_bar).abs()
            self.I_bar[key], self.U_bar[key] = I_bar, U_bar
            scores[key] = I_bar * U_bar
        return scores

    def state_dict(self) -> dict:
        return {"beta1": self.beta1, "beta2": self.beta2, "I_bar": dict(self.I_bar), "U_bar": dict(self.U_bar)}

    def load_state_dict(self, state: dict):
        self.beta1, self.beta2 = state["beta1"], state["beta2"]
        self.I_bar, self.U_bar = dict(state["I_bar"]), dict(state["U_bar"])


def check_reset(reset: str, init):
    if reset not in ("zero", "init"):
        raise ValueError(f'reset must be "zero" or "init", not {reset!r}')
    if reset == "init" and init is None:
        raise ValueError('reset="init" needs init=snapshot(model) taken at the start of the merge')


def reset_(p, mask, start=None):
    """p[mask] back to 0 (start None) or to the snapshot `start`, in place; the rest untouched."""
    if start is None:
        p.masked_fill_(mask, 0)
    else:
        p.copy_(torch.where(mask, start.to(p), p))


@torch.no_grad()
def prune_(model, scores, ratio: float, reset: str = "zero", init=None) -> dict[str, dict[str, int]]:
    """Reset the round(ratio * numel) lowest-score entries of each matrix in `scores`, one
    matrix at a time, never ranked across adapters or across A and B (Section 3.2). In place on
    the Parameters the optimizer holds. Returns adapter -> {"pruned": n, "numel": n}."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be in [0, 1], not {ratio}")
    check_reset(reset, init)
    params, counts = matrices(model), {}
    for key, s in scores.items():
        p = params[key]
        k = round(ratio * p.numel())
        lowest = torch.argsort(s.flatten(), stable=True)[:k]  # ties: lower flat index first
        mask = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
        mask[lowest] = True
        reset_(p, mask.view_as(p), None if reset == "zero" else init[key])
        c = counts.setdefault(key[1], {"pruned": 0, "numel": 0})
        c["pruned"], c["numel"] = c["pruned"] + k, c["numel"] + p.numel()
    return counts


def module_importance(scores) -> dict[tuple[str, str], float]:
    """(path, adapter) -> mean score over all entries of that module's A_i and B_i together
    (pooled, so the larger matrix weighs more). With input_importance: Figure 5's values."""
    sums, sizes = {}, {}
    for (path, name, _), s in scores.items():
        sums[(path, name)] = sums.get((path, name), 0.0) + s.double().sum().item()
        sizes[(path, name)] = sizes.get((path, name), 0) + s.numel()
    return {m: sums[m] / sizes[m] for m in sums}


@torch.no_grad()
def module_prune_(model, scores, threshold: float, reset: str = "zero", init=None) -> list[tuple[str, str]]:
    """Table 4's "Module" unit: reset both A_i and B_i of every module (one adapter at one
    linear) whose mean score is below `threshold`. Returns the (path, adapter) modules reset.
    A zeroed module gets zero gradients (A_i = B_i = 0), but AdamW's moments still move it at
    the next step: like pruned parameters, it is trained again and reset again while its mean
    score stays below the threshold (the paper: pruned parameters are "trained again")."""
    check_reset(reset, init)
    params = matrices(model)
    low = [m for m, v in module_importance(scores).items() if v < threshold]
    for path, name in low:
        for key in ((path, name, "A"), (path, name, "B")):
            p = params[key]
            reset_(p, torch.ones_like(p, dtype=torch.bool), None if reset == "zero" else init[key])
    return low


def sparsity(model, start=None) -> dict[str, float]:
    """adapter -> fraction of its A and B entries at their reset value: exactly zero (the sparsity
    reached), or with `start` (the snapshot reset="init" goes back to) exactly their merge-start
    value. Trained float32 entries move off that value at every AdamW step, so this is the share
    that pruning reset last, which the zero count cannot show for reset="init"."""
    hits, sizes = {}, {}
    for key, p in matrices(model).items():
        name = key[1]
        hits[name] = hits.get(name, 0) + (p == (0 if start is None else start[key].to(p))).sum().item()
        sizes[name] = sizes.get(name, 0) + p.numel()
    return {name: hits[name] / sizes[name] for name in hits}
