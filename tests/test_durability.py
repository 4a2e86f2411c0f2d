"""Durable runs, through the real command line in subprocesses: SIGKILL at random moments and
inside checkpoint writes, SIGTERM, and resume that continues the uninterrupted loss curve
bitwise (fp32, CPU)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from shoestring import checkpoint as ckpt
from shoestring.train.metrics import read_metrics
from tests.runs import write_config

HARNESS = Path(__file__).with_name("killing.py")


def cli(*args: str, signal_at: tuple[str, int] = ("none", 0)) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HARNESS), signal_at[0], str(signal_at[1]), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def curve(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_file(ckpt.latest_complete(run / "checkpoints"), "strategy.pt")["model"]


def test_sigkill_anywhere_then_resume_equals_uninterrupted(make_config, tmp_path):
    steps = dict(train__steps=40, run__save_every=3, train__eval_every=10)
    ref_cfg = write_config(make_config, tmp_path / "ref.toml", run__dir=str(tmp_path / "ref"), **steps)
    code, out = finish(cli("train", str(ref_cfg)))
    assert code == 0, out

    run = tmp_path / "killed"
    cfg = write_config(make_config, tmp_path / "killed.toml", run__dir=str(run), **steps)
    # Deterministic kills inside the 1st..4th durable writes of saves (trainer.pt, strategy.pt,
    # MANIFEST.json, the `latest` pointer), then kills at random moments.
    for n in (1, 6, 11, 16):
        code, out = finish(cli("train", str(cfg), "--resume", "auto", signal_at=("kill-write", n)))
        assert code == -signal.SIGKILL, out
    rng = random.Random(0)
    for _ in range(3):
        proc = cli("train", str(cfg), "--resume", "auto")
        time.sleep(rng.uniform(1.0, 5.0))
        proc.kill()
        finish(proc)
    code, out = finish(cli("train", str(cfg), "--resume", "auto"))
    assert code == 0, out

    assert curve(run) == curve(tmp_path / "ref")
    ref_w, got_w = final_weights(tmp_path / "ref"), final_weights(run)
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)


def test_sigterm_saves_and_resumes_identically(make_config, tmp_path):
    steps = dict(train__steps=20, run__save_every=0, train__eval_every=1000)
    ref_cfg = write_config(make_config, tmp_path / "ref.toml", run__dir=str(tmp_path / "ref"), **steps)
    assert finish(cli("train", str(ref_cfg)))[0] == 0

    run = tmp_path / "term"
    cfg = write_config(make_config, tmp_path / "term.toml", run__dir=str(run), **steps)
    code, out = finish(cli("train", str(cfg), signal_at=("term-step", 7)))
    assert code == 0, out
    assert "stopped at step 8" in out and "--resume auto" in out  # the step in flight finishes
    assert ckpt.latest_complete(run / "checkpoints").step == 8
    code, out = finish(cli("train", str(run / "config.json"), "--resume", "auto"))  # as the stop message says
    assert code == 0, out
    assert curve(run) == curve(tmp_path / "ref")
    ref_w, got_w = final_weights(tmp_path / "ref"), final_weights(run)
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)


def test_second_signal_aborts_at_once(make_config, tmp_path):
    run = tmp_path / "abort"
    cfg = write_config(make_config, tmp_path / "abort.toml", run__dir=str(run), train__steps=20, run__save_every=2)
    code, out = finish(cli("train", str(cfg), signal_at=("term-twice", 5)))
    assert code == 130 and "aborting without saving" in out, out
    assert ckpt.latest_complete(run / "checkpoints").step == 4  # nothing written after the abort
