"""Our model on the embedded SmolLM2-135M-Instruct against transformers (test-only oracle):
logits on a real prompt, chat formatting, and batched greedy generations token for token."""
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
import model as M
from embedded import embedded_model_dir
from test_model import DEVICES, hf_greedy

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module", params=DEVICES)
def both(request):
    """Both models in float32 on one device (matmuls in full float32 there: no TF32)."""
    folder, device = embedded_model_dir(), request.param
    ours, tok = M.load_model(folder, device=device)
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    return ours, tok, hf, hf_tok


def abstracts(n):
    lines = (DATA / "scitldr" / "test.jsonl").read_text().splitlines()[:n]
    return [json.loads(line)["document"] for line in lines]


def test_chat_prompt_matches_transformers_apply_chat_template(both):
    _, tok, _, hf_tok = both
    text = "Write a TLDR of this abstract.\n" + abstracts(1)[0]
    msgs = [{"role": "user", "content": text}]
    expected = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.chat_prompt(text) == expected
    assert tok.encode(expected) == hf_tok(expected, add_special_tokens=False)["input_ids"]
    assert tok.end_of_turn_id == hf_tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.end_of_turn_id in tok.eos_ids


def test_logits_match_transformers_on_real_prompt(both):
    ours, tok, hf, _ = both
    ids = torch.tensor([tok.encode(tok.chat_prompt("Summarize: " + abstracts(1)[0]))], device=ours.device)
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-4


def test_batched_greedy_equals_transformers_generate(both):
    ours, tok, hf, hf_tok = both
    docs = abstracts(3)
    prompts = [tok.encode(tok.chat_prompt(f"Write a one-sentence TLDR.\n{d[:60 * (i + 1)]}")) for i, d in enumerate(docs)]
    assert len({len(p) for p in prompts}) == 3  # different lengths: left padding is exercised
    got = M.generate(ours, prompts, max_new_tokens=24, stop_ids=tok.eos_ids, pad_id=tok.pad_id)
    assert got == hf_greedy(hf, prompts, 24, stop_ids=tok.eos_ids, pad_id=tok.pad_id)
    assert all(len(g) >= 1 for g in got)
    assert tok.decode(got[0]).strip()  # real text, not empty or only newlines


def test_each_sequence_stops_at_its_own_eos(both):
    ours, tok, _, _ = both
    prompts = [tok.encode(tok.chat_prompt("Say OK.")), tok.encode(tok.chat_prompt("Count from 1 to 50."))]
    out = M.generate(ours, prompts, max_new_tokens=40, stop_ids=tok.eos_ids, pad_id=tok.pad_id)
    assert out[0][-1] in tok.eos_ids and len(out[0]) < 40  # short answer stops early
    assert len(out[1]) == 40 or out[1][-1] in tok.eos_ids
    assert all(t not in tok.eos_ids for t in out[0][:-1])
    with pytest.raises(ValueError, match="max_new_tokens"):
        M.generate(ours, prompts, max_new_tokens=0, stop_ids=tok.eos_ids)
