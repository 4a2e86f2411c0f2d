"""The model learns the corpus: val loss well below the unigram baseline, and samples shaped like
the plays (clean text, speaker lines such as "Ham.") where an untrained model emits byte junk."""

from __future__ import annotations

import re

from rich.console import Console

from shoestring.generate import load_run_model, sample
from shoestring.train.trainer import Trainer

SPEAKER_LINE = re.compile(r"^[A-Z][a-z]+\.$", re.MULTILINE)  # "Ham.", "Oth." open each speech


def text_fraction(text: str) -> float:
    """Share of characters that are letters, spaces or ordinary punctuation."""
    return sum(c.isalpha() or c in " \n.,;:!?'-" for c in text) / max(1, len(text))


def samples(model, tokenizer, n: int = 3) -> list[str]:
    prompt = tokenizer.encode("HAMLET.\n").ids
    return [tokenizer.decode(sample(model, prompt, 150, temperature=0.7, seed=s)) for s in range(n)]


def test_learns_well_below_unigram_and_samples_look_like_the_plays(make_config, tmp_path):
    cfg = make_config(train__steps=200, train__batch_size=16, train__lr=1e-2, train__warmup_steps=10,
                      train__eval_every=200, train__eval_batches=8, train__log_every=50,
                      precision__mode="bf16", run__save_every=0)
    summary = Trainer(cfg, console=Console(quiet=True)).run()
    assert summary["final_val_loss"] < summary["unigram_val_loss"] - 0.5, summary

    model, tokenizer = load_run_model(tmp_path / "run")
    trained = samples(model, tokenizer)
    for p in model.parameters():  # the same network, untrained
        p.data.normal_(0, 0.02)
    untrained = samples(model, tokenizer)
    assert min(map(text_fraction, trained)) > 0.97, trained
    assert max(map(text_fraction, untrained)) < 0.9, untrained  # the measure does discriminate
    assert sum(len(SPEAKER_LINE.findall(t)) for t in trained) >= 3, trained
    assert sum(len(SPEAKER_LINE.findall(t)) for t in untrained) == 0, untrained
