"""Full model weights out of a run, whatever strategy trained it: one safetensors file for
other tools, and the weights `generate` samples from."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shoestring.config import Config, build_config
from shoestring.errors import UserError
from shoestring.levers.lora import dequantized, nf4_tensor_class
from shoestring.parallel import strategy_class
from shoestring import checkpoint as ckpt
from shoestring.train.trainer import CONFIG_FILE


def run_config(run_dir: Path) -> Config:
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no {CONFIG_FILE})", "give the run.dir of a training run")
    return build_config(json.loads(cfg_path.read_text()), str(cfg_path))


def checkpoint_weights(run_dir: Path) -> tuple[dict[str, torch.Tensor], ckpt.CheckpointRef]:
    """The newest complete checkpoint's full state dict (CPU), consolidated from the shards of
    the strategy that wrote it (named in that checkpoint's own config); an NF4 base (QLoRA)
    comes back dequantised, as plain tensors."""
    ref = ckpt.resolve_resume(run_dir / "checkpoints", fallback=True, warn=lambda m: None)
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
