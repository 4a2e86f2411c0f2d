"""A run -> a Hugging Face directory that transformers loads and generates with.

Full weights (LoRA runs: the adapters merged in) as safetensors of the source's family (Phi-3's
projections fused back; a preset run's family from its switches), or, for a LoRA run, the
adapter alone in PEFT's layout (`adapter_config.json` + `adapter_model.safetensors`,
loadable with `peft.PeftModel.from_pretrained` on the base). The tokenizer and chat template go
along either way. Weights are written in fp32 (what the run's checkpoint is loaded as).
"""

from __future__ import annotations

import json
from pathlib import Path

from shoestring.data.tokenizer import EOT, EOT_ID
from shoestring.errors import UserError
from shoestring.export import RunModel, load_run
from shoestring.levers.lora import adapter_state_dict, lora_modules, merged_state_dict
from shoestring.models.hf import FAMILIES, hf_config_from_args, ours_to_hf, text_config, write_hf_dir


def _hf_config(run: RunModel) -> dict:
    if run.hf_config is None:
        return hf_config_from_args(run.model.args, run.model.embed_tokens.weight.dtype,
                                   {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID})
    config = {k: v for k, v in text_config(run.hf_config).items() if k not in ("quantization_config", "_name_or_path")}
    config["dtype"] = config["torch_dtype"] = "float32"
    return config


def _tokenizer_config(run: RunModel) -> dict:
    if run.tokenizer_config:
        return run.tokenizer_config
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT}


def export_hf(run_dir: Path, out_dir: Path, adapter_only: bool = False) -> Path:
    """Write `out_dir`; returns it. `adapter_only` needs a LoRA run."""
    run = load_run(Path(run_dir))
    has_lora = bool(lora_modules(run.model))
    if adapter_only:
        if not has_lora:
            raise UserError(f"{run_dir} is not a LoRA run: there is no adapter to export", "drop --adapter to export the full weights")
        return _write_adapter(run, Path(out_dir))
    state = merged_state_dict(run.model) if has_lora else run.model.state_dict()
    config = _hf_config(run)
    return write_hf_dir(Path(out_dir), config, ours_to_hf(state, run.model.args, config["model_type"]), run.tokenizer,
                        _tokenizer_config(run))


def _write_adapter(run: RunModel, out: Path) -> Path:
    from safetensors.torch import save_file

    kind = _hf_config(run)["model_type"]
    if FAMILIES[kind].fused:
        raise UserError(f"a {kind} adapter cannot be written in peft's layout: our adapters sit on the split "
                        "q/k/v and gate/up projections, peft's on the fused qkv_proj / gate_up_proj",
                        "drop --adapter to export the merged weights")
    lora = run.cfg.lora
    out.mkdir(parents=True, exist_ok=True)
    # PEFT names: the HF key of the base module + ".lora_A.weight", under "base_model.model.".
    tensors = {f"base_model.model.model.{k}.weight": v.contiguous() for k, v in adapter_state_dict(run.model).items()}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
              "lora_dropout": lora.dropout, "target_modules": list(lora.targets), "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": run.cfg.model.source}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    run.tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(run), indent=2))
    return out
