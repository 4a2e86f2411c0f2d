"""Corpus -> tokenizer + token shards on disk, and the checks that make reading them safe.

A prepared directory holds `train.bin` and `val.bin` (raw uint16 token ids, uint32 for vocabularies
over 65536), `tokenizer.json` and `manifest.json`. Raw arrays are memory-mapped, so every rank reads
the same bytes with no per-process copy and no loading time.

The split is the tail of the token stream: the last `val_fraction` of tokens (documents laid end to
end in corpus order, each followed by EOT) is validation. That gives the exact requested fraction
even for a corpus of a few long documents, where a per-document split would be lumpy; the price
is that one document may straddle the boundary. The tokenizer is trained on all of it, as usual.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn
from tokenizers import Tokenizer

from shoestring import __version__
from shoestring.data.corpus import iter_documents, resolve_corpus
from shoestring.data.loader import n_windows
from shoestring.data.tokenizer import EOT_ID, TOKENIZER_FILE, load_tokenizer, save_tokenizer, tokenizer_hash, train_tokenizer
from shoestring.errors import UserError

MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val")
FORMAT = 1
_CHUNK_CHARS = 1 << 20  # documents per encode_batch call: enough to keep every core busy


def _fingerprint(paths: list[Path]) -> str:
    """Names and sizes of the source files: cheap, and enough to notice an edited corpus."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.name}\t{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _counted(documents: Iterable[str], bar: Progress, task: TaskID) -> Iterator[str]:
    for doc in documents:
        bar.advance(task, len(doc))
        yield doc


def _chunks(documents: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    chunk, chars = [], 0
    for doc in documents:
        chunk.append(doc)
        chars += len(doc)
        if chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _encode(tok: Tokenizer, documents: Iterable[str], path: Path, dtype: np.dtype) -> dict[str, int]:
    """Stream every document, EOT after each, into one raw file; returns the counts."""
    counts = {"documents": 0, "characters": 0, "tokens": 0}
    with path.open("wb") as f:
        for chunk in _chunks(documents, _CHUNK_CHARS):
            ids = np.concatenate([np.array(enc.ids + [EOT_ID], dtype=dtype) for enc in tok.encode_batch(chunk)])
            f.write(ids.tobytes())
            counts["documents"] += len(chunk)
            counts["characters"] += sum(map(len, chunk))
            counts["tokens"] += len(ids)
    return counts


def _check_replaceable(out_dir: Path) -> None:
    # Replacing a directory deletes it: only ever do that to one of ours (or an empty one).
    foreign = not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).exists())
    if out_dir.exists() and foreign:
        raise UserError(f"{out_dir} exists and is not a prepared data directory", "choose another data.prepared_dir")


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Readers see the old complete directory, then (after a moment with none) the new complete one."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def prepare(corpus: str, out_dir: Path, vocab_size: int, val_fraction: float, progress: bool = True) -> dict[str, Any]:
    """Build a prepared directory from scratch, atomically: a killed run leaves only a hidden temp dir."""
    out_dir = Path(out_dir)
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction {val_fraction} must lie strictly between 0 and 1")
    _check_replaceable(out_dir)
    paths = resolve_corpus(corpus)
    size = sum(p.stat().st_size for p in paths)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run that had our pid
    tmp.mkdir(parents=True)
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            task = bar.add_task(f"{corpus}: training tokenizer", total=size)
            tok = train_tokenizer(_counted(iter_documents(paths), bar, task), vocab_size)
            bar.update(task, completed=size)
            dtype = _dtype(tok.get_vocab_size())
            task = bar.add_task(f"{corpus}: encoding", total=size)
            counts = _encode(tok, _counted(iter_documents(paths), bar, task), tmp / "train.bin", dtype)
            bar.update(task, completed=size)

        n_val = round(counts["tokens"] * val_fraction)
        n_train = counts["tokens"] - n_val
        if min(n_train, n_val) < 2:
            raise UserError(
                f"corpus {corpus!r} is too small: {counts['tokens']} tokens leave {n_val} for validation",
                "add text or raise data.val_fraction",
            )
        np.fromfile(tmp / "train.bin", dtype=dtype, offset=n_train * dtype.itemsize).tofile(tmp / "val.bin")
        os.truncate(tmp / "train.bin", n_train * dtype.itemsize)
        save_tokenizer(tok, tmp / TOKENIZER_FILE)

        manifest = {
            "format": FORMAT,
            "source": corpus,
            "files": len(paths),
            "fingerprint": _fingerprint(paths),
            "documents": counts["documents"],
            "characters": counts["characters"],
            "tokens": {"train": n_train, "val": n_val},
            "val_fraction": val_fraction,
            "dtype": dtype.name,
            "requested_vocab_size": vocab_size,
            "vocab_size": tok.get_vocab_size(),
            "eot_id": EOT_ID,
            "tokenizer_hash": tokenizer_hash(tok),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "shoestring_version": __version__,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap
    return manifest


def load_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a prepared directory, after checking that the shards and tokenizer agree with it."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise UserError(
            f"{directory} is not a prepared data directory (no {MANIFEST_FILE})", "prepare it first: `shoestring data prepare`"
        )
    try:
        manifest = json.loads(path.read_text())
        dtype = np.dtype(manifest["dtype"])
        sizes = {split: manifest["tokens"][split] * dtype.itemsize for split in SPLITS}
        expected_hash = manifest["tokenizer_hash"]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: unreadable manifest ({err!r})", f"delete {directory} and prepare again") from None
    for split, size in sizes.items():
        shard = directory / f"{split}.bin"
        actual = shard.stat().st_size if shard.is_file() else None
        if actual != size:
            raise UserError(
                f"{shard}: {'missing' if actual is None else f'{actual} bytes'}, the manifest says {size} bytes",
                f"the directory is damaged; delete {directory} and prepare again",
            )
    if tokenizer_hash(load_tokenizer(directory)) != expected_hash:
        raise UserError(
            f"{directory / TOKENIZER_FILE}: tokenizer does not match the shards (hash differs from the manifest)",
            f"restore the tokenizer.json it was prepared with, or delete {directory} and prepare again",
        )
    return manifest


