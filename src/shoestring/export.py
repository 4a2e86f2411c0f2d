"""A run's model back out, whatever strategy trained it: its newest checkpoint's full weights
(`checkpoint_weights`), as one safetensors file for other tools (`export_safetensors`), or as the
model with the structure it was trained in (`load_run`: what `generate`, `compare` and
`export --hf` start from)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from shoestring import checkpoint as ckpt
from shoestring.build import build_plain_model, shape_model
from shoestring.config import Config, build_config
from shoestring.data.sources import prepared_dir
from shoestring.data.tokenizer import load_tokenizer
from shoestring.errors import UserError
from shoestring.levers.lora import dequantized, nf4_tensor_class
from shoestring.models import build_model
from shoestring.models.hf import args_from_hf_config, read_tokenizer_dir
from shoestring.models.llama import Llama
from shoestring.parallel import strategy_class
from shoestring.rundir import BASE_DIR, CHECKPOINTS_DIR, run_config


def checkpoint_weights(run_dir: Path) -> tuple[dict[str, torch.Tensor], ckpt.CheckpointRef]:
    """The newest complete checkpoint's full state dict (CPU), consolidated from the shards of
    the strategy that wrote it (named in that checkpoint's own config); an NF4 base (QLoRA)
    comes back dequantised, as plain tensors."""
    ref = ckpt.resolve_resume(run_dir / CHECKPOINTS_DIR, fallback=True, warn=lambda m: None)
    if ref is None:
        raise UserError(f"{run_dir} has no complete checkpoint", "train it first (shoestring train ...)")
    saved = build_config(ckpt.load_file(ref, "trainer.pt")["config"], str(ref.path))
    if saved.lora.enabled and saved.lora.base_dtype == "nf4":
        nf4_tensor_class()  # imported quietly, before unpickling needs it
    weights = strategy_class(saved.parallel.strategy).consolidated_weights(ref.path)
    return {k: dequantized(v) for k, v in weights.items()}, ref


def export_safetensors(run_dir: Path, out: Path | None = None) -> tuple[Path, ckpt.CheckpointRef]:
    from safetensors.torch import save_file

    weights, ref = checkpoint_weights(run_dir)
    out = out or run_dir / f"model-{ref.path.name}.safetensors"
    # Tied weights arrive as one shared tensor under two names; safetensors stores each on its own.
    save_file({k: v.detach().contiguous().clone() for k, v in weights.items()}, str(out),
              metadata={"step": str(ref.step), "preset": run_config(run_dir).model.preset})
    return out, ref


@dataclass
class RunModel:
    cfg: Config
    model: Llama  # LoRA modules present (unmerged) when the run used LoRA
    tokenizer: Tokenizer
    tokenizer_config: dict
    hf_config: dict | None  # the source's config, None for a preset model


def load_run(run_dir: Path) -> RunModel:
    """The newest checkpoint's model (fp32, eval mode, CPU) with the structure it was trained in."""
    cfg = run_config(run_dir)
    weights, _ = checkpoint_weights(run_dir)  # consolidated from the shards of any strategy
    if cfg.model.source:
        tokenizer, tok_cfg = read_tokenizer_dir(run_dir / BASE_DIR)
        hf_config = json.loads((run_dir / BASE_DIR / "config.json").read_text())
        model = build_model(args_from_hf_config(hf_config), "cpu")
    else:
        tokenizer, tok_cfg, hf_config = load_tokenizer(prepared_dir(cfg) / "tokenizer.json"), {}, None
        model = build_plain_model(cfg, tokenizer.get_vocab_size(), torch.device("cpu"))
    shape_model(cfg, model, quantize=False)  # an NF4 base comes back dequantised
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    for p in model.parameters():
        p.data = p.data.float()
    return RunModel(cfg, model.eval(), tokenizer, tok_cfg, hf_config)
