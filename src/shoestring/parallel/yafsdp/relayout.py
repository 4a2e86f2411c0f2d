"""yafsdp checkpoints, and cutting them again for another world size.

Every rank writes its flat master, Adam moments and frozen shard with the units' layouts
(`yafsdp/rank{r}.pt`). A layout is a pure function of the parameters' names and shapes and of the
number of shards, so a rank of any new world finds the part of its shard each saved rank held by
intersecting the two ranks' ranges of each unit (`load_shards`); `consolidated_weights` lays
every saved shard end to end again for export (fp32 from the masters, frozen weights in their
own dtype).
"""

from __future__ import annotations

from pathlib import Path

import torch

from shoestring.parallel.base import require_file
from shoestring.parallel.flat import FlatLayout
from shoestring.parallel.yafsdp.units import storage_offsets
from shoestring import checkpoint as ckpt

CKPT_DIR = "yafsdp"


def layout_key(layouts: list[FlatLayout]) -> list[tuple]:
    """What a checkpoint records of the layouts (the world size apart)."""
    return [(u.unit, u.names, u.shapes, u.trainable) for u in layouts]


def save(directory: Path, rank: int, world_size: int, layouts: list[FlatLayout], master: torch.Tensor,
         moments: torch.Tensor, frozen: torch.Tensor, scaler: dict, step: torch.Tensor) -> None:
    state = {"world_size": world_size, "layouts": layout_key(layouts), "master": master, "moments": moments,
             "frozen": frozen, "scaler": scaler, "step": step}
    (directory / CKPT_DIR).mkdir(exist_ok=True)
    ckpt.write_file(directory / CKPT_DIR / f"rank{rank}.pt", ckpt.torch_bytes(state))


def rank_files(directory: Path) -> list[dict]:
    """Every saved rank's state (memory-mapped), with its rank, layouts and unit offsets."""
    out = []
    for path in sorted(require_file(directory, CKPT_DIR).glob("rank*.pt")):
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        saved["rank"], saved["checkpoint"] = int(path.stem.removeprefix("rank")), directory
        saved["units"] = [FlatLayout(u, tuple(map(tuple, n)), tuple(map(tuple, s)), saved["world_size"], t)
                          for u, n, s, t in saved["layouts"]]
        saved["offsets"] = storage_offsets(saved["units"])
        out.append(saved)
    return out


@torch.no_grad()
def load_shards(saved: dict, layouts: list[FlatLayout], offsets: list[int], rank: int, master: torch.Tensor,
                moments: torch.Tensor, frozen: torch.Tensor) -> None:
    """Copy what one saved rank holds of this rank's shards (of `layouts`, at `offsets` in their
    storage) into `master` and `moments` (trained units) or `frozen`."""
    if layout_key(saved["units"]) != layout_key(layouts):
        raise RuntimeError(f"{saved['checkpoint']}: the checkpoint's parameters differ from this model's")
    for old, at_old, new, at_new in zip(saved["units"], saved["offsets"], layouts, offsets):
        a, b = old.shard_range(saved["rank"])
        c, d = new.shard_range(rank)
        lo, hi = max(a, c), min(b, d)
        if lo < hi:
            src, dst = slice(at_old + lo - a, at_old + hi - a), slice(at_new + lo - c, at_new + hi - c)
            if new.trainable:
                master[dst] = saved["master"][src]
                moments[:, dst] = saved["moments"][:, src]
            else:
                frozen[dst] = saved["frozen"][src]


def consolidated_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The full state dict, every name of a tied weight included."""
    full: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for saved in (files := rank_files(directory)):
        for k, (unit, at) in enumerate(zip(saved["units"], saved["offsets"])):
            a, b = unit.shard_range(saved["rank"])
            store = saved["master" if unit.trainable else "frozen"]
            if k not in full:
                full[k] = torch.zeros(unit.padded, dtype=store.dtype)
            full[k][a:b] = store[at:][: b - a]
    for k, unit in enumerate(files[-1]["units"]):
        for names, view in zip(unit.names, unit.views(full[k])):
            out.update({n: view.clone() for n in names})
    return out
