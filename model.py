"""Llama-3 in plain PyTorch, with a multi-adapter LoRA linear, PEFT-format adapter I/O,
batched greedy decoding with a KV cache, and chat formatting from the checkpoint's template.

Parameter names are Hugging Face's (model.layers.0.self_attn.q_proj.weight, ...) so an HF
checkpoint loads with load_state_dict(strict=True) and no key mapping. Entry points:

    model, tok = load_model()                  # the embedded SmolLM2-135M-Instruct
    model, tok = load_model("path/or/hub-id", dtype=torch.bfloat16)
    logits = model(input_ids)                  # [batch, seq] -> [batch, seq, vocab]
    add_lora(model, "dialogsum"); save_adapter(model, "dialogsum", "adapters/dialogsum")
    out_ids = generate(model, [tok.encode(tok.chat_prompt("Hi"))], max_new_tokens=32, stop_ids=tok.eos_ids)
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------
# Config


@dataclass
class LlamaConfig:
    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336  # SwiGLU inner width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8  # < num_attention_heads means grouped-query attention
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # Llama-3.1/3.2: {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False  # True: the output projection reuses embed_tokens
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 128000
    eos_token_ids: list[int] = field(default_factory=lambda: [128001, 128009])  # all stop ids

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "LlamaConfig":
        """Read a LlamaForCausalLM config.json (transformers 4.x or 5.x layout)."""
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing}; is this a Llama config.json?")
        if d.get("model_type", "llama") not in ("llama", "mistral"):
            raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not a Llama model")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})  # 5.x nests theta here
        theta = d.get("rope_theta", rope.pop("rope_theta", 10000.0))
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = None
        eos = d.get("eos_token_id")
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=rope,
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", False), mlp_bias=d.get("mlp_bias", False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )


# ----------------------------------------------------------------------------------------
# Transformer blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # One fused kernel; it accumulates the mean of squares in float32 even for bf16 input,
        # where a bf16 sum would lose the small activations.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings [head_dim/2], with Llama-3.1's "llama3" scaling:
    long wavelengths are slowed down by `factor`, short ones kept, the band between blended."""
    hd = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device="cpu") / hd)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return inv_freq / s["factor"]
    if kind != "llama3":
        raise NotImplementedError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq, positions, dtype):
    """cos/sin tables [B, T, head_dim] for per-sequence positions [B, T] (left padding shifts them)."""
    freqs = positions[..., None].float() * inv_freq  # [B, T, hd/2], float32 for exact angles
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, hd], HF's rotate-half layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [B, H, T, hd]. Rotate-half RoPE: pairs are (i, i + hd/2), as in HF checkpoints."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class KVCache(nn.Module):
    """Preallocated keys/values for decoding; slots are shared by the batch (left padding aligns them)."""

    def __init__(self, batch, max_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.rows = slice(None)  # prefill writes one sequence's row at a time

    def update(self, start: int, k, v):
        """Write k, v [b, kvh, T, hd] at slots start..start+T and return everything filled so far."""
        end = start + k.shape[2]
        self.k[self.rows, :, start:end] = k
        self.v[self.rows, :, start:end] = v
        return self.k[self.rows, :, :end], self.v[self.rows, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=b)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=b)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.hd, d, bias=b)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, cache_pos):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # [B, kvh, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # [B, kvh, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(cache_pos, k, v)  # [B, kvh, S, hd], S = cached + T
        if T == 1 and self.n_kv != self.n_heads:
            # Decoding one token: the H/kvh query heads of each kv head become the query axis, so
            # this is plain attention per kv head (no causal part: one query sees every key).
            # On CPU that is several times faster than enable_gqa for a single query.
            g = q.view(B, self.n_kv, self.n_heads // self.n_kv, self.hd)  # [B, kvh, H/kvh, hd]
            # reshape, not view: CUDA's kernels may return y in another memory layout.
            y = F.scaled_dot_product_attention(g, k, v, attn_mask=mask).reshape(B, self.n_heads, 1, self.hd)
        else:
            # enable_gqa shares each kv head with H/kvh query heads: repeat_kv without the copy.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.n_kv != self.n_heads)  # [B, H, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=b)
        self.up_proj = nn.Linear(d, f, bias=b)
        self.down_proj = nn.Linear(f, d, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()  # the HF "model." prefix of every trunk parameter
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Tied checkpoints have no lm_head.weight: we then project with embed_tokens directly,
        # so strict loading sees exactly the checkpoint's keys.
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @property
    def device(self) -> torch.device:
        """Where the weights are: callers move token ids here (CPU, or a GPU with --device cuda)."""
        return self.model.embed_tokens.weight.device

    def hidden(self, input_ids, attention_mask=None, positions=None, cache_pos=0):
        """Final normed hidden states [B, T, d]. attention_mask [B, T] (1 = real token) is only
        needed where padding could be attended to: left padding, or decoding with a cache."""
        B, T = input_ids.shape
        if positions is None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) if attention_mask is not None \
                else torch.arange(cache_pos, cache_pos + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # [B, T, d]
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        mask = None if attention_mask is None else attention_bias_mask(attention_mask, cache_pos, T)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache_pos)
        return self.model.norm(x)

    def logits(self, h):
        return F.linear(h, self.model.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)

    def forward(self, input_ids, attention_mask=None, positions=None, cache_pos=0):
        """input_ids [B, T] -> logits [B, T, vocab]."""
        return self.logits(self.hidden(input_ids, attention_mask, positions, cache_pos))

    def loss(self, input_ids, labels, attention_mask=None, reduction="mean"):
        """Next-token cross-entropy on positions whose label is not -100. The vocab projection
        runs only at those positions: with the prompt masked it is most of the step's saving."""
        h = self.hidden(input_ids, attention_mask)  # [B, T, d]
        targets = labels[:, 1:]  # token t predicts token t+1
        keep = targets != -100
        logits = self.logits(h[:, :-1][keep])  # [n_targets, vocab]
        return F.cross_entropy(logits.float(), targets[keep], reduction=reduction)

    def setup_cache(self, batch: int, max_len: int):
        p = self.model.embed_tokens.weight
        for layer in self.model.layers:
            a = layer.self_attn
            a.cache = KVCache(batch, max_len, a.n_kv, a.hd, p.dtype, p.device)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.cache = None


def attention_bias_mask(attention_mask, cache_pos: int, T: int):
    """Boolean mask [B, 1, T, S] for queries at slots cache_pos..cache_pos+T over keys 0..S-1:
    causal, and padding keys hidden. A query may always see its own slot, so a padding query
    (left padding) has one visible key instead of none: an all-masked row would give NaN."""
    S = cache_pos + T
    keys = torch.arange(S, device=attention_mask.device)
    queries = torch.arange(cache_pos, S, device=attention_mask.device)
    causal = keys[None, :] <= queries[:, None]  # [T, S]
    visible = causal & attention_mask[:, None, :S].bool()  # [B, T, S]
    visible |= keys[None, None, :] == queries[None, :, None]
    return visible[:, None]  # [B, 1, T, S]


# ----------------------------------------------------------------------------------------
# LoRA with several adapters at once


class LoRALinear(nn.Module):
    """A frozen linear plus N named LoRA adapters:

        y = W0 x + sum_i (alpha_i / r_i) B_i A_i dropout(x)

    A_i [r_i, in] starts Kaiming-uniform and B_i [out, r_i] at zero, so a new adapter changes
    nothing until trained (Hu et al., 2022). The N adapters run as one low-rank product of rank
    sum(r_i) (A's stacked, scaled B's side by side), which costs what one adapter of that rank
    costs instead of N small matmuls. One dropout mask is shared by all adapters, with the
    largest dropout among them: an approximation of N independent masks that keeps that single
    product. Adapter weights stay float32 (exact AdamW updates) and are cast to the activation
    dtype for the matmuls. The base keeps its `weight` name so HF keys stay unchanged.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # [out, in], frozen
        self.bias = base.bias
        self.weight.requires_grad_(False)
        self.lora_A = nn.ParameterDict()  # name -> [r, in]
        self.lora_B = nn.ParameterDict()  # name -> [out, r]
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}

    def add_adapter(self, name: str, r: int = 8, alpha: float = 32, dropout: float = 0.05):
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists")
        A = torch.empty(r, self.in_features, device=self.weight.device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # nn.Linear's init, as LoRA and PEFT use
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=self.weight.device))
        self.scaling[name] = alpha / r
        self.dropout_p[name] = dropout

    def remove_adapter(self, name: str):
        del self.lora_A[name], self.lora_B[name], self.scaling[name], self.dropout_p[name]

    def stacked(self, dtype):
        """A_cat [R, in] and scaled B_cat [out, R], R = sum of ranks, in adapter order."""
        names = list(self.lora_A)
        A = torch.cat([self.lora_A[n] for n in names]).to(dtype)
        B = torch.cat([self.lora_B[n] * self.scaling[n] for n in names], dim=1).to(dtype)
        return A, B

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # [..., out]
        if not self.lora_A:
            return y
        A, B = self.stacked(x.dtype)
        p = max(self.dropout_p.values()) if self.training else 0.0
        return y + F.linear(F.linear(F.dropout(x, p) if p else x, A), B)  # [..., R] -> [..., out]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Module path ("model.layers.0.self_attn.q_proj") -> LoRALinear, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_names(model: nn.Module) -> list[str]:
    layers = list(lora_layers(model).values())
    return list(layers[0].lora_A) if layers else []


def add_lora(model: nn.Module, name: str, r: int = 8, alpha: float = 32, dropout: float = 0.05,
             targets=("q_proj", "v_proj")):
    """Add adapter `name` to every linear whose last path component is in `targets`, wrapping
    plain linears in LoRALinear on first use. Defaults are the paper's Table 5. Base weights
    are frozen; the new adapter is trainable."""
    for path, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, (nn.Linear, LoRALinear)):
                if isinstance(child, nn.Linear):
                    child = LoRALinear(child)
                    setattr(module, child_name, child)
                child.add_adapter(name, r, alpha, dropout)
    if not lora_layers(model):
        raise ValueError(f"no linear named {list(targets)} in the model")
    for n, p in model.named_parameters():
        if ".lora_" not in n:
            p.requires_grad_(False)


def adapter_params(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """'<module path>.lora_A' / '.lora_B' -> the parameter of adapter `name`."""
    out = {}
    for path, layer in lora_layers(model).items():
        out[f"{path}.lora_A"], out[f"{path}.lora_B"] = layer.lora_A[name], layer.lora_B[name]
    return out


def set_trainable(model: nn.Module, name: str, trainable: bool = True):
    """Freeze (False) or unfreeze (True) adapter `name`."""
    for p in adapter_params(model, name).values():
        p.requires_grad_(trainable)


def remove_adapter(model: nn.Module, name: str):
    for layer in lora_layers(model).values():
        layer.remove_adapter(name)


# PEFT layout: adapter_config.json + adapter_model.safetensors with keys
# "base_model.model.<module path>.lora_A.weight" (the adapter's name is not in the file).
PEFT_PREFIX = "base_model.model."


def save_adapter(model: nn.Module, name: str, folder: str | Path, base_model: str | None = None):
    """Write adapter `name` as a PEFT LoRA folder, atomically (a temp folder renamed into place)."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    first = next(iter(layers.values()))
    r = first.lora_A[name].shape[0]
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r,
        "lora_alpha": first.scaling[name] * r, "lora_dropout": first.dropout_p[name],
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p in layers}), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True,
        "base_model_name_or_path": base_model,
    }
    tensors = {f"{PEFT_PREFIX}{k}.weight": p.detach().float().contiguous().cpu()
               for k, p in adapter_params(model, name).items()}
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    replace_dir(tmp, folder)


