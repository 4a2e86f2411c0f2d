"""Checkpoints that survive a kill at any byte.

Layout of a run directory's `checkpoints/`:

    step_00000200/          one complete checkpoint: its files + MANIFEST.json (sizes, sha256)
    step_00000400/
    latest                  text file naming the newest complete checkpoint
    .tmp-step_00000600-*/   a save in progress (ignored, removed by the next save)

A save writes every file into a temporary directory, fsyncs each file and the directory, renames
the directory into place (atomic on POSIX), fsyncs the parent, and only then rewrites `latest`
(itself through write-temp-then-rename). A kill before the rename leaves only a `.tmp-*`
directory; a kill after it leaves a complete checkpoint that `latest` may not name yet, which
`find_checkpoints` still finds because completeness is decided by the manifest, not the pointer.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from shoestring import dist
from shoestring.errors import RunError

MANIFEST = "MANIFEST.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass(frozen=True)
class CheckpointRef:
    path: Path
    step: int


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_bytes_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_file(path: Path, data: bytes) -> None:
    """Write one file of a checkpoint being saved (fsynced; the directory is sealed later)."""
    _write_bytes_durably(path, data)


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    root: Path,
    step: int,
    files: dict[str, bytes],
    keep_last: int,
    write_extra: Callable[[Path], None] | None = None,
) -> CheckpointRef:
    """Write `files` (name -> bytes) as checkpoint `step` under `root`, atomically.

    `write_extra(tmp_dir)` lets strategies write their own files into the same temporary
    directory before it is sealed. In a multi-rank run every rank calls this: rank 0 creates the
    temporary directory (on the shared filesystem) and writes `files`, every rank runs
    `write_extra` into it, and after a barrier rank 0 alone seals, renames and points `latest`
    at it, so a kill of any rank at any moment leaves only complete checkpoints. Raises RunError
    (the previous checkpoint intact) when the disk refuses the write.
    """
    final = root / step_dir_name(step)
    tmp = None
    try:
        if dist.is_main():
            root.mkdir(parents=True, exist_ok=True)
            _remove_stale_temps(root)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
            for name, data in files.items():
                _write_bytes_durably(tmp / name, data)
        tmp = Path(dist.broadcast(str(tmp)))
        if write_extra is not None:
            write_extra(tmp)
        dist.barrier()
        if dist.is_main():
            _seal(tmp, final, step)
    except OSError as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_complete(root)
        kept = f"the previous checkpoint ({prev.path.name}) is intact" if prev else "no earlier checkpoint exists"
        raise RunError(
            f"could not write checkpoint {final}: {err.strerror or err}",
            f"free space or fix permissions on {root}; {kept}",
        ) from None
    dist.barrier()  # nobody reads or prunes before the checkpoint is sealed
    if dist.is_main():
        _prune(root, keep_last)
    return CheckpointRef(final, step)


def _seal(tmp: Path, final: Path, step: int) -> None:
    manifest = {
        "step": step,
        "files": {
            str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        },
    }
    _write_bytes_durably(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    for d in sorted({p.parent for p in tmp.rglob("*")}, reverse=True):  # nested strategy dirs first
        _fsync_path(d)
    if final.exists():  # a re-save of the same step (e.g. resumed then signalled at once)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_path(final.parent)
    _write_latest(final.parent, final.name)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace one small file so that a kill at any byte leaves the old or the new one whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    _write_bytes_durably(tmp, data)
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _write_latest(root: Path, name: str) -> None:
    write_atomically(root / LATEST, name.encode())


def _remove_stale_temps(root: Path) -> None:
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def find_checkpoints(root: Path) -> list[CheckpointRef]:
    """Sealed checkpoints (a manifest present), oldest first. Integrity is checked on load."""
    if not root.is_dir():
        return []
    refs = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / MANIFEST).is_file():
            refs.append(CheckpointRef(p, int(m.group(1))))
    return sorted(refs, key=lambda r: r.step)


def latest_complete(root: Path) -> CheckpointRef | None:
    refs = find_checkpoints(root)
    return refs[-1] if refs else None


def _prune(root: Path, keep_last: int) -> None:
    refs = find_checkpoints(root)
    for ref in refs[: max(0, len(refs) - keep_last)]:
        shutil.rmtree(ref.path, ignore_errors=True)


def verify(ref: CheckpointRef) -> None:
    """Raise RunError naming the first file whose size or checksum disagrees with the manifest."""
    try:
        manifest = json.loads((ref.path / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"checkpoint {ref.path}: unreadable manifest ({err})") from None
    for name, meta in manifest["files"].items():
        p = ref.path / name
        if not p.is_file():
            raise RunError(f"checkpoint {ref.path}: file {name} is missing")
        if p.stat().st_size != meta["bytes"]:
            raise RunError(f"checkpoint {ref.path}: file {name} is truncated ({p.stat().st_size} of {meta['bytes']} bytes)")
        if _sha256(p) != meta["sha256"]:
            raise RunError(f"checkpoint {ref.path}: file {name} is corrupted (checksum mismatch)")


def load_path(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def load_file(ref: CheckpointRef, name: str) -> Any:
    return load_path(ref.path / name)


def resolve_resume(root: Path, fallback: bool, warn: Callable[[str], None]) -> CheckpointRef | None:
    """The newest checkpoint that verifies. With `fallback`, a damaged one is reported and the
    next older one tried; without it, damage is an error."""
    for ref in reversed(find_checkpoints(root)):
        try:
            verify(ref)
            return ref
        except RunError as err:
            if not fallback:
                raise RunError(err.problem, "resume with --resume auto to fall back to the previous checkpoint") from None
            warn(f"{err.problem}; falling back to an earlier checkpoint")
    return None
