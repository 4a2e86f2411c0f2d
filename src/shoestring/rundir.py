"""What a run directory (`run.dir`) holds, named once, and the readers and writers of its files:

    config.json      the resolved config the run trained with (what `export`, `generate` read back)
    metrics.jsonl    one record per step and per eval
    summary.json     tokens, time, peak memory, MFU, $ at the run's price
    checkpoints/     atomic checkpoints (`shoestring.checkpoint`)
    hf_base/         a source model's HF config and tokenizer files (fine-tuning runs), so
                     generation and export need only the run directory, not the source
"""

from __future__ import annotations

import json
from pathlib import Path

from shoestring.config import Config, build_config
from shoestring.errors import UserError
from shoestring.models.hf import HFSource

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
BASE_DIR = "hf_base"


def run_config(run_dir: Path) -> Config:
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no {CONFIG_FILE})", "give the run.dir of a training run")
    return build_config(json.loads(cfg_path.read_text()), str(cfg_path))


def save_base(src: HFSource, run_dir: Path) -> None:
    out = run_dir / BASE_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(src.config, indent=2, default=str))
    src.tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(src.tokenizer_config, indent=2, default=str))
