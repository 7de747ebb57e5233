"""model.py against transformers' LlamaForCausalLM (test-only oracle): logits, loading, errors."""
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

import model as M

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
             num_attention_heads=4, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5)
CONFIGS = {
    "gqa_llama3_rope_untied": dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=10000.0),
    "gqa_tied": dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=100000.0),
}
# Tests that take `device` run on the CPU everywhere and again on a GPU where PyTorch sees one
# (CI has none; run the suite on a GPU machine to check the CUDA path).
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def make_hf_checkpoint(folder, seed=0, max_shard_size=None, **overrides):
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(HFConfig(**{**SMALL, **overrides})).eval()
    with torch.no_grad():  # random norms too, so a wrong norm weight cannot hide
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf.save_pretrained(folder, safe_serialization=True, **kw)
    return hf


def hf_greedy(hf, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int) -> list[list[int]]:
    """transformers' greedy generate on left-padded prompts, each row cut after its first stop id:
    the oracle for model.generate, on whichever device hf is."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=hf.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=hf.device)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=stop_ids, pad_token_id=pad_id)[:, width:].tolist()
    return [row[:next((j + 1 for j, t in enumerate(row) if t in stop_ids), len(row))] for row in out]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name, device):
    hf = make_hf_checkpoint(tmp_path, **CONFIGS[name]).to(device)
    ours, tok = M.load_model(tmp_path, device=device)
    assert tok is None  # the folder has no tokenizer.json
    assert ours.device.type == device and ours.inv_freq.device.type == device
    ids = torch.randint(0, SMALL["vocab_size"], (2, 100), device=device)  # long enough to reach llama3-scaled frequencies
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == (2, 100, SMALL["vocab_size"])
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["gqa_llama3_rope_untied", "mha_tied"])
def test_batched_greedy_equals_transformers_generate(tmp_path, name, device):
    """Cached decoding of left-padded prompts, token for token, with grouped-query (one query per
    kv head group) and plain multi-head attention: the paths CUDA runs with its own kernels."""
    hf = make_hf_checkpoint(tmp_path, **CONFIGS[name]).to(device)
    ours, _ = M.load_model(tmp_path, device=device)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, SMALL["vocab_size"], (n,), generator=g).tolist() for n in (9, 4, 13)]
    got = M.generate(ours, prompts, max_new_tokens=12, stop_ids=[0], pad_id=1)
    assert got == hf_greedy(hf, prompts, 12, stop_ids=[0], pad_id=1)


def test_left_padded_batch_matches_unpadded(tmp_path):
    """A left-padded row gives the same logits on its real tokens as the row alone."""
    make_hf_checkpoint(tmp_path, **CONFIGS["gqa_llama3_rope_untied"])
    ours, _ = M.load_model(tmp_path)
    short = torch.randint(0, 300, (1, 7))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1)
    mask = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        alone = ours(short)
        batch = ours(padded, attention_mask=mask)
    assert torch.isfinite(batch).all()
    assert (batch[:, 5:] - alone).abs().max().item() < 1e-4


def test_loss_matches_transformers_masked_loss(tmp_path):
    hf = make_hf_checkpoint(tmp_path, **CONFIGS["mha_tied"])
    ours, _ = M.load_model(tmp_path)
    ids = torch.randint(0, 300, (2, 40))
    labels = ids.clone()
    labels[:, :25] = -100  # prompt masked out of the loss
    with torch.no_grad():
        assert abs(ours.loss(ids, labels).item() - hf(ids, labels=labels).loss.item()) < 1e-5


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf_checkpoint(tmp_path, max_shard_size="100KB", **CONFIGS["gqa_llama3_rope_untied"])
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ours, _ = M.load_model(tmp_path)
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4


def test_bfloat16_load(tmp_path):
    make_hf_checkpoint(tmp_path, **CONFIGS["mha_tied"])
    ours, _ = M.load_model(tmp_path, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert ours(torch.randint(0, 300, (1, 8))).dtype == torch.bfloat16


def test_missing_and_malformed_files_give_clear_errors(tmp_path):
    make_hf_checkpoint(tmp_path / "ok", **CONFIGS["mha_tied"])
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "ok", bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        M.load_model(bad)
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    del cfg["hidden_size"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: missing field\(s\) \['hidden_size'\]"):
        M.load_model(bad)
    (bad / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        M.load_model(bad)
    shutil.copy(tmp_path / "ok" / "config.json", bad / "config.json")
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        M.load_model(bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read safetensors"):
        M.load_model(bad)
    cfg["hidden_size"], cfg["intermediate_size"] = 64, 96  # weights no longer fit the config
    (bad / "config.json").write_text(json.dumps(cfg))
    shutil.copy(tmp_path / "ok" / "model.safetensors", bad / "model.safetensors")
    with pytest.raises(ValueError, match="weights do not match config.json"):
        M.load_model(bad)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        M.load_model(tmp_path / "does-not-exist")


def test_hub_id_offline_fails_fast_with_advice(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touch the network in tests
    t = time.time()
    with pytest.raises(RuntimeError, match="pass the local folder"):
        M.load_model("meta-llama/Meta-Llama-3-8B-Instruct-not-cached")
    assert time.time() - t < 10
