"""Fine-tuning glue: a run's data and base model from `model.source`, and a fine-tuned run back.

The trainer asks `open_data(cfg, run_dir)` for its data whatever the format; for a source model
the result also carries the source (weights + tokenizer), read once and handed to `build`.
The source's HF config and tokenizer files are copied into `RUN_DIR/hf_base/`, so generation and
export of the run need only the run directory, not the source.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tokenizers import Tokenizer

from shoestring.config import Config
from shoestring.data.instruct import ChatFormatter, InstructSampler, instruct_val_batches, load_instruct
from shoestring.data.loader import Batch, BatchSampler, val_batches
from shoestring.errors import UserError
from shoestring.levers.lora import LoRASettings
from shoestring.models.hf import HFSource, args_from_hf_config, read_source, read_tokenizer_dir
from shoestring.models.llama import Llama

BASE_DIR = "hf_base"
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token")


@dataclass
class TrainingData:
    vocab: int
    sampler: Callable[[int, int], BatchSampler]  # (rank, world_size) -> sampler
    val_batches: Callable[[int, int], list[Batch]]  # (batch, n_batches) -> fixed eval batches
    unigram: float
    source: HFSource | None = None


def lora_settings(cfg: Config, quantize: bool = True) -> LoRASettings:
    """The lever's settings; an NF4 base dequantises into the compute dtype (fp32 under fp32).
    `quantize=False`: the same modules over a plain base (a checkpoint's dequantised weights)."""
    c = cfg.lora
    if c.base_dtype == "nf4":
        from shoestring.levers.precision import PrecisionPolicy

        dtype = PrecisionPolicy(cfg.precision.mode).compute_dtype
    else:
        dtype = torch.bfloat16 if c.base_dtype == "bf16" else torch.float32
    return LoRASettings(rank=c.rank, alpha=c.alpha, dropout=c.dropout, targets=tuple(c.targets), base_dtype=dtype,
                        nf4=quantize and c.base_dtype == "nf4")


def special_tokens(tok_cfg: dict) -> dict[str, str]:
    """bos/eos/pad strings for the chat template (tokenizer_config may hold them as dicts)."""
    out = {}
    for name in SPECIAL_TOKENS:
        v = tok_cfg.get(name)
        if isinstance(v, dict):
            v = v.get("content")
        out[name] = v or ""
    return out


def formatter(tokenizer: Tokenizer, tok_cfg: dict) -> ChatFormatter:
    return ChatFormatter(tokenizer, tok_cfg.get("chat_template"), special_tokens(tok_cfg))


def pad_id(tokenizer: Tokenizer, tok_cfg: dict) -> int:
    """Padding never reaches the loss (targets are ignored there); any valid id will do."""
    for name in ("pad_token", "eos_token"):
        token = special_tokens(tok_cfg)[name]
        if token and tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    return 0


def save_base(src: HFSource, run_dir: Path) -> None:
    out = run_dir / BASE_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(src.config, indent=2, default=str))
    src.tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(src.tokenizer_config, indent=2, default=str))


def _unigram(train: np.ndarray, val: np.ndarray, vocab: int) -> float:
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    return float(-np.log(counts / counts.sum())[val].mean()) if len(val) else float("nan")


def instruct_data(cfg: Config, run_dir: Path, warn: Callable[[str], None] = print) -> TrainingData:
    src = read_source(cfg.model.source)
    if cfg.data.seq_len > src.args.max_seq_len:
        raise UserError(f"data.seq_len ({cfg.data.seq_len}) is longer than the model's context ({src.args.max_seq_len})")
    from shoestring import dist

    if dist.is_main():
        save_base(src, run_dir)
    data = load_instruct(Path(cfg.data.corpus), formatter(src.tokenizer, src.tokenizer_config), cfg.data.seq_len,
                         pad_id(src.tokenizer, src.tokenizer_config), cfg.data.val_fraction, cfg.data.skip_malformed)
    if data.skipped or data.train.too_long or data.val.too_long:
        warn(f"instruction data: {data.skipped} malformed lines skipped, "
              f"{data.train.too_long + data.val.too_long} examples longer than seq_len+1 dropped")
    t = cfg.train
    return TrainingData(
        vocab=src.args.vocab_size,
        sampler=lambda rank, world: InstructSampler(data.train, t.batch_size, t.grad_accum, rank, world, t.seed),
        val_batches=lambda batch, n: instruct_val_batches(data.val if len(data.val) else data.train, batch, n),
        unigram=_unigram(data.train.target_tokens(), data.val.target_tokens(), src.args.vocab_size),
        source=src,
    )


def text_data(cfg: Config, data_dir: Path) -> TrainingData:
    """The token-shard path (unchanged behaviour, behind the same interface)."""
    from shoestring.data.shards import check_enough, ensure_prepared, open_split
    from shoestring import dist
    from shoestring.train.trainer import unigram_baseline

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


# ---- a fine-tuned run back --------------------------------------------------------------------
@dataclass
class RunModel:
    cfg: Config
    model: Llama  # LoRA modules present (unmerged) when the run used LoRA
    tokenizer: Tokenizer
    tokenizer_config: dict
    hf_config: dict | None  # the source's config, None for a preset model


def load_run(run_dir: Path) -> RunModel:
    """The newest checkpoint's model (fp32, eval mode, CPU) with the structure it was trained in."""
    from shoestring.build import build_plain_model, shape_model
    from shoestring.data.tokenizer import load_tokenizer
    from shoestring.export import checkpoint_weights, run_config
    from shoestring.models import build_model
    from shoestring.train.trainer import prepared_dir

    cfg = run_config(run_dir)
    weights, _ = checkpoint_weights(run_dir)  # consolidated from the shards of any strategy
    if cfg.model.source:
        tokenizer, tok_cfg = read_tokenizer_dir(run_dir / BASE_DIR)
        hf_config = json.loads((run_dir / BASE_DIR / "config.json").read_text())
        model = build_model(args_from_hf_config(hf_config), "cpu")
    else:
        tokenizer, tok_cfg, hf_config = load_tokenizer(prepared_dir(cfg) / "tokenizer.json"), {}, None
        model = build_plain_model(cfg, tokenizer.get_vocab_size(), torch.device("cpu"))
    shape_model(cfg, model, quantize=False)  # an NF4 base comes back dequantised
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    for p in model.parameters():
        p.data = p.data.float()
    return RunModel(cfg, model.eval(), tokenizer, tok_cfg, hf_config)
