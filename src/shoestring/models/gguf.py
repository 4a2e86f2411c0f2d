"""GGUF files (llama.cpp's format) in: metadata -> a Hugging Face config, tensors -> an HF state dict.

Read with the `gguf` package alone, de-quantised to fp32; only the tokenizer goes through
transformers (`models/hf.py`). We do not load the weights through transformers' GGUF path:
it drops what its config mapping does not name, so a Llama 3.1 / 3.2 file would lose its
`llama3` RoPE scaling (stored as the `rope_freqs` tensor, which it ignores) and Gemma's soft-caps
and Qwen3's head_dim would fall back to the config class defaults.

What llama.cpp's converter (convert_hf_to_gguf.py) does, undone here:
* tensor names: `TENSOR_MAP` below, per GGUF tensor kind of the `gguf` package. Llama-like
  architectures call the pre-MLP norm `ffn_norm`; Gemma calls that `post_attention_norm` ...
  see `_block_names`.
* Q and K of the `llama` architecture (Llama, Mistral, SmolLM) are stored with the rows of each
  head permuted from rotate-half to interleaved pairs (llama.cpp's "normal" RoPE); other
  architectures use the rotate-half ("neox") layout as stored.
* Gemma's norm weights are stored as 1 + w (llama.cpp's RMSNorm multiplies by the weight).
* Llama 3's RoPE scaling is the per-frequency divisor tensor `rope_freqs`; the llama3
  parameters are recovered from it and checked to reproduce it exactly.
* Metadata llama.cpp does not store but hard-codes, we hard-code the same way: Gemma's query
  scale (1/sqrt(head_dim), 1/sqrt(hidden / heads) for the 27B models), Gemma 3's sliding pattern
  (every 6th layer global) and local RoPE base (10000), when the file has no key for them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shoestring.errors import UserError
from shoestring.models.rope import RopeScaling, inv_freq

# GGUF architecture -> HF model_type. Mistral files use the llama architecture.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3"}
PERMUTED_QK = ("llama",)  # architectures whose Q/K rows llama.cpp stores interleaved
GEMMA = ("gemma2", "gemma3")


def _names() -> tuple[dict[Any, str], dict[Any, str]]:
    import gguf

    T = gguf.MODEL_TENSOR
    top = {T.TOKEN_EMBD: "model.embed_tokens", T.OUTPUT_NORM: "model.norm", T.OUTPUT: "lm_head"}
    block = {T.ATTN_NORM: "input_layernorm", T.ATTN_Q: "self_attn.q_proj", T.ATTN_K: "self_attn.k_proj",
             T.ATTN_V: "self_attn.v_proj", T.ATTN_OUT: "self_attn.o_proj", T.ATTN_QKV: "self_attn.qkv_proj",
             T.ATTN_Q_NORM: "self_attn.q_norm", T.ATTN_K_NORM: "self_attn.k_norm",
             T.FFN_GATE: "mlp.gate_proj", T.FFN_UP: "mlp.up_proj", T.FFN_DOWN: "mlp.down_proj",
             T.FFN_NORM: "post_attention_layernorm"}
    return {gguf.TENSOR_NAMES[k]: v for k, v in top.items()}, {gguf.TENSOR_NAMES[k]: v for k, v in block.items()}


def _block_names(arch: str) -> dict[str, str]:
    """GGUF block tensor name (with `{bid}`) -> HF name within `model.layers.{bid}.`."""
    import gguf

    T = gguf.MODEL_TENSOR
    names = dict(_names()[1])
    if arch in GEMMA:  # Gemma's four norms: its `post_attention_layernorm` norms the attention output
        names[gguf.TENSOR_NAMES[T.ATTN_POST_NORM]] = "post_attention_layernorm"
        names[gguf.TENSOR_NAMES[T.FFN_PRE_NORM]] = "pre_feedforward_layernorm"
        names[gguf.TENSOR_NAMES[T.FFN_POST_NORM]] = "post_feedforward_layernorm"
    if arch == "phi3":  # [gate; up] fused in one tensor, as Phi-3's own gate_up_proj
        names[gguf.TENSOR_NAMES[T.FFN_UP]] = "mlp.gate_up_proj"
    return names


def hf_name(gguf_name: str, arch: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (None: not a weight we map)."""
    base, _, suffix = gguf_name.rpartition(".")
    top, _ = _names()
    if base in top:
        return f"{top[base]}.{suffix}"
    if base.startswith("blk."):
        _, bid, rest = base.split(".", 2)
        hf = _block_names(arch).get("blk.{bid}." + rest)
        return f"model.layers.{bid}.{hf}.{suffix}" if hf else None
    return None


