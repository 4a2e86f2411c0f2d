"""Byte-level BPE, trained on the corpus itself.

Byte-level means every string round-trips exactly and nothing is ever out of vocabulary, so a
small vocabulary trained in seconds is enough for a small model. `<|endoftext|>` is id 0 and
separates documents in the token stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from shoestring.errors import UserError

EOT = "<|endoftext|>"
EOT_ID = 0
TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    """Same documents and size -> same tokenizer (the BPE trainer breaks ties deterministically).

    The result has at least 257 entries (256 bytes + EOT) and may have fewer than `vocab_size`
    when the corpus runs out of pairs to merge; read the real size from `get_vocab_size()`.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return _literal_specials(tok)


def _literal_specials(tok: Tokenizer) -> Tokenizer:
    # A document that merely contains the text "<|endoftext|>" must not inject a separator.
    # This switch is not serialised, so every way of obtaining a tokenizer goes through here.
    tok.encode_special_tokens = True
    return tok


def save_tokenizer(tok: Tokenizer, path: Path) -> Path:
    """Write `tokenizer.json` into the directory `path` (or to `path` itself when it names a file)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    tok.save(str(path))
    return path


def load_tokenizer(path: Path) -> Tokenizer:
    """Read a tokenizer from a `tokenizer.json` or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"{path}: tokenizer not found", "prepare the data first (it writes tokenizer.json)")
    try:
        return _literal_specials(Tokenizer.from_file(str(path)))
    except Exception as err:  # the Rust side raises a bare Exception for any malformed file
        raise UserError(f"{path}: not a valid tokenizer ({err})", "delete its directory and prepare again") from None


def tokenizer_hash(tok: Tokenizer) -> str:
    """Short fingerprint of the vocabulary and merges: shards are only meaningful with this exact tokenizer."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()[:16]
