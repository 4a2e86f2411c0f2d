"""What the planner needs to know about a model: parameter shapes (from a meta-device build,
free at any size), FLOPs per token, and which parameters train (all of them, or a
parameter-efficient lever's adapters over a frozen base).

`TrainableEstimate` is the plug-in point for parameter-efficient levers: a function of the
model's shapes that says which parameter shapes get gradients and optimizer state, how many
frozen parameters there are and in which dtype they are stored. `lora_trainable` implements it
for LoRA from the lever's own `target_shapes` (levers/lora.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property, partial
from typing import Callable

import torch

from shoestring.errors import UserError
from shoestring.levers.lora import (LoRASettings, estimate, frozen_base_bytes, nf4_dequant_bytes, nf4_working_bytes,
                                   saved_activation_bytes, target_shapes)
from shoestring.models import PRESETS, ModelArgs, build_model

Shape = tuple[int, ...]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every target_shapes key


@dataclass(frozen=True, eq=False)  # identity hash: the planner caches per instance
class ModelInfo:
    name: str
    args: ModelArgs
    shapes: tuple[Shape, ...]  # every distinct parameter (tied weights once), in model order

    @cached_property
    def n_params(self) -> int:
        return sum(_numel(s) for s in self.shapes)

    @cached_property
    def block_params(self) -> int:
        """Parameters of one transformer block (everything but embedding, head, final norm)."""
        a = self.args
        return (self.n_params - a.vocab_size * a.dim * (1 if a.tie_embeddings else 2) - a.dim) // a.n_layers

    def flops_per_token(self, seq_len: int) -> float:
        return self.args.flops_per_token(seq_len)


@dataclass(frozen=True, eq=False)
class Trainable:
    """Which parameters train. `shapes`: the trainable tensors (grads + optimizer state);
    `frozen_params` / `frozen_bytes`: the frozen base and its element size."""

    shapes: tuple[Shape, ...]
    frozen_params: int = 0
    frozen_bytes: int = 2
    # bytes one block's trainable add to saved activations: (tokens, precision, compiled) -> bytes
    block_activation_bytes: Callable[[int, str, bool], int] | None = None
    # A quantised base (QLoRA's NF4): its exact bytes per rank split `shards` ways (else
    # frozen_params x frozen_bytes), the traffic of one dequantisation pass (compiled or not)
    # and the transient of the largest dequantised weight.
    frozen_sharded: Callable[[int], int] | None = None
    dequant_bytes: Callable[[bool], int] | None = None
    dequant_working: int = 0

    @cached_property
    def n_params(self) -> int:
        return sum(_numel(s) for s in self.shapes)

    def frozen_state_bytes(self, shards: int = 1) -> int:
        if self.frozen_sharded is not None:
            return self.frozen_sharded(shards)
        return -(-self.frozen_params * self.frozen_bytes // shards)


TrainableEstimate = Callable[[ModelInfo], Trainable]


def _numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@cache
def model_info(name: str, max_seq_len: int | None = None) -> ModelInfo:
    """A preset by name (built on the meta device: no memory, milliseconds)."""
    if name not in PRESETS:
        raise UserError(f"unknown model {name!r}", f"use a preset: {', '.join(PRESETS)}")
    args = PRESETS[name]
    if max_seq_len and max_seq_len > args.max_seq_len:
        from dataclasses import replace

        args = replace(args, max_seq_len=max_seq_len)
    return info_for(name, args)


def info_for(name: str, args: ModelArgs) -> ModelInfo:
    """A model of these exact arguments (a run's: its tokenizer's vocabulary, a source's shape)."""
    model = build_model(args, "meta")
    return ModelInfo(name, args, tuple(tuple(p.shape) for p in model.parameters()))


def full_trainable(info: ModelInfo) -> Trainable:
    return Trainable(info.shapes)


def lora_trainable(info: ModelInfo, rank: int = 16, targets: tuple[str, ...] = LORA_TARGETS,
                   frozen_bytes: int = 2, nf4: bool = False) -> Trainable:
    """LoRA: per target linear (in -> out) an A (rank x in) and a B (out x rank) adapter; the
    base (all original weights) frozen, stored in `frozen_bytes` (bf16 by default), the blocks'
    linears in NF4 with `nf4` (QLoRA). The lever owns which linears exist, their shapes, the
    frozen count and an NF4 base's bytes and dequantisation traffic (levers/lora.py)."""
    dims = target_shapes(info.args)
    shapes = tuple(s for _ in range(info.args.n_layers) for t in targets for s in ((rank, dims[t][0]), (dims[t][1], rank)))
    settings = LoRASettings(rank=rank, targets=targets, base_dtype=torch.bfloat16 if frozen_bytes == 2 else torch.float32, nf4=nf4)
    quantised = {} if not nf4 else dict(
        frozen_sharded=partial(frozen_base_bytes, info.args, settings, "bf16"),
        dequant_bytes=partial(nf4_dequant_bytes, info.args, settings), dequant_working=nf4_working_bytes(info.args, settings))
    return Trainable(shapes, frozen_params=estimate(info.args, settings).frozen_params, frozen_bytes=frozen_bytes,
                     block_activation_bytes=partial(saved_activation_bytes, info.args, settings), **quantised)


def lora_flops_per_token(info: ModelInfo, trainable: Trainable, seq_len: int) -> float:
    """A frozen weight needs no weight gradient: its matmuls cost forward + input-gradient (4 x
    params instead of 6 x), while attention (no weights) keeps its full 3 x forward; adapters
    train fully."""
    full = info.flops_per_token(seq_len)
    attention = info.args.attention_flops_per_token(seq_len)
    return (full - attention) * 4 / 6 + attention + 6 * trainable.n_params
