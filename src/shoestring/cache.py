"""The per-user cache (`$XDG_CACHE_HOME/shoestring`, else ~/.cache/shoestring): what is slow to
measure or derive and the same until its inputs change (the probe's measurements, a GGUF file's
rebuilt tokenizer). Everything in it can be deleted; a read-only home only loses the speed-up."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "shoestring"


def read_json(path: Path) -> Any | None:
    """What `path` holds, or None when it is missing or unreadable (half-written by a run that
    died, or from another version): the caller measures or derives it again."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_atomic(path: Path, text: str) -> None:
    """Write `text` whole or not at all (a concurrent reader never sees half a file); a cache that
    cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError:
        pass
