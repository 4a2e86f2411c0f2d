"""The training loop end to end on a micro model: determinism, precision, resume, NaN handling."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from shoestring.errors import RunError, UserError
from shoestring.parallel.single import SingleDevice
from shoestring.train.metrics import read_metrics
from shoestring.train.trainer import Trainer

QUIET = Console(quiet=True)


def train(cfg, **kw):
    trainer = Trainer(cfg, console=QUIET, **{k: v for k, v in kw.items() if k == "after_step"})
    summary = trainer.run(**{k: v for k, v in kw.items() if k != "after_step"})
    return trainer, summary


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def params(trainer):
    return {k: v.detach().clone() for k, v in trainer.strategy.unwrapped().state_dict().items()}


def test_same_seed_same_curve_bitwise(make_config, tmp_path):
    a, _ = train(make_config(run__dir=str(tmp_path / "a")))
    b, _ = train(make_config(run__dir=str(tmp_path / "b")))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    for k, v in params(a).items():
        assert torch.equal(v, params(b)[k]), k


def test_summary_and_outputs(make_config, tmp_path):
    cfg = make_config()
    _, summary = train(cfg)
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["model"]["preset"] == "micro"
    saved = json.loads((run / "summary.json").read_text())
    assert saved["tokens"] == 12 * 8 * 64 and saved["steps_run"] == 12
    assert saved["final_val_loss"] < saved["unigram_val_loss"] + 1.0
    mem = saved["memory_bytes"]
    assert mem["params"] > 0 and mem["grads"] == mem["params"]  # fp32 grads, as held at the step
    assert 2 * mem["params"] <= mem["optimizer"] < 2 * mem["params"] + 4096  # exp_avg, exp_avg_sq (+ step scalars)
    assert mem["activations_saved"] > 0 and summary["cost_usd"] > 0
    assert len(losses(run)) == 12


@pytest.mark.parametrize("mode, tol", [("bf16", 0.05), ("fp16", 0.05), ("bf16-pure", 0.08)])
def test_low_precision_follows_fp32(make_config, tmp_path, mode, tol):
    steps = dict(train__steps=50, train__eval_every=50, run__save_every=0)
    train(make_config(run__dir=str(tmp_path / "fp32"), **steps))
    train(make_config(run__dir=str(tmp_path / mode), precision__mode=mode, **steps))
    ref, low = losses(tmp_path / "fp32"), losses(tmp_path / mode)
    worst = max(abs(a - b) / a for a, b in zip(ref, low))
    assert worst < tol, f"{mode} departs from fp32 by {worst:.3%} (relative) at worst"
    assert low[-1] < low[0] - 1.0  # and it learns


def _inject(monkeypatch, at_calls: set[int], factor: float):
    """Multiply the loss scale of chosen forward_backward calls by `factor` (inf/nan injection)."""
    original = SingleDevice.forward_backward
    calls = {"n": 0}

    def patched(self, x, y, loss_scale, last):
        n = calls["n"]
        calls["n"] += 1
        return original(self, x, y, loss_scale * factor if n in at_calls else loss_scale, last)

    monkeypatch.setattr(SingleDevice, "forward_backward", patched)


def test_fp16_overflow_skips_that_step_and_recovers(make_config, tmp_path, monkeypatch):
    _inject(monkeypatch, {3}, float("inf"))
    trainer, _ = train(make_config(precision__mode="fp16", precision__init_scale=1024.0))
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["skipped"] for r in records].count(True) == 1 and records[3]["skipped"]
    assert trainer.strategy.scaler.get_scale() < 1024.0  # the scale backed off
    assert records[-1]["loss"] < records[0]["loss"]
    assert all(torch.isfinite(p).all() for p in trainer.strategy.unwrapped().parameters())


def test_nan_stop_policy_names_the_step_and_keeps_weights(make_config, monkeypatch):
    _inject(monkeypatch, {5}, float("nan"))
    with pytest.raises(RunError, match="step 5") as err:
        train(make_config())
    assert "step_00000004" in err.value.problem  # the last good checkpoint is named


def test_nan_skip_policy_skips_up_to_limit(make_config, tmp_path, monkeypatch):
    _inject(monkeypatch, {2, 7}, float("nan"))
    trainer, _ = train(make_config(train__nan_policy="skip", train__max_nan_skips=2))
    skipped = [r["skipped"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert skipped.count(True) == 2
    assert all(torch.isfinite(p).all() for p in trainer.strategy.unwrapped().parameters())
    monkeypatch.undo()
    _inject(monkeypatch, {1, 2, 3}, float("nan"))
    with pytest.raises(RunError, match="non-finite"):
        train(make_config(train__nan_policy="skip", train__max_nan_skips=2), overwrite=True)


@pytest.mark.parametrize("mode", ["fp32", "fp16", "bf16-pure"])
def test_stop_and_resume_equals_uninterrupted(make_config, tmp_path, mode):
    full, _ = train(make_config(run__dir=str(tmp_path / "full"), precision__mode=mode))

    def stop_at_5(trainer, step):
        if step == 5:
            trainer.stop.requested = True

    cfg = make_config(run__dir=str(tmp_path / "cut"), precision__mode=mode)
    _, first = train(cfg, after_step=stop_at_5)
    assert first["steps_run"] == 6
    resumed, _ = train(cfg, resume="auto")
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    for k, v in params(full).items():
        assert torch.equal(v, params(resumed)[k]), k


def test_run_dir_holding_a_run_is_refused(make_config):
    train(make_config())
    with pytest.raises(UserError, match="already holds this run"):
        train(make_config())
    with pytest.raises(UserError, match="already holds a different run"):
        train(make_config(train__lr=1e-3))
    train(make_config(train__lr=1e-3), overwrite=True)


def test_resume_refuses_run_changing_config(make_config):
    train(make_config())
    with pytest.raises(UserError, match="train.batch_size"):
        train(make_config(train__batch_size=16, train__steps=20), resume="auto")
    _, summary = train(make_config(train__steps=16), resume="auto")  # more steps: allowed
    assert summary["steps_run"] == 4