def replace_dir(src: Path, dst: Path):
    """Move folder src to dst, replacing dst; dst is never half-written (rename is atomic)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old.{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old)


def load_adapter(model: nn.Module, folder: str | Path, name: str | None = None, trainable: bool = True) -> str:
    """Load a PEFT LoRA folder as adapter `name` (default: the folder's name). Works for adapters
    saved here and public PEFT LoRA adapters for the same base model. Returns the name."""
    from safetensors.torch import load_file

    folder = Path(folder)
    name = name or folder.name
    cfg_path, w_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: an adapter folder needs adapter_config.json "
                                    "and adapter_model.safetensors (PEFT layout)")
    cfg = read_json(cfg_path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{cfg_path}: per-module rank_pattern/alpha_pattern is not supported")
    targets = cfg.get("target_modules") or ["q_proj", "v_proj"]
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha/sqrt(r), i.e. (alpha*sqrt(r))/r
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(w_path).items()}
    add_lora(model, name, r, alpha, float(cfg.get("lora_dropout", 0.0)), targets=tuple(targets))
    params = adapter_params(model, name)
    expected = {f"{k}.weight" for k in params}
    if set(tensors) != expected:
        remove_adapter(model, name)
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"{w_path}: keys do not match this model (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}); is it an adapter for another base model?")
    with torch.no_grad():
        for k, p in params.items():
            t = tensors[f"{k}.weight"]
            if t.shape != p.shape:
                remove_adapter(model, name)
                raise ValueError(f"{w_path}: {k} has shape {tuple(t.shape)}, this model needs "
                                 f"{tuple(p.shape)}; the adapter was trained for another base model")
            p.copy_(t)
    set_trainable(model, name, trainable)
    return name


# ----------------------------------------------------------------------------------------
# Loading checkpoints


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def resolve_checkpoint(name_or_path: str | None) -> Path:
    """A local folder as is; None: the embedded model; anything else: a Hub id, fetched with
    huggingface_hub (only *.json and *.safetensors), or a clear error when offline."""
    if name_or_path is None:
        from embedded import embedded_model_dir
        return embedded_model_dir()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        raise FileNotFoundError(f"model {name_or_path!r}: no such folder (expected a folder with "
                                "config.json and *.safetensors, or a Hub id like meta-llama/Meta-Llama-3-8B-Instruct)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # offline, gated, or unknown id: all end the same way for the user
        raise RuntimeError(f"could not fetch {name_or_path!r} from the Hugging Face Hub ({type(e).__name__}: "
                           f"{str(e)[:200]}). Download it elsewhere and pass the local folder, e.g. "
                           f"--model /path/to/Meta-Llama-3-8B-Instruct") from None


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        files = [folder / "model.safetensors"]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: {folder} needs model.safetensors or "
                                    "the shards named in model.safetensors.index.json")
    return files


def load_model(name_or_path: str | Path | None = None, dtype: torch.dtype | str = torch.float32,
               device: str = "cpu"):
    """Load an HF Llama checkpoint folder (or Hub id; None = the embedded SmolLM2-135M-Instruct).
    Returns (model, tokenizer); the tokenizer is None when the folder has no tokenizer.json."""
    from safetensors import safe_open

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype} not supported (float32, bfloat16, float16)")
    folder = resolve_checkpoint(None if name_or_path is None else str(name_or_path))
    cfg = LlamaConfig.from_hf(read_json(folder / "config.json"), str(folder / "config.json"))
    gen = folder / "generation_config.json"
    if gen.is_file():  # Llama-3-Instruct lists <|eot_id|> as a stop id only here
        eos = read_json(gen).get("eos_token_id")
        cfg.eos_token_ids += [e for e in ([eos] if isinstance(eos, int) else eos or []) if e not in cfg.eos_token_ids]
    with torch.device("meta"):  # no memory for random init: the checkpoint tensors are assigned below
        model = Llama(cfg)
    state = {}
    for f in checkpoint_files(folder):
        try:
            with safe_open(f, framework="pt", device=device) as sf:
                for k in sf.keys():
                    state[k] = sf.get_tensor(k).to(dtype)  # one tensor converted at a time
        except Exception as e:
            raise ValueError(f"{f}: cannot read safetensors ({e})") from None
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some tied checkpoints still store the copy
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{folder}: weights do not match config.json: {str(e)[:500]}") from None
    model.inv_freq = rope_inv_freq(cfg).to(device)  # buffers were built on meta
    model.requires_grad_(False).eval()
    tok = Tokenizer(folder) if (folder / "tokenizer.json").is_file() else None
    return model, tok


# ----------------------------------------------------------------------------------------
# Tokenizer and chat template


class Tokenizer:
    """tokenizer.json through the `tokenizers` library, plus the checkpoint's own chat template
    (tokenizer_config.json), rendered with jinja2 the way transformers renders it."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        self.tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_path = folder / "tokenizer_config.json"
        cfg = read_json(cfg_path) if cfg_path.is_file() else {}
        text = lambda t: t.get("content") if isinstance(t, dict) else t  # AddedToken dicts or strings
        self.bos_token, self.eos_token = text(cfg.get("bos_token")), text(cfg.get("eos_token"))
        pad_token = text(cfg.get("pad_token"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template = template
        self.end_of_turn_id = self._end_of_turn()
        eos = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        self.eos_ids = sorted({i for i in (eos, self.end_of_turn_id) if i is not None})
        pad = self.tok.token_to_id(pad_token) if pad_token else None
        self.pad_id = pad if pad is not None else self.eos_ids[0]  # pads are masked: any id works

    def encode(self, text: str) -> list[int]:
        """Token ids, no special tokens added (the chat template writes bos itself)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not self.chat_template:
            raise ValueError("tokenizer_config.json has no chat_template")
        return render_chat(self.chat_template, messages, add_generation_prompt,
                           bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def chat_prompt(self, user_text: str) -> str:
        """One user turn followed by the assistant header: the prompt the model completes."""
        return self.render([{"role": "user", "content": user_text}], add_generation_prompt=True)

    def _end_of_turn(self) -> int | None:
        """The special token the template writes right after an assistant message."""
        if not self.chat_template:
            return self.tok.token_to_id(self.eos_token) if self.eos_token else None
        marker = "\x00END\x00"
        text = self.render([{"role": "user", "content": "u"}, {"role": "assistant", "content": marker}], False)
        special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        after = self.encode(text.split(marker, 1)[1])
        return next((i for i in after if i in special), self.tok.token_to_id(self.eos_token or ""))


def render_chat(template: str, messages, add_generation_prompt: bool, **special_tokens) -> str:
    """Render a chat template as transformers does: sandboxed jinja2, trim_blocks/lstrip_blocks,
    loop controls, and raise_exception / strftime_now helpers that real templates call."""
    from datetime import datetime

    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **special_tokens)


# ----------------------------------------------------------------------------------------
# Greedy decoding


@torch.no_grad()
def prefill(model: Llama, prompts: list[list[int]], mask, T: int):
    """Fill the cache with the prompts, right-aligned at slot T (left padding), and return the
    logits of each last prompt token [B, vocab]. Each prompt runs alone at its own length, so
    no compute goes to padding; only the last position gets the vocab projection."""
    caches = [layer.self_attn.cache for layer in model.model.layers]
    last = []
    for i, p in enumerate(prompts):
        for c in caches:
            c.rows = slice(i, i + 1)
        ids = torch.tensor([p], device=mask.device)  # [1, len]
        h = model.hidden(ids, attention_mask=mask[i:i + 1, :T], positions=torch.arange(len(p), device=mask.device)[None],
                         cache_pos=T - len(p))  # [1, len, d]
        last.append(h[:, -1])
    for c in caches:
        c.rows = slice(None)
    return model.logits(torch.cat(last))  # [B, vocab]


@torch.no_grad()
def decode_one_token(model: Llama, tok, mask, positions, cache_pos: int):
    """tok [B, 1] at cache slot cache_pos -> next-token logits [B, vocab]."""
    h = model.hidden(tok, attention_mask=mask, positions=positions, cache_pos=cache_pos)
    return model.logits(h[:, -1])


@torch.no_grad()
def generate(model: Llama, prompts: list[list[int]], max_new_tokens: int, stop_ids, pad_id: int = 0) -> list[list[int]]:
    """Greedy decoding for a batch of token-id prompts of any lengths (left-padded together).
    Each sequence stops at its own first stop id (kept in its output) or after max_new_tokens."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    was_training = model.training
    model.eval()
    device = model.device
    B, T = len(prompts), max(len(p) for p in prompts)
    mask = torch.zeros(B, T + max_new_tokens, dtype=torch.long, device=device)  # 1 = real token
    for i, p in enumerate(prompts):
        mask[i, T - len(p):T] = 1
    stop = torch.tensor(sorted(set(stop_ids)), device=device)
    model.setup_cache(B, T + max_new_tokens)
    try:
        logits = prefill(model, prompts, mask, T)
        positions = mask[:, :T].sum(-1, keepdim=True)  # [B, 1] next position of each sequence
        out, done = [], torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)  # [B]
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out.append(nxt)
            done |= torch.isin(nxt, stop)
            if done.all() or step == max_new_tokens - 1:
                break
            mask[:, T + step] = 1
            logits = decode_one_token(model, nxt[:, None], mask[:, :T + step + 1], positions, T + step)
            positions = positions + 1
    finally:
        model.clear_cache()
        model.train(was_training)
    stops, result = set(stop_ids), []
    for row in torch.stack(out, 1).tolist():  # [B, n_steps]
        cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
        result.append(row[:cut])
    return result
