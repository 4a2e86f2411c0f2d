"""Hybrid sharding (`parallel.shard_group`) on gloo, 4 ranks as 2 groups x 2, through the real
launcher: FSDP2 on a 2-D mesh follows the single-process loss curve; the bytes each rank sends
within its group and across groups, as the comm meter measures them, are the planner's
prediction from the strategy's cost model; a hybrid checkpoint resumes on 2 ranks, as one group
of 2 and flat. Few and tiny: 4 ranks share the machine's cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shoestring.build import build_plain_model
from shoestring.config import build_config
from shoestring.parallel.cost import Collective
from shoestring.plan.memory import Levers, strategy_cost
from shoestring.plan.model import ModelInfo, full_trainable
from shoestring.plan.network import ring_of
from tests.test_parallel import FP32_REL, Runs, _truncate_after, assert_same_curve, curve, train_cli

RUN = dict(train__steps=8, train__eval_every=4, train__grad_accum=2, run__save_every=4, run__keep_last=2)
HYBRID = dict(parallel__strategy="fsdp2", parallel__shard_group=2)
SCALARS = 256  # bytes: the gradient norm's scalar all-reduces (DTensor's own), which no cost model lists


@pytest.fixture(scope="module")
def runs(corpus_dir, prepared, tmp_path_factory) -> Runs:
    return Runs(corpus_dir, prepared, tmp_path_factory.mktemp("hybrid"))


@pytest.fixture(scope="module")
def hybrid(runs) -> Path:
    code, out = train_cli(runs.config("hybrid", **RUN, **HYBRID), nproc=4, timeout=400)
    assert code == 0, out
    return runs.root / "hybrid"


def predicted_by_span(run: Path) -> dict[str, float]:
    """What the planner says one rank of this run sends per step, by span."""
    cfg = build_config(json.loads((run / "config.json").read_text()))
    model = build_plain_model(cfg, 512, torch.device("cpu"))
    info = ModelInfo("micro", model.args, tuple(tuple(p.shape) for p in model.parameters()))
    levers = Levers("fp32", "none", "fsdp2", grad_accum=cfg.train.grad_accum, shard_group=2)
    out: dict[str, float] = {}
    c: Collective
    for c in strategy_cost(info, full_trainable(info), levers, 4, "cpu").collectives:
        out[c.span] = out.get(c.span, 0.0) + c.sent_bytes(ring_of(c, 4, 2, 4).ranks)
    return out


@pytest.mark.slow
def test_hybrid_follows_the_single_process_run_and_sends_what_the_planner_predicts(runs, hybrid):
    assert_same_curve(curve(runs.single("single-h", **RUN)), curve(hybrid), FP32_REL)
    measured = json.loads((hybrid / "summary.json").read_text())["comm_per_step"]["bytes_sent_by_span"]
    predicted = predicted_by_span(hybrid)
    assert set(predicted) == {"group", "across"}
    assert measured.get("world", 0) <= SCALARS, measured  # DTensor issues the norm's from inside its dispatch
    for span, want in predicted.items():
        assert 0 <= measured[span] - want <= SCALARS, (span, measured, predicted)
    assert predicted["across"] < 0.3 * predicted["group"]  # only the gradient shards cross


@pytest.mark.slow
@pytest.mark.parametrize("group", [2, None], ids=["one-group-of-2", "flat-2"])
def test_a_hybrid_checkpoint_resumes_on_two_ranks(runs, hybrid, group, tmp_path):
    cfg = _truncate_after(hybrid, 4, tmp_path / "resumed")
    text = cfg.read_text()
    cfg.write_text(text.replace("shard_group = 2\n", "" if group is None else f"shard_group = {group}\n"))
    code, out = train_cli(cfg, "--resume", "auto", nproc=2)
    assert code == 0 and "resumed from" in out, out
    assert_same_curve(curve(runs.single("single-h", **RUN)), curve(tmp_path / "resumed"), FP32_REL)
