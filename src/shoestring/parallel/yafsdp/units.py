"""What the engine shards and where it computes: units (groups of parameters gathered together)
and slots (the buffers a unit is gathered into and its gradients reduced from).

A unit is trained or frozen as a whole. The large units, one per transformer block, `embed` and
`head` (absent when tied to the embedding), are *streamed*: gathered into a slot shared with
other units just before they compute, and given the slot back after. Block i uses slot i % 2,
embed and head share a third. Every other parameter is *resident*, one unit per kind: its own
slot, gathered once per optimizer step and kept (its gradients accumulated in place).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from shoestring.levers.precision import PrecisionPolicy
from shoestring.models.llama import Llama
from shoestring.parallel.flat import FlatLayout


@dataclass(eq=False)
class Slot:
    """A gather buffer with the gradient buffer and reduce-scatter landing space beside it, and
    who uses them now. The engine holds the invariant (checked on every use): `weights` is never
    written while `reader` is set, never read while `gathering` is in flight, and `grads` is not
    overwritten while `reducing` is in flight."""

    name: str
    weights: torch.Tensor  # the gathered weights of `holds`; its parameters are views into it
    grads: torch.Tensor  # gradients of the unit in backward (reduce dtype; empty when none train)
    recv: torch.Tensor  # where the reduce-scatter from `grads` lands (streamed slots)
    holds: Unit | None = None  # whose weights `weights` holds, gathered or on the way
    gathering: Any = None  # that gather's work handle, while in flight
    reader: Unit | None = None  # the unit computing with `weights` now
    reducing: tuple[Unit, Any] | None = None  # (unit, its reduce-scatter), while in flight


@dataclass(eq=False)
class Unit:
    """One unit at run time: its layout, this rank's shard of it, and its slot."""

    layout: FlatLayout
    slot: Slot
    stored: torch.Tensor  # this rank's shard as kept: a slice of the fp32 master, or of the frozen shard
    sent: torch.Tensor  # the same shard in the dtype it is gathered in
    grad: torch.Tensor | None  # this rank's slice of the shard gradient (trained units)
    grads_seen: int = 0  # parameters whose gradient landed this backward (streamed units)
    input_gated: bool = False  # blocks: a gradient reaches the block's input (a gate marks its backward's end)

    @property
    def name(self) -> str:
        return self.layout.unit

    @property
    def trainable(self) -> bool:
        return self.layout.trainable

    @property
    def complete(self) -> bool:
        """Every parameter's gradient has landed."""
        return self.grads_seen == len(self.layout.names)


def split(model: Llama, world: int) -> tuple[list[FlatLayout], list[FlatLayout], list[FlatLayout]]:
    """(blocks, outer, resident) layouts, each parameter once (tied weights keep all their names).

    Trained and frozen parameters never share a unit. The large units (one per block, `embed`
    and `head`, the latter absent when tied to the embedding) hold the bulk's matrices: the
    frozen base when there is one (LoRA), else every matrix. The rest is resident, one unit per
    kind: `adapters` (trained matrices beside a frozen base), `small` (trained vectors),
    `frozen_small` (frozen vectors); empty ones are left out. In this order the trained matrices
    come first: one decayed range of the master."""
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    bulk = not any(not p.requires_grad and p.dim() >= 2 for p in params.values())  # do the large units train?

    def large(p: nn.Parameter) -> bool:
        return p.dim() >= 2 and p.requires_grad == bulk

    def layout(unit: str, trainable: bool, keep: Callable[[str, nn.Parameter], bool]) -> FlatLayout:
        ids = [i for i, p in params.items() if p.requires_grad == trainable and keep(names[i][0], p)]
        return FlatLayout(unit, tuple(tuple(names[i]) for i in ids), tuple(tuple(params[i].shape) for i in ids), world,
                          trainable)

    blocks = [layout(f"layers.{b}", bulk, lambda n, p, b=b: large(p) and n.startswith(f"layers.{b}."))
              for b in range(len(model.layers))]
    outer = [layout("embed", bulk, lambda n, p: large(p) and n.startswith("embed_tokens.")),
             layout("head", bulk, lambda n, p: large(p) and n.startswith("lm_head."))]
    resident = [layout("adapters", True, lambda n, p: p.dim() >= 2 and not large(p)),
                layout("small", True, lambda n, p: p.dim() < 2),
                layout("frozen_small", False, lambda n, p: p.dim() < 2)]
    return blocks, [u for u in outer if u.numel], [u for u in resident if u.numel]


def held_dtype(policy: PrecisionPolicy, dtype: torch.dtype) -> torch.dtype:
    """The dtype a frozen weight stored in `dtype` computes in (as `cast_model` would hold it)."""
    return dtype if policy.param_dtype == torch.float32 else policy.param_dtype


def storage_offsets(layouts: list[FlatLayout]) -> list[int]:
    """Where each unit's shard starts in its flat storage: the master for trained units, the
    frozen shard for the others."""
    at, out = {True: 0, False: 0}, []
    for u in layouts:
        out.append(at[u.trainable])
        at[u.trainable] += u.shard
    return out