def gguf_name(hf: str, arch: str) -> str:
    """The inverse of `hf_name` (for writing files)."""
    top, _ = _names()
    module, _, suffix = hf.rpartition(".")
    for g, h in top.items():
        if module == h:
            return f"{g}.{suffix}"
    _, _, bid, rest = module.split(".", 3)
    for g, h in _block_names(arch).items():
        if rest == h:
            return f"{g.format(bid=bid)}.{suffix}"
    raise KeyError(f"{hf} has no GGUF name for architecture {arch}")


def permute_qk(w: torch.Tensor, n_heads: int, to_gguf: bool) -> torch.Tensor:
    """llama.cpp's Q/K row order for the llama architecture (`to_gguf`), or back."""
    rows = w.shape[0]
    if to_gguf:
        return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- reading ----------------------------------------------------------------------------------
def _fields(reader) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
            continue  # the vocabulary: read by the tokenizer side
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 — a field the gguf package cannot decode is one we do not need
            continue
    return out


def _tensor(t) -> torch.Tensor:
    import gguf

    data = gguf.quants.dequantize(t.data, t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions fastest first
    return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)  # a copy: the file is memory-mapped read-only


def llama3_from_factors(factors: torch.Tensor, head_dim: int, theta: float) -> RopeScaling:
    """The llama3 scaling whose per-frequency divisors are `factors` (llama.cpp's `rope_freqs`).

    In terms of x = original_context / wavelength, a frequency is divided by `factor` below
    x = low_freq_factor, kept above x = high_freq_factor, and between divided by
    1 / ((1 - s) / factor + s) with s = (x - low) / (high - low). Only the ratios of (original
    context, low, high) matter, so the original context is taken as 8192 (Llama 3's); low and
    high come from the smooth band (two or more points fix the line; with fewer, any line through
    the gap between the scaled and the kept frequencies gives the same divisors). The result is
    checked to reproduce `factors`."""
    factor, original = float(factors.max()), 8192
    plain = inv_freq(head_dim, theta)
    x = original * plain / (2 * math.pi)
    scaled, kept = factors >= factor * (1 - 1e-5), factors <= 1 + 1e-5
    band = ~(scaled | kept)
    floor = float(x[scaled].max()) if scaled.any() else float(x.min()) / 2
    ceiling = float(x[kept].min()) if kept.any() else float(x.max()) * 2
    s = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
    if band.sum() >= 2:
        slope = float((s[-1] - s[0]) / (x[band][-1] - x[band][0]))
        low = float(x[band][0]) - float(s[0]) / slope
        high = low + 1 / slope
    elif band.sum() == 1:
        x1, s1 = float(x[band][0]), float(s[0])
        width = 0.5 * min((x1 - floor) / s1, (ceiling - x1) / (1 - s1))
        low, high = x1 - s1 * width, x1 + (1 - s1) * width
    else:
        low, high = floor + (ceiling - floor) / 3, floor + 2 * (ceiling - floor) / 3
    scaling = RopeScaling("llama3", factor, original, low, high)
    if not torch.allclose(plain / inv_freq(head_dim, theta, scaling), factors, rtol=1e-4, atol=1e-5):
        raise UserError("the file's rope_freqs are not a llama3 RoPE scaling", "this RoPE variant is not implemented")
    return scaling


