"""A run's training data from its config, behind one interface (`TrainingData`): the token
shards of a text corpus (`text_data`), or instruction data read through a source model's
tokenizer and chat template (`instruct_data`). The trainer calls the one that `data.format`
names; for a source model the result also carries the source (weights + tokenizer), read once
and handed to `build`, and its HF config and tokenizer files are saved into the run directory
(`rundir.BASE_DIR`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from shoestring import dist
from shoestring.config import Config
from shoestring.data.instruct import InstructRows, InstructSampler, formatter, instruct_val_batches, load_instruct, pad_id
from shoestring.data.loader import Batch, BatchSampler, val_batches
from shoestring.data.shards import check_enough, ensure_prepared, open_split
from shoestring.errors import UserError
from shoestring.models.hf import HFSource, read_source
from shoestring.rundir import save_base


@dataclass
class TrainingData:
    vocab: int
    sampler: Callable[[int, int], BatchSampler]  # (rank, world_size) -> sampler
    val_batches: Callable[[int, int], list[Batch]]  # (batch, n_batches) -> fixed eval batches
    unigram: float
    source: HFSource | None = None


def prepared_dir(cfg: Config) -> Path:
    """Where a text corpus's tokenizer and token shards live (`data.prepared_dir`, or one
    directory per corpus and vocabulary size under data/prepared)."""
    if cfg.data.prepared_dir:
        return Path(cfg.data.prepared_dir)
    name = Path(cfg.data.corpus).name.replace(".", "_") or "corpus"
    return Path("data/prepared") / f"{name}-v{cfg.data.vocab_size}"


def unigram_baseline(train: np.ndarray, val: np.ndarray, vocab: int) -> float:
    """Cross-entropy (nats) of the val split under the train split's token frequencies (add-one
    smoothed): the loss a model that ignores context would reach (nan for an empty val split)."""
    counts = np.bincount(np.asarray(train), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val)].mean()) if len(val) else float("nan")


def instruct_data(cfg: Config, run_dir: Path, say: Callable[[str], None] = print) -> TrainingData:
    src = read_source(cfg.model.source)
    if cfg.data.seq_len > src.args.max_seq_len:
        raise UserError(f"data.seq_len ({cfg.data.seq_len}) is longer than the model's context ({src.args.max_seq_len})")
    if dist.is_main():
        save_base(src, run_dir)
    data = load_instruct(Path(cfg.data.corpus), formatter(src.tokenizer, src.tokenizer_config), cfg.data.seq_len,
                         pad_id(src.tokenizer, src.tokenizer_config), cfg.data.val_fraction, cfg.data.skip_malformed,
                         cfg.data.packing)
    if data.skipped or data.train.too_long or data.val.too_long:
        say(f"instruction data: {data.skipped} malformed lines skipped, "
            f"{data.train.too_long + data.val.too_long} examples longer than seq_len+1 dropped")
    say(describe_rows(data.train, cfg.data.packing))
    t = cfg.train
    return TrainingData(
        vocab=src.args.vocab_size,
        sampler=lambda rank, world: InstructSampler(data.train, t.batch_size, t.grad_accum, rank, world, t.seed),
        val_batches=lambda batch, n: instruct_val_batches(data.val if len(data.val) else data.train, batch, n),
        unigram=unigram_baseline(data.train.target_tokens(), data.val.target_tokens(), src.args.vocab_size),
        source=src,
    )


def describe_rows(rows: InstructRows, packing: bool) -> str:
    examples, real = sum(len(n) for n in rows.lengths), sum(sum(n) for n in rows.lengths)
    how = "packed" if packing else "padded, one per row"
    return (f"instruction data: {examples} training examples in {len(rows)} rows of {rows.x.shape[1]} ({how}), "
            f"{1 - real / rows.x.size:.1%} padding")


def text_data(cfg: Config) -> TrainingData:
    """A text corpus's token shards (prepared by one rank on first use)."""
    data_dir = prepared_dir(cfg)
    if dist.is_main():  # one rank tokenizes; the others then find the shards ready
        ensure_prepared(cfg.data.corpus, data_dir, cfg.data.vocab_size, cfg.data.val_fraction)
    dist.barrier()
    manifest = ensure_prepared(cfg.data.corpus, data_dir, cfg.data.vocab_size, cfg.data.val_fraction)
    check_enough(manifest, "train", cfg.data.seq_len, cfg.train.batch_size)
    train_tokens, val_tokens = open_split(data_dir, "train"), open_split(data_dir, "val")
    vocab, t = manifest["vocab_size"], cfg.train
    return TrainingData(
        vocab=vocab,
        sampler=lambda rank, world: BatchSampler(train_tokens, cfg.data.seq_len, t.batch_size, t.grad_accum,
                                                 rank=rank, world_size=world, seed=t.seed),
        val_batches=lambda batch, n: val_batches(val_tokens, cfg.data.seq_len, batch, n),
        unigram=unigram_baseline(train_tokens, val_tokens, vocab),
    )
