"""Hybrid sharding in the yafsdp engine (`parallel.shard_group`): 4 gloo ranks as 2 groups x 2.

* The fp32 loss curve and the final weights equal one process's, to fp32 rounding.
* What one rank sends within its group and across groups, measured by `CommMeter`, equals what
  the engine's cost model (`YaFSDP.cost`, as the planner asks it) predicts; the engine's own
  counts equal `communication_bytes`.
* A checkpoint saved on 2x2 resumes on 2 ranks as one group of 2 (1x2, the same as flat 2), flat
  2, 2 groups of 1, and in one process, each continuing the curve.
* A group size that does not divide the ranks is a UserError.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from shoestring.config import ParallelSection
from shoestring.dist import free_port
from shoestring.errors import UserError
from shoestring.levers.precision import PrecisionPolicy
from shoestring.models.llama import Llama
from shoestring import dist
from shoestring.parallel.single import SingleDevice
from shoestring.parallel.yafsdp import YaFSDP
from shoestring.plan.memory import Levers, strategy_cost
from shoestring.plan.model import ModelInfo, full_trainable
from tests.test_yafsdp import ACCUM, ARGS, SETTINGS, FakeCollectives, _batches, _rel, _shard, _train

STEPS = 3  # saved after the second; the third is metered (the steady state)
RESUMED = {"1x2": 2, "flat 2": None, "2x1": 1}  # shard_group on 2 ranks


def _engine(shard_group, comm=None) -> YaFSDP:
    torch.manual_seed(0)
    options = ParallelSection(strategy="yafsdp", shard_group=shard_group)
    return YaFSDP(Llama(ARGS), PrecisionPolicy("fp32"), SETTINGS, torch.device("cpu"), options, comm=comm)


def _worker(rank: int, world: int, port: int, ckpt: Path, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from shoestring.parallel.comm import CommMeter

    batches = [_shard(b, rank, world) for b in _batches(STEPS * ACCUM)]
    out = {}
    with dist.process_group(torch.device("cpu"), 60, required=True):
        if world == 4:
            ya = _engine(2)
            losses = _train(ya, batches, 2)
            ya.save(ckpt)
            dist.barrier()
            with CommMeter(world, groups=ya.comm_groups()) as meter:
                losses += _train(ya, batches[2 * ACCUM :], 1)
            out["2x2"] = [dist.mean(torch.tensor(x)).item() for x in losses]
            out["sent"], out["counted"] = meter.stats, ya.comm_stats
            ya.save(ckpt / "final")
        else:
            for name, group in RESUMED.items():
                ya = _engine(group)
                ya.load(ckpt)
                out[name] = [dist.mean(torch.tensor(x)).item() for x in _train(ya, batches[2 * ACCUM :], 1)]
    queue.put((rank, pickle.dumps(out)))


def _spawn(world: int, ckpt) -> dict[int, dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()  # for the group's store
    procs = [ctx.Process(target=_worker, args=(r, world, port, ckpt, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        return {r: pickle.loads(b) for r, b in (queue.get(timeout=180) for _ in procs)}
    finally:
        for p in procs:
            p.join(timeout=30)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("hybrid")
    (ckpt / "final").mkdir()
    four = _spawn(4, ckpt)
    return ckpt, four, _spawn(2, ckpt)


def _single() -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Llama(ARGS)
    losses = _train(SingleDevice(model, PrecisionPolicy("fp32"), SETTINGS, torch.device("cpu")), _batches(STEPS * ACCUM),
                    STEPS)
    return losses, {k: v.detach() for k, v in model.state_dict().items()}


def test_two_groups_of_two_follow_one_process(runs):
    ckpt, four, _ = runs
    losses, weights = _single()
    assert _rel(losses, four[0]["2x2"]) < 1e-5
    saved = YaFSDP.consolidated_weights(ckpt / "final")
    assert sorted((ckpt / "final" / "yafsdp").iterdir()) == [ckpt / "final" / "yafsdp" / f"rank{r}.pt" for r in range(2)]
    for k, v in weights.items():
        torch.testing.assert_close(saved[k], v, rtol=1e-4, atol=1e-4, msg=k)  # as tests/test_yafsdp.py


def test_bytes_within_and_across_groups_are_the_cost_models(runs):
    _, four, _ = runs
    info = ModelInfo("test", ARGS, tuple(tuple(p.shape) for p in Llama(ARGS).parameters()))
    levers = Levers("fp32", "none", "yafsdp", grad_accum=ACCUM, shard_group=2)
    predicted: dict[str, float] = {}
    for c in strategy_cost(info, full_trainable(info), levers, 4, "cpu").collectives:
        predicted[c.span] = predicted.get(c.span, 0.0) + c.sent_bytes(2)  # 2 ranks in a group, 2 groups
    assert set(predicted) == {"group", "across"} and 0 < predicted["across"] < predicted["group"]
    expected = YaFSDP.communication_bytes(ARGS, 2, PrecisionPolicy("fp32"), levers.parallel_options(), ACCUM, replicas=2)
    for rank, out in four.items():
        measured = out["sent"].by_span
        assert measured.pop("world", 0) <= 16, measured  # the gradient norm's scalar all-reduce
        assert measured == pytest.approx(predicted, abs=1e-6), (rank, measured, predicted)
        assert {k: out["counted"][k] for k in expected} == expected


def test_a_2x2_checkpoint_resumes_on_other_groups_and_worlds(runs):
    ckpt, four, two = runs
    third = four[0]["2x2"][2]
    for name in RESUMED:
        assert _rel([third], two[0][name]) < 1e-5, name
    one = _engine(None, comm=FakeCollectives())
    one.load(ckpt)
    assert _rel([third], _train(one, _batches(STEPS * ACCUM)[2 * ACCUM :], 1)) < 1e-5


def test_a_group_size_must_divide_the_ranks(monkeypatch):
    from shoestring.parallel.yafsdp import Collectives

    monkeypatch.setattr(dist, "world_size", lambda: 4)
    with pytest.raises(UserError, match="does not divide 4 ranks"):
        Collectives(shard_group=3)
    with pytest.raises(ValueError, match="shard_group"):
        ParallelSection(shard_group=0)