def config_from_metadata(fields: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A Hugging Face config.json (transformers 5 layout) for the file's architecture."""
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"GGUF architecture {arch!r} cannot be mapped onto our model", f"supported: {', '.join(ARCHITECTURES)}")

    def get(key: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{key}", default)

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    layers = int(get("block_count"))
    head_dim = int(get("attention.key_length") or (get("rope.dimension_count") if arch == "llama" else 0) or hidden // heads)
    if get("rope.dimension_count") not in (None, head_dim):
        raise UserError("partial rotary embeddings (rope.dimension_count < head_dim) are not implemented")
    vocab = get("vocab_size") or tensors["model.embed_tokens.weight"].shape[0]
    theta = float(get("rope.freq_base", 10000.0))
    cfg: dict[str, Any] = {
        "model_type": ARCHITECTURES[arch], "hidden_size": hidden, "num_hidden_layers": layers,
        "intermediate_size": int(get("feed_forward_length")), "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv") or heads), "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length", 2048)), "vocab_size": int(vocab),
        "rms_norm_eps": float(f"{get('attention.layer_norm_rms_epsilon', 1e-6):.7g}"),  # stored as f32: 1e-6, not 9.99e-7
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "rope_parameters": {**_scaling(get, tensors, head_dim, theta), "rope_theta": theta},
    }
    if arch != "qwen2":  # biases are not metadata: the tensors say (Qwen2's q/k/v ones are built in)
        cfg["attention_bias"] = "model.layers.0.self_attn.o_proj.bias" in tensors or "model.layers.0.self_attn.q_proj.bias" in tensors
    if arch == "llama":
        cfg["mlp_bias"] = "model.layers.0.mlp.down_proj.bias" in tensors
    window = int(get("attention.sliding_window") or 0)
    if window:
        cfg["sliding_window"] = window
        if arch == "llama":
            cfg["model_type"] = "mistral"
        cfg["layer_types"] = _layer_types(arch, get("attention.sliding_window_pattern"), layers)
    if arch in GEMMA:
        scale = get("attention.scale")
        big = layers == (46 if arch == "gemma2" else 62)  # the 27B models (llama.cpp's rule)
        cfg["query_pre_attn_scalar"] = scale ** -2 if scale else (hidden // heads if big else head_dim)
        cfg["attn_logit_softcapping"] = get("attn_logit_softcapping")
        cfg["final_logit_softcapping"] = get("final_logit_softcapping")
    if arch == "gemma3":
        cfg["rope_parameters"] = {"full_attention": cfg["rope_parameters"],
                                  "sliding_attention": {"rope_type": "default", "rope_theta": float(get("rope.freq_base_swa", 10000.0))}}
    return cfg


def _scaling(get, tensors: dict[str, torch.Tensor], head_dim: int, theta: float) -> dict[str, Any]:
    kind = get("rope.scaling.type", "none")
    if "rope_freqs.weight" in tensors:
        s = llama3_from_factors(tensors.pop("rope_freqs.weight"), head_dim, theta)
        return {"rope_type": "llama3", "factor": s.factor, "original_max_position_embeddings": s.original_max_seq_len,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor}
    if kind == "none":
        return {"rope_type": "default"}
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": float(get("rope.scaling.factor")),
               "original_max_position_embeddings": int(get("rope.scaling.original_context_length"))}
        for key, gkey in (("beta_fast", "rope.scaling.yarn_beta_fast"), ("beta_slow", "rope.scaling.yarn_beta_slow")):
            if get(gkey) is not None:
                out[key] = float(get(gkey))
        return out
    raise UserError(f"GGUF rope scaling {kind!r} is not implemented", "supported: none, linear, yarn, llama3 (rope_freqs)")


def _layer_types(arch: str, pattern: Any, layers: int) -> list[str]:
    if isinstance(pattern, (list, tuple)):  # newer files: one flag per layer
        sliding = [bool(p) for p in pattern]
    else:
        period = int(pattern) if pattern else {"gemma2": 2, "gemma3": 6}.get(arch, 0)
        sliding = [(i + 1) % period != 0 if period else True for i in range(layers)]
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def read_gguf_weights(file: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(HF config, HF-named fp32 state dict) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(file))
    fields = _fields(reader)
    arch = fields.get("general.architecture")
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            state[t.name] = _tensor(t)
            continue
        name = hf_name(t.name, arch)
        if name is None:
            raise UserError(f"{file}: tensor {t.name!r} is not part of a {arch} model we can load")
        state[name] = _tensor(t)
    cfg = config_from_metadata(fields, state)
    if arch in PERMUTED_QK:
        for key in list(state):
            for proj, heads in (("q_proj", cfg["num_attention_heads"]), ("k_proj", cfg["num_key_value_heads"])):
                if f".self_attn.{proj}." in key:
                    state[key] = permute_qk(state[key], heads, to_gguf=False)
    if arch in GEMMA:
        for key in state:
            if key.endswith("norm.weight"):
                state[key] = state[key] - 1.0
    return cfg, state