def open_split(directory: Path, split: str) -> np.memmap:
    """The token ids of one split, memory-mapped read-only."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    manifest = load_manifest(directory)
    path = Path(directory) / f"{split}.bin"
    return np.memmap(path, dtype=manifest["dtype"], mode="r", shape=(manifest["tokens"][split],))


@contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    # Ranks on one machine all call ensure_prepared: one prepares, the others then reuse.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.with_name(f".{out_dir.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_prepared(corpus: str, out_dir: Path, vocab_size: int, val_fraction: float, progress: bool = True) -> dict[str, Any]:
    """Reuse `out_dir` when it was prepared from the same source files with the same settings, else prepare."""
    out_dir = Path(out_dir)
    with _locked(out_dir):
        if (out_dir / MANIFEST_FILE).is_file():
            manifest = load_manifest(out_dir)
            wanted = {"source": corpus, "requested_vocab_size": vocab_size, "val_fraction": val_fraction,
                      "fingerprint": _fingerprint(resolve_corpus(corpus))}
            if all(manifest.get(k) == v for k, v in wanted.items()):
                return manifest
        return prepare(corpus, out_dir, vocab_size, val_fraction, progress)


def check_enough(manifest: dict[str, Any], split: str, seq_len: int, n_sequences: int) -> None:
    """Fail before training when a split cannot supply `n_sequences` sequences of seq_len+1 tokens."""
    tokens = manifest["tokens"][split]
    have = n_windows(tokens, seq_len)
    if have < n_sequences:
        raise UserError(
            f"the {split} split of {manifest['source']!r} has {tokens} tokens = {have} sequences of {seq_len}+1, "
            f"but {n_sequences} are needed",
            "use a larger corpus, a smaller data.seq_len or a smaller batch"
            + (", or a larger data.val_fraction" if split == "val" else ""),
        )
