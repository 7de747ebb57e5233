"""The multi-adapter LoRA linear: its formula, gradients, save/load, and PEFT interop."""
import json

import pytest
import torch

import model as M
from test_model import CONFIGS, make_hf_checkpoint


@pytest.fixture
def tiny(tmp_path):
    make_hf_checkpoint(tmp_path / "base", **CONFIGS["gqa_llama3_rope_untied"])
    ours, _ = M.load_model(tmp_path / "base")
    return ours, tmp_path


def randomize(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in M.adapter_params(model, name).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_output_is_base_plus_sum_of_scaled_adapters():
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 24, bias=False)
    layer = M.LoRALinear(base)
    specs = {"a": (8, 32), "b": (4, 8), "c": (2, 16)}  # different ranks and alphas
    for n, (r, alpha) in specs.items():
        layer.add_adapter(n, r=r, alpha=alpha, dropout=0.1)
        with torch.no_grad():
            layer.lora_B[n].normal_()
    layer.eval()  # no dropout: the formula is exact
    x = torch.randn(3, 5, 32)
    expected = x @ base.weight.T
    for n, (r, alpha) in specs.items():
        expected = expected + (alpha / r) * x @ layer.lora_A[n].T @ layer.lora_B[n].T
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_new_adapter_is_kaiming_A_zero_B_and_changes_nothing(tiny):
    model, _ = tiny
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        before = model(ids)
    M.add_lora(model, "t")
    layer = M.lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A["t"].shape == (8, 64) and layer.lora_B["t"].shape == (64, 8)
    assert layer.lora_A["t"].abs().max() > 0 and layer.lora_B["t"].abs().max() == 0
    assert layer.scaling["t"] == 32 / 8
    assert sorted({p.rsplit(".", 1)[1] for p in M.lora_layers(model)}) == ["q_proj", "v_proj"]
    with torch.no_grad():
        assert torch.equal(model(ids), before)


def test_gradients_reach_only_adapter_parameters(tiny):
    model, _ = tiny
    M.add_lora(model, "a")
    M.add_lora(model, "b")
    M.set_trainable(model, "b", False)
    randomize(model, "a", 0)
    randomize(model, "b", 1)
    model.train()
    ids = torch.randint(0, 300, (2, 10))
    model.loss(ids, ids).backward()
    for n, p in model.named_parameters():
        if ".lora_A.a" in n or ".lora_B.a" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n  # base weights and the frozen adapter get nothing


def test_save_load_round_trip_is_exact(tiny):
    model, tmp = tiny
    M.add_lora(model, "x", r=4, alpha=16, dropout=0.0)
    randomize(model, "x", 3)
    M.save_adapter(model, "x", tmp / "adapters" / "x", base_model="tiny")
    cfg = json.loads((tmp / "adapters" / "x" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16
    fresh, _ = M.load_model(tmp / "base")
    assert M.load_adapter(fresh, tmp / "adapters" / "x") == "x"
    for k, p in M.adapter_params(model, "x").items():
        assert torch.equal(p, M.adapter_params(fresh, "x")[k]), k
    ids = torch.randint(0, 300, (1, 9))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), fresh(ids))
    # saving again replaces the folder, leaving no temp folders behind
    M.save_adapter(model, "x", tmp / "adapters" / "x")
    assert sorted(p.name for p in (tmp / "adapters").iterdir()) == ["x"]


def test_peft_written_adapter_loads_with_same_outputs(tiny):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    model, tmp = tiny
    hf = LlamaForCausalLM.from_pretrained(tmp / "base").eval()
    cfg = peft.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                          task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp / "peft_adapter")
    M.load_adapter(model, tmp / "peft_adapter", name="p")
    ids = torch.randint(0, 300, (2, 11))
    pm.eval()
    model.eval()
    with torch.no_grad():
        assert (model(ids) - pm(input_ids=ids).logits).abs().max().item() < 1e-4


def test_adapters_written_here_load_in_peft(tiny):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    model, tmp = tiny
    M.add_lora(model, "ours")
    randomize(model, "ours", 5)
    M.save_adapter(model, "ours", tmp / "ours")
    hf = LlamaForCausalLM.from_pretrained(tmp / "base").eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp / "ours").eval()
    ids = torch.randint(0, 300, (2, 11))
    model.eval()
    with torch.no_grad():
        assert (model(ids) - pm(input_ids=ids).logits).abs().max().item() < 1e-4


def test_three_adapters_equal_peft_with_three_active(tiny):
    """N adapters at once: our one concatenated product equals peft summing three active adapters."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    model, tmp = tiny
    # not "a": peft warns of missing keys for an adapter name inside its "lora_" key prefix
    names = ["t1", "t2", "t3"]
    for i, n in enumerate(names):
        M.add_lora(model, n, r=4 + 2 * i, alpha=16)
        randomize(model, n, i)
        M.save_adapter(model, n, tmp / n)
    hf = LlamaForCausalLM.from_pretrained(tmp / "base").eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp / names[0], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(tmp / n, adapter_name=n)
    pm.base_model.set_adapter(names)
    pm.eval()
    model.eval()
    ids = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        assert (model(ids) - pm(input_ids=ids).logits).abs().max().item() < 1e-4


def test_remove_and_bad_adapter_errors(tiny):
    model, tmp = tiny
    M.add_lora(model, "a")
    M.add_lora(model, "b")
    M.remove_adapter(model, "a")
    assert M.adapter_names(model) == ["b"]
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        M.load_adapter(model, tmp / "nothing-here")
    # an adapter for a wider base model: clear error, and the model is left as it was
    make_hf_checkpoint(tmp / "other", **dict(CONFIGS["mha_tied"], hidden_size=96, head_dim=24))
    other, _ = M.load_model(tmp / "other")
    M.add_lora(other, "w")
    M.save_adapter(other, "w", tmp / "w")
    with pytest.raises(ValueError, match="another base model"):
        M.load_adapter(model, tmp / "w")
    assert M.adapter_names(model) == ["b"]
