"""LoRAHub (Huang et al., 2024), the paper's merging baseline, ported to a causal LM.

The related modules stay frozen; only one weight w_i per module is learned, by gradient-free
search (nevergrad's NGOpt), minimising the loss on the target training examples plus an L1
penalty. The merged module sums the A's and the B's separately,

    A = sum_i w_i A_i,   B = sum_i w_i B_i,   y = W0 x + (alpha/r) B A x,

which is not sum_i w_i B_i A_i: cross terms w_i w_j B_i A_j appear. That is what LoRAHub does
(it sums the modules' state dicts), so we do the same.

Matched to the official code (github.com/sail-sg/lorahub, lorahub/algorithm.py):
`ng.p.Array(init=0, lower=-1.5, upper=1.5)`, `NGOpt(budget=40)` (its max_inference_step in
reproduce_bbh.py), the recommendation's weights used at the end, the model in eval mode with no
gradients, and `default_l1_regularization` = 0.05 * sum|w_i| / N. With a few modules and budget
40, nevergrad 1.0.12's NGOpt picks COBYLA, which is deterministic (the seed then changes
nothing) and whose first candidate is the initial point w = 0 (no module), so the chosen w
scores no worse on the objective than no module at all.

Where this differs from the paper's and the official setup:
- the official code is for Flan-T5-large, composing 20 modules drawn from ~200 Flan tasks with
  5 examples; the paper ported it to Llama-3-8B-Instruct and merged the XS+WL modules (+TGT);
  here the base model is any Llama checkpoint and the modules are whatever `--related` names
  (by default our own related tasks, not XLSum/WikiLingua) plus TGT with --with-target;
- the loss is the mean token cross-entropy on the summaries of all 50 target training examples
  (the prompt masked, where Flan-T5 had it as encoder input), independent of batching. The
  official default_get_loss adds up per-batch mean losses and divides by the number of
  examples, which shrinks the loss by about the batch size against the L1 term (5x in its
  5-example runs); the paper does not say what its port did. We take the plain mean, so the
  0.05 penalty weighs about batch-size times less against the loss than in the official runs;
- nevergrad is seeded through the parametrization's random_state rather than numpy's global
  seed (the official code seeds `random` and `numpy.random` with 42);
- the modules must share rank and alpha: LoRAHub needs equal shapes to sum A's and B's, and
  with one merged adapter there is only one alpha/r (the official code silently takes the
  first module's config).
"""
from __future__ import annotations

import warnings

import nevergrad as ng
import numpy as np
import torch
from tqdm import tqdm

import lora_merge
import model as M

NAME = "lorahub"  # the one adapter left on the model
BOUND = 1.5  # w_i in [-BOUND, BOUND], as the official code
L1 = 0.05  # weight of the mean |w_i| penalty, as the official code


def merge_weights(As: list[torch.Tensor], Bs: list[torch.Tensor], w) -> tuple[torch.Tensor, torch.Tensor]:
    """A = sum_i w_i A_i [r, in] and B = sum_i w_i B_i [out, r], each summed on its own."""
    wt = torch.as_tensor(np.asarray(w, dtype=np.float64), dtype=As[0].dtype, device=As[0].device)
    return torch.tensordot(wt, torch.stack(As), 1), torch.tensordot(wt, torch.stack(Bs), 1)


