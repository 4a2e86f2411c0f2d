"""Model definitions only: no precision, devices or parallelism here."""

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
    """Build on `device` ("meta" builds shapes only, no memory)."""
    with torch.device(device):
        return Llama(args)
