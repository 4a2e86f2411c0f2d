"""Hybrid sharding in the yafsdp engine (`parallel.shard_group`): 4 gloo ranks as 2 groups x 2.

* The fp32 loss curve and the final weights equal one process's, to fp32 rounding.
* What one rank sends, measured by `CommMeter` (point-to-point bytes by tag: within its group or
  across groups; the scalar all-reduces over every rank), equals the engine's `sent_bytes`, and
  its own counts equal `communication_bytes`.
* A checkpoint saved on 2x2 resumes on 2 ranks as one group of 2 (1x2, the same as flat 2), flat
  2, 2 groups of 1, and in one process, each continuing the curve.
* A group size that does not divide the ranks is a UserError.
"""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from shoestring.config import ParallelSection
from shoestring.errors import UserError
from shoestring.levers.precision import PrecisionPolicy
from shoestring.models.llama import Llama
from shoestring.parallel import dist
from shoestring.parallel.single import SingleDevice
from shoestring.parallel.yafsdp import YaFSDP
from shoestring.parallel.yafsdp.collectives import ACROSS_TAG
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
            with CommMeter(world) as meter:
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
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
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
    options = ParallelSection(strategy="yafsdp", shard_group=2)
    policy = PrecisionPolicy("fp32")
    predicted = YaFSDP.sent_bytes(ARGS, 4, policy, options, ACCUM)
    assert predicted["across"] > 0 and predicted["within"] > 0
    for rank, out in four.items():
        sent = out["sent"]
        across = sent.by_tag.pop(ACROSS_TAG)
        assert set(sent.by_tag) == {1, 2}, sent.by_tag  # the within-group all-gathers and reduce-scatters
        measured = {"within": sum(sent.by_tag.values()), "across": across,
                    "all": sent.bytes_sent - across - sum(sent.by_tag.values())}
        assert measured == pytest.approx(predicted, abs=1e-6), (rank, measured, predicted)
        expected = YaFSDP.communication_bytes(ARGS, 4, policy, options, ACCUM)
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
    assert dist.shard_group_size(None, 4) == 4 and dist.shard_group_size(2, 4) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert dist.shard_group_size("node", 4) == 2
    with pytest.raises(UserError, match="do not divide the 4 ranks"):
        dist.shard_group_size(3, 4)
    with pytest.raises(ValueError, match="shard_group"):
        ParallelSection(shard_group=0)
