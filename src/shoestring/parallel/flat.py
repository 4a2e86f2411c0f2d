"""Flat, padded, evenly sharded storage for a group of parameters (one YaFSDP unit).

A unit's parameters are laid end to end in one 1-D tensor, padded with zeros to a multiple of
the world size, so that rank r owns the contiguous slice `[r * shard, (r + 1) * shard)` and one
`all_gather_into_tensor` rebuilds the whole unit. During compute each parameter is a view into
the gathered tensor (`views`): nothing is copied out and nothing is allocated per parameter.

The layout is a pure function of the parameters' names and shapes and of the world size, so a
checkpoint written on N ranks can be cut again for M (`shard_range` in unpadded coordinates).
A unit is trained or frozen as a whole (`trainable`): a frozen unit needs no gradient buffer,
master or optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlatLayout:
    """Where each parameter of a unit lives in its flat tensor. `names[k]` lists every name of
    parameter k (a tied weight has two)."""

    unit: str
    names: tuple[tuple[str, ...], ...]
    shapes: tuple[tuple[int, ...], ...]
    world_size: int
    trainable: bool = True

    @property
    def offsets(self) -> list[int]:
        out, at = [], 0
        for shape in self.shapes:
            out.append(at)
            at += _numel(shape)
        return out

    @property
    def numel(self) -> int:
        return sum(_numel(s) for s in self.shapes)

    @property
    def shard(self) -> int:
        """Elements each rank owns (the last ranks' tails are padding)."""
        return -(-self.numel // self.world_size)

    @property
    def padded(self) -> int:
        return self.shard * self.world_size

    def shard_range(self, rank: int) -> tuple[int, int]:
        """The real (unpadded) elements rank `rank` owns, as [start, stop) of the unit."""
        start = min(rank * self.shard, self.numel)
        return start, min(start + self.shard, self.numel)

    def flatten(self, tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The unit's padded flat tensor from its parameters' values."""
        out = torch.zeros(self.padded, dtype=dtype, device=tensors[0].device)
        for t, at in zip(tensors, self.offsets):
            out[at : at + t.numel()].copy_(t.detach().reshape(-1))
        return out

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's shape over `flat` (no copy)."""
        return [flat[at : at + _numel(s)].view(s) for s, at in zip(self.shapes, self.offsets)]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
