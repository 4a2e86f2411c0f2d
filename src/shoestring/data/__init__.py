"""Text -> tokenizer -> token shards on disk (memmap) -> packed, per-rank, resumable batches;
instruction data as chat-templated rows (`data.instruct`); a run's data from its config, either
kind behind one interface (`data.sources`)."""

from shoestring.data.corpus import iter_documents, resolve_corpus
from shoestring.data.loader import BatchSampler, n_windows, val_batches
from shoestring.data.shards import check_enough, ensure_prepared, load_manifest, open_split, prepare
from shoestring.data.tokenizer import EOT, EOT_ID, load_tokenizer, save_tokenizer, tokenizer_hash, train_tokenizer

__all__ = [
    "EOT",
    "EOT_ID",
    "BatchSampler",
    "check_enough",
    "ensure_prepared",
    "iter_documents",
    "load_manifest",
    "load_tokenizer",
    "n_windows",
    "open_split",
    "prepare",
    "resolve_corpus",
    "save_tokenizer",
    "tokenizer_hash",
    "train_tokenizer",
    "val_batches",
]
