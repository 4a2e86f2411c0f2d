"""train.budget: parsing, the planning maths with injected timings, and short runs end to end
(a budget run is the plain run of its resolved length; resume keeps that length)."""

from __future__ import annotations

import io
import json
import random

import pytest
from rich.console import Console

from shoestring.config import Budget, load_config, parse_budget
from shoestring.errors import UserError
from shoestring.train.budget import (BUDGET_FILE, BudgetClock, Costs, budget_seconds, count_due, planned_seconds,
                                     steady_interval, steps_that_fit)
from shoestring.train.metrics import read_metrics
from shoestring.train.report import print_summary
from shoestring.train.schedule import lr_at
from shoestring.train.trainer import Trainer

QUIET = Console(quiet=True)


@pytest.mark.parametrize("text, expected", [
    ("90s", Budget(90, "s")), ("3min", Budget(180, "s")), ("1h30m", Budget(5400, "s")), ("1.5h", Budget(5400, "s")),
    (" 2 min ", Budget(120, "s")), ("1m30s", Budget(90, "s")), ("$0.05", Budget(0.05, "$")), ("$2", Budget(2, "$")),
])
def test_budget_parses(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["90", "3 minutes", "0s", "$0", "$", "$-1", "-5s", "1h-30m", "$1e3", "inf", "abc", ""])
def test_bad_budget_is_refused(text):
    with pytest.raises(ValueError, match="is not a budget"):
        parse_budget(text)


def test_budget_in_config():
    assert load_config("configs/tiny.toml", ["train.budget=90s"]).train.budget == "90s"
    assert load_config("configs/tiny.toml", ["train.budget=none"]).train.budget is None
    with pytest.raises(UserError, match="train.budget: '90' is not a budget"):
        load_config("configs/tiny.toml", ["train.budget=\"90\""])
    with pytest.raises(UserError, match="warmup_steps >= 2"):
        load_config("configs/tiny.toml", ["train.budget=90s", "train.warmup_steps=1"])


def test_dollars_become_seconds_at_the_price_of_all_devices():
    assert budget_seconds("$0.09", devices=1, price_per_hour=0.09) == pytest.approx(3600)
    assert budget_seconds("$1", devices=4, price_per_hour=2.0) == pytest.approx(450)  # $8 an hour in all
    assert budget_seconds("2min", devices=4, price_per_hour=2.0) == 120  # a wall time is a wall time
    with pytest.raises(UserError, match="price per device-hour is 0"):
        budget_seconds("$1", devices=1, price_per_hour=0.0)


def test_steady_interval_leaves_out_the_first_step():
    assert steady_interval([0.0, 20.0, 21.0, 22.5, 23.5]) == 1.0  # 20 s of compile, then ~1 s steps
    assert steady_interval([0.0, 3.0]) == 3.0  # one step: all there is


def test_count_due_includes_the_last_step_once():
    assert count_due(0, 400, 100) == 4  # 100, 200, 300, 400 (the last is on the cadence)
    assert count_due(6, 250, 100) == 3  # 100, 200, and the last step
    assert count_due(6, 250, 0) == 1  # saves off: only the final one
    assert count_due(10, 10, 100) == 0


def _brute_force(seconds_left, done, costs, eval_every, save_every):
    n = done
    while planned_seconds(n + 1, done=done, costs=costs, eval_every=eval_every, save_every=save_every) <= seconds_left:
        n += 1
    return n


def test_steps_that_fit_with_injected_timings():
    costs = Costs(step_s=1.0, eval_s=5.0, save_s=2.0)
    # 100 s left after step 6. 80 steps: 74 steps + evals at 20, 40, 60, 80 + saves at 50, 80 = 98 s;
    # 81 steps: 75 + 5 evals (the last one off the cadence) + 2 saves = 104 s.
    n = steps_that_fit(100.0, done=6, costs=costs, eval_every=20, save_every=50)
    assert n == 80
    assert planned_seconds(80, done=6, costs=costs, eval_every=20, save_every=50) == 98.0
    assert planned_seconds(81, done=6, costs=costs, eval_every=20, save_every=50) == 104.0
    assert steps_that_fit(0.5, done=6, costs=costs, eval_every=20, save_every=50) == 6  # nothing fits: stop where it is
    rng = random.Random(0)
    for _ in range(200):
        costs = Costs(rng.uniform(0.01, 2), rng.uniform(0, 10), rng.uniform(0, 10))
        args = dict(done=rng.randint(0, 40), costs=costs, eval_every=rng.randint(1, 60), save_every=rng.randint(0, 90))
        left = rng.uniform(0, 300)
        assert steps_that_fit(left, **args) == _brute_force(left, **args)


# ---- end to end ---------------------------------------------------------------------------------
# The runs are real; the budget's clock is virtual, so that what they resolve to does not depend on
# how busy the machine is: it moves STEP_S per optimizer step and stands still otherwise (set-up,
# evals and saves cost nothing on it). A 1.5 s budget is resolved after 2 steps (0.2 s spent; timing the
# 4 more steps it would like to would take 0.4 s, more than a quarter of the 1.3 s left) into 2 + 13 steps,
# one less where floating point rounds the 13 that fit down.
STEP_S = 0.1
BUDGET_RUN = dict(train__budget="1.5s", train__steps=10_000, train__warmup_steps=4, train__eval_every=10,
                  train__log_every=5, run__save_every=0)


