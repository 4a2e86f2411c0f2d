"""Model definitions and the loss (`models.loss`): no precision policy, devices or parallelism here."""

from __future__ import annotations

from dataclasses import replace

import torch

from shoestring.models.llama import Block, Llama, ModelArgs
from shoestring.models.presets import PRESETS

__all__ = ["Block", "Llama", "ModelArgs", "PRESETS", "build_model", "preset_args"]


def preset_args(name: str, vocab_size: int | None = None, max_seq_len: int | None = None) -> ModelArgs:
    args = PRESETS[name]
    changes = {k: v for k, v in (("vocab_size", vocab_size), ("max_seq_len", max_seq_len)) if v is not None}
    return replace(args, **changes)


def build_model(args: ModelArgs, device: str | torch.device = "cpu") -> Llama:
    """Build on `device` ("meta" builds shapes only, no memory).

    Modules are created on the meta device and initialised once by `init_weights`, so the
    weights depend only on the RNG seed (not on torch's per-module default inits) and a model
    materialised later from meta (as sharded strategies do) gets the same weights."""
    with torch.device("meta"):
        model = Llama(args)
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        model.init_weights()
    return model