def take_modules(model, names: list[str]) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Copy A_i, B_i of adapters `names` off every LoRA layer, then replace every adapter on the
    model by one frozen adapter NAME of the modules' common rank and alpha/r.
    Returns {layer path: ([A_1..A_N], [B_1..B_N])}."""
    tensors, scaling = {}, {}
    for path, layer in M.lora_layers(model).items():
        missing = [n for n in names if n not in layer.lora_A]
        if missing:
            raise ValueError(f"module(s) {missing} have no LoRA on {path}: LoRAHub sums the modules' "
                             "A's and B's, so they need the same target modules")
        r_alpha = {n: (layer.lora_A[n].shape[0], layer.scaling[n] * layer.lora_A[n].shape[0]) for n in names}
        if len(set(r_alpha.values())) > 1:
            raise ValueError("LoRAHub sums the modules' A's and B's into one adapter, so they need the "
                             "same rank and alpha; got (r, alpha) " +
                             ", ".join(f"{n}: ({r}, {a:g})" for n, (r, a) in r_alpha.items()))
        tensors[path] = ([layer.lora_A[n].detach().clone() for n in names],
                         [layer.lora_B[n].detach().clone() for n in names])
        scaling[path] = layer.scaling[names[0]]
    for n in M.adapter_names(model):
        M.remove_adapter(model, n)
    for path, layer in M.lora_layers(model).items():
        r = tensors[path][0][0].shape[0]
        layer.add_adapter(NAME, r=r, alpha=scaling[path] * r, dropout=0.0)
        layer.scaling[NAME] = scaling[path]  # exactly the modules' alpha/r, no round trip through alpha
    M.set_trainable(model, NAME, False)
    return tensors


@torch.no_grad()
def set_merged(model, tensors: dict, w):
    """Overwrite adapter NAME in place with the combination w of the modules."""
    layers = M.lora_layers(model)
    for path, (As, Bs) in tensors.items():
        A, B = merge_weights(As, Bs, w)
        layers[path].lora_A[NAME].copy_(A)
        layers[path].lora_B[NAME].copy_(B)


def l1_regularization(w) -> float:
    """The official default_l1_regularization: 0.05 * sum|w_i| / N."""
    return L1 * float(np.abs(np.asarray(w, dtype=np.float64)).sum()) / len(w)


def objective(model, batches: list[dict], tensors: dict, w) -> float:
    """LoRAHub's score of a candidate w: mean token cross-entropy on the examples (eval mode,
    no gradients) + the L1 term. One forward pass over the batches with one adapter."""
    set_merged(model, tensors, w)
    return lora_merge.validation_loss(model, batches) + l1_regularization(w)


def search(model, batches: list[dict], names: list[str], budget: int, seed: int) -> dict:
    """NGOpt over w in [-1.5, 1.5]^N from w = 0 for `budget` evaluations, on a model holding the
    adapters `names`. Leaves the model with only adapter NAME, set to the recommended w."""
    if not names:
        raise ValueError("LoRAHub needs at least one module")
    tensors = take_modules(model, names)
    n = len(names)
    param = ng.p.Array(init=np.zeros(n), lower=np.full(n, -BOUND), upper=np.full(n, BOUND))
    param.random_state = np.random.RandomState(seed)  # every random choice of the optimizer
    opt = ng.optimizers.NGOpt(parametrization=param, budget=budget)
    history = []
    with warnings.catch_warnings():
        # nevergrad hands scipy's COBYLA a stopping radius scipy corrects itself; harmless
        warnings.filterwarnings("ignore", message="COBYLA: Invalid RHOEND")
        for _ in tqdm(range(budget), desc="lorahub", mininterval=10):  # opt.minimize with one worker, keeping the history
            cand = opt.ask()
            history.append(objective(model, batches, tensors, cand.value))
            opt.tell(cand, history[-1])
        rec = opt.provide_recommendation()
    w = [float(x) for x in rec.value]
    # The recommendation is an evaluated point for COBYLA; an optimizer that recommends a new
    # point costs one more forward pass to report its score.
    best = rec.loss if rec.loss is not None else objective(model, batches, tensors, w)
    set_merged(model, tensors, w)
    model.eval()
    return {"lorahub_weights": dict(zip(names, w)), "lorahub_objective": float(best),
            "lorahub_history": history}


def fit(model, tok, task, modules: dict, train_ex: list[dict], seed: int, args) -> dict:
    """LoRAHub on the target training examples: load the modules, tokenize, search. The model is
    left with only the merged adapter, ready for decoding."""
    lora_merge.load_modules(model, modules, trainable=False)
    enc = lora_merge.encode_examples(tok, task, train_ex, args.max_source_tokens)
    batches = lora_merge.make_batches(enc, args.micro_batch * 2, tok.pad_id)  # no grad: 2x fits
    result = search(model, batches, list(modules), args.lorahub_budget, seed)
    w = ", ".join(f"{k} {v:+.3f}" for k, v in result["lorahub_weights"].items())
    print(f"[lorahub seed {seed}] weights {w}; objective {result['lorahub_objective']:.4f} "
          f"(w=0: {result['lorahub_history'][0]:.4f})", flush=True)
    return result