@pytest.fixture(autouse=True)
def step_clock(monkeypatch):
    clock = {"now": 1000.0}
    monkeypatch.setattr(BudgetClock, "now", staticmethod(lambda: clock["now"]))
    return clock


def _train(cfg, step_clock, after_step=None, **kw):
    def tick(trainer, step):
        step_clock["now"] += STEP_S
        if after_step is not None:
            after_step(trainer, step)

    trainer = Trainer(cfg, console=QUIET, after_step=tick)
    return trainer, trainer.run(**kw)


def _lrs(run_dir):
    return [r["lr"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_budget_run_is_the_plain_run_of_its_resolved_length(make_config, tmp_path, step_clock):
    run = tmp_path / "budget"
    _, summary = _train(make_config(run__dir=str(run), **BUDGET_RUN), step_clock)
    budget, n = summary["budget"], summary["steps_run"]
    assert budget["requested"] == "1.5s" and budget["steps"] == n and 14 <= n <= 15, budget
    assert budget["resolved_at_step"] == 2 and budget["costs"]["step_s"] == pytest.approx(STEP_S)
    assert json.loads((run / BUDGET_FILE).read_text())["steps"] == n
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == n  # the resolved config
    assert budget["spent_s"] > 0 and budget["spent_usd"] == pytest.approx(budget["spent_s"] / 3600 * 0.09)
    saved = json.loads((run / "summary.json").read_text())["budget"]
    assert saved["steps"] == n and saved["spent_s"] == budget["spent_s"]
    # The schedule is planned for the resolved length: warmup, then a cosine that ends on its floor
    # right after the last step (not cut off mid-decay, as a run planned for train.steps would be).
    t = make_config().train
    lrs = _lrs(run)
    planned = [lr_at(s, lr=t.lr, warmup_steps=4, total_steps=n, min_lr_ratio=t.min_lr_ratio) for s in range(n + 1)]
    assert lrs == planned[:n] and planned[n] == pytest.approx(t.lr * t.min_lr_ratio)
    assert lrs[-1] < lrs[-2] and lrs[-1] - planned[n] < 0.05 * (t.lr - planned[n])
    # The timed warm-up steps were real training: the same curve as a plain run of n steps.
    plain = tmp_path / "plain"
    _train(make_config(run__dir=str(plain), **{**BUDGET_RUN, "train__budget": None, "train__steps": n}), step_clock)
    losses = [[r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r] for d in (run, plain)]
    assert losses[0] == losses[1]


def test_budget_capped_by_steps(make_config, step_clock):
    _, summary = _train(make_config(**{**BUDGET_RUN, "train__budget": "1h", "train__steps": 12}), step_clock)
    budget = summary["budget"]
    assert summary["steps_run"] == 12 and budget["steps"] == 12 and budget["fit"] > 12
    assert budget["resolved_at_step"] == 4  # timed up to the end of the warmup: the LR after it depends on the count


def test_dollar_budget_at_the_configured_price(make_config, step_clock):
    # $0.00025 at $0.60 an hour is 1.5 s.
    _, summary = _train(make_config(**{**BUDGET_RUN, "train__budget": "$0.00025"}, run__price_per_hour=0.6), step_clock)
    budget = summary["budget"]
    assert budget["seconds"] == pytest.approx(1.5) and budget["budget_usd"] == pytest.approx(0.00025)
    assert 14 <= summary["steps_run"] == budget["steps"] <= 15
    assert budget["spent_usd"] == pytest.approx(budget["spent_s"] / 3600 * 0.6)


def test_resumed_budget_run_keeps_its_step_count(make_config, tmp_path, step_clock):
    cfg = make_config(**BUDGET_RUN)

    def stop_after_resolving(trainer, step):
        if trainer.budget.steps is not None and step == trainer.budget.at_step + 1:
            trainer.stop.requested = True

    _, first = _train(cfg, step_clock, after_step=stop_after_resolving)
    planned = json.loads((tmp_path / "run" / BUDGET_FILE).read_text())
    n = planned["steps"]
    assert first["steps_run"] == planned["at_step"] + 2 < n
    # Resumed with another budget on the command line: still the planned length, no new timing.
    _, resumed = _train(make_config(**{**BUDGET_RUN, "train__budget": "1h"}), step_clock, resume="auto")
    assert first["steps_run"] + resumed["steps_run"] == n == resumed["budget"]["steps"]
    assert json.loads((tmp_path / "run" / BUDGET_FILE).read_text()) == planned
    assert resumed["budget"]["spent_s"] > first["budget"]["spent_s"]  # earlier attempts count
    t = cfg.train
    assert _lrs(tmp_path / "run") == [lr_at(s, lr=t.lr, warmup_steps=4, total_steps=n, min_lr_ratio=t.min_lr_ratio)
                                      for s in range(n)]


def test_stopped_before_planning_plans_on_resume(make_config, tmp_path, step_clock):
    cfg = make_config(**BUDGET_RUN)

    def stop_at_once(trainer, step):
        trainer.stop.requested = True

    _, first = _train(cfg, step_clock, after_step=stop_at_once)
    assert first["steps_run"] == 1 and first["budget"]["steps"] is None
    out = io.StringIO()
    print_summary(Console(file=out, width=200), first, tmp_path / "run")
    assert "not planned yet" in out.getvalue()
    _, resumed = _train(cfg, step_clock, resume="auto")
    budget = resumed["budget"]
    assert 1 + resumed["steps_run"] == budget["steps"] and budget["resolved_at_step"] > 1
    assert budget["spent_s"] > first["budget"]["spent_s"]
