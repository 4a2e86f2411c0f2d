"""Runs that adapt to running out of memory (shoestring.train.adapt): under a real RLIMIT_DATA
cap the micro-batch halves until the step fits, the optimisation unchanged; at micro-batch 1 the
run stops with the planner's breakdown, keeping its checkpoints."""

from __future__ import annotations

import json
import os
import re
import time
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from shoestring.config import parse_bytes
from shoestring.data.loader import BatchSampler
from shoestring.train import adapt
from shoestring import checkpoint as ckpt, dist
from shoestring.train.metrics import read_metrics
from tests.runs import write_config

CAPPED = Path(__file__).with_name("capped.py")
# The micro model at 32 x 128 tokens per micro-step: ~60 MiB of activations at micro-batch 32,
# a few at 1; the caps below are MiB over the process's data segment after its imports
# (model, data, optimizer and the step itself must fit in them).
SHAPE = dict(data__seq_len=128, train__batch_size=32, train__steps=2, train__eval_every=100, run__save_every=1,
             train__memory_budget="64GiB")  # the planner then starts at the largest split: the cap must shrink it
TOO_SMALL_FOR_32 = 110
TOO_SMALL_FOR_1 = 100


def capped(cap_mib: int, ranks: str, *args: str, timeout: float = 300) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, str(CAPPED), str(cap_mib), ranks, *args], capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_resplit_serves_the_same_samples_per_step():
    tokens = np.arange(20_000) % 500
    one = BatchSampler(tokens, 16, global_batch=8, grad_accum=1, seed=3)
    x1, _ = one.batch(5)
    halves = BatchSampler(tokens, 16, global_batch=8, grad_accum=1, seed=3)
    halves.resplit(4)
    assert halves.micro_batch == 2
    x4 = np.concatenate([halves.batch(5, m)[0].numpy() for m in range(4)])
    assert (x4 == x1.numpy()).all()


def test_a_lost_node_keeps_every_sample_once_per_epoch():
    """3 ranks until a checkpoint at step 4, a node lost in step 5, then 2 ranks from step 4 at
    another split: the redone steps serve the samples they served before, and the epoch's
    steps (those that count) serve every window exactly once."""
    seq, windows, batch = 16, 96, 12
    tokens = np.arange(windows * seq + 1)  # window w starts with token w * seq

    def served(world: int, accum: int, step: int) -> list[int]:
        ranks = [BatchSampler(tokens, seq, global_batch=batch, grad_accum=accum, rank=r, world_size=world, seed=5)
                 for r in range(world)]
        return [int(w) for s in ranks for m in range(accum) for w in s.batch(step, m)[0][:, 0] // seq]

    before = {step: served(3, 1, step) for step in range(6)}
    after = {step: served(2, 2, step) for step in range(4, windows // batch)}
    assert all(sorted(before[s]) == sorted(after[s]) for s in (4, 5))
    epoch = [w for s in range(4) for w in before[s]] + [w for s in after for w in after[s]]
    assert sorted(epoch) == list(range(windows))


def test_helpers():
    assert adapt.smaller(32, 32) == 16 and adapt.smaller(12, 12) == 6 and adapt.smaller(12, 6) == 3
    assert adapt.smaller(12, 3) == 1 and adapt.smaller(8, 1) is None
    assert adapt.is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"))
    assert adapt.is_oom(MemoryError()) and not adapt.is_oom(RuntimeError("shape mismatch"))
    assert parse_bytes("1.5GiB") == 3 * 2**29 and parse_bytes("500MB") == 500 * 2**20 and parse_bytes("64") == 64


def test_oom_halves_micro_batch_and_matches_a_run_started_there(make_config, tmp_path):
    run = tmp_path / "capped"
    cfg = write_config(make_config, tmp_path / "capped.toml", run__dir=str(run), **SHAPE)
    code, out = capped(TOO_SMALL_FOR_32, "0", "train", str(cfg))
    assert code == 0, out
    summary = json.loads((run / "summary.json").read_text())["adapt"]
    settled = summary["micro_batch"]
    assert summary["micro_batch_start"] == 32 and settled < 32, summary
    assert summary["grad_accum"] == 32 // settled and summary["oom_events"] >= 1
    assert summary["steps_redone"] == summary["oom_events"] and summary["restarts"] == 0
    assert re.search(r"out of memory at step \d: micro-batch 32 -> 16, accumulation 2 .*; step redone", out), out
    assert [r["micro_batch"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r][-1] == settled

    ref = tmp_path / "ref"
    ref_cfg = write_config(make_config, tmp_path / "ref.toml", run__dir=str(ref), **SHAPE, train__micro_batch=settled)
    code, out = capped(0, "none", "train", str(ref_cfg))
    assert code == 0, out
    np.testing.assert_allclose(losses(run), losses(ref), rtol=1e-5)
    assert len(losses(run)) == 2


def test_micro_batch_one_not_fitting_stops_with_the_breakdown(make_config, tmp_path):
    # One sequence of 4096 tokens needs about what 32 of 128 do: more than the cap, though the
    # set-up (data, model, optimizer, the checkpoint resumed from) fits in it.
    long = {**SHAPE, "model__max_seq_len": 4096, "data__seq_len": 4096, "train__batch_size": 2, "train__steps": 1}
    run = tmp_path / "run"
    cfg = write_config(make_config, tmp_path / "run.toml", run__dir=str(run), **long)
    code, out = capped(0, "none", "train", str(cfg))
    assert code == 0, out
    kept = ckpt.latest_complete(run / "checkpoints")
    more = write_config(make_config, tmp_path / "more.toml", run__dir=str(run), **{**long, "train__steps": 2})
    code, out = capped(TOO_SMALL_FOR_1, "0", "train", str(more), "--resume", "auto")
    assert code == 1, out
    assert "out of memory" in out and "micro-batch 1" in out and "GiB predicted per rank" in out, out
    assert f"last good checkpoint: {kept.path}" in out and "checkpointing.mode" in out, out
    ckpt.verify(ckpt.latest_complete(run / "checkpoints"))
    assert ckpt.latest_complete(run / "checkpoints").step == 1


def test_fsdp2_one_rank_out_of_memory_restarts_smaller_and_matches(make_config, tmp_path):
    """Rank 1 alone is capped: it records the halved micro-batch and exits; torchrun stops rank 0
    (blocked in FSDP2's gathers, or not) and restarts both, which resume at the smaller split.
    Two steps: a run's third step is profiled for its collectives (CommMeter), and the profiler's
    buffers, which grow with how late its thread drains them, can exceed the cap outside any
    micro-step on a busy machine (seen in CI: a second, uncounted restart)."""
    shape = {**SHAPE, "train__batch_size": 64, "train__steps": 2, "parallel__strategy": "fsdp2"}  # 32 per rank
    run = tmp_path / "capped"
    cfg = write_config(make_config, tmp_path / "capped.toml", run__dir=str(run), **shape)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=3",
                str(CAPPED), "150", "1", "train", str(cfg)]
    proc = subprocess.run(torchrun, capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((run / "summary.json").read_text())["adapt"]
    settled = summary["micro_batch"]
    assert summary["micro_batch_start"] == 32 and settled < 32 and summary["restarts"] == summary["oom_events"] >= 1
    assert all(not e.in_process and e.rank == 1 for e in adapt.events(run) if e.kind == "oom")

    ref = tmp_path / "ref"
    ref_cfg = write_config(make_config, tmp_path / "ref.toml", run__dir=str(ref), **shape, train__micro_batch=settled)
    proc = subprocess.run([sys.executable, "-m", "shoestring", "train", str(ref_cfg), "--nproc", "2"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    np.testing.assert_allclose(losses(run), losses(ref), rtol=1e-5)
    assert len(losses(run)) == 2


def test_elastic_launch_refuses_what_a_world_change_could_not_continue():
    from shoestring.errors import UserError
    from shoestring.parallel.launch import LaunchOptions, check_elastic, world_sizes

    opts = LaunchOptions(nproc=2, nnodes="2:3")
    assert world_sizes(opts) == [4, 6]
    check_elastic(opts, 24, "auto", "fsdp2")
    with pytest.raises(UserError, match=r"16 does not split over 6 ranks.*multiple of 12 \(e.g. 12, 24\)"):
        check_elastic(opts, 16, "auto", "fsdp2")
    with pytest.raises(UserError, match=r"24 does not split over 4 ranks .*micro_batch 4.*multiple of 48"):
        check_elastic(opts, 24, 4, "yafsdp")
    with pytest.raises(UserError, match="DeepSpeed checkpoints resume only"):
        check_elastic(opts, 24, "auto", "deepspeed")
    check_elastic(LaunchOptions(nproc=2, nnodes="2"), 24, "auto", "deepspeed")


def logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    return sum('"loss"' in line for line in path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp2", "yafsdp"])
def test_lost_node_continues_on_a_smaller_world(make_config, tmp_path, strategy):
    """Three simulated nodes (a torchrun agent each, `--nnodes 2:3`, one c10d rendezvous); one is
    killed with its worker mid-run: the two left restart from the last checkpoint on 2 ranks
    (accumulation re-derived, global batch kept) and end on the uninterrupted run's loss curve,
    each step seeing the same samples (test_a_lost_node_keeps_every_sample_once_per_epoch)."""
    shape = dict(train__batch_size=12, train__steps=14, train__eval_every=100, run__save_every=2,
                 parallel__strategy=strategy, parallel__timeout_s=60)
    ref = tmp_path / "ref"
    ref_cfg = write_config(make_config, tmp_path / "ref.toml", run__dir=str(ref), **shape)
    proc = subprocess.run([sys.executable, "-m", "shoestring", "train", str(ref_cfg), "--nproc", "2"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    run = tmp_path / "elastic"
    cfg = write_config(make_config, tmp_path / "elastic.toml", run__dir=str(run), **shape)
    endpoint = f"localhost:{dist.free_port()}"
    agents = []
    for i in range(3):  # the first agent hosts the rendezvous store: a later one is the node lost
        agents.append(subprocess.Popen([sys.executable, "-m", "shoestring", "train", str(cfg), "--nproc", "1", "--nnodes",
                                        "2:3", "--rdzv-endpoint", endpoint, "--max-restarts", "3"],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True))
        time.sleep(0.5)
    deadline = time.monotonic() + 240
    while logged(run) < 4 and time.monotonic() < deadline and agents[2].poll() is None:
        time.sleep(0.2)
    assert 4 <= logged(run) < 14, "the kill must land mid-run"
    node = psutil.Process(agents[2].pid)
    for p in [*node.children(recursive=True), node]:
        p.kill()
    outs = [a.communicate(timeout=300)[0] for a in agents[:2]]
    assert [a.returncode for a in agents[:2]] == [0, 0], outs
    summary = json.loads((run / "summary.json").read_text())
    assert summary["devices"] == 2 and summary["adapt"]["restarts"] >= 1, summary["adapt"]
    assert summary["adapt"]["grad_accum"] * summary["adapt"]["micro_batch"] * 2 == 12
    np.testing.assert_allclose(losses(run), losses(ref), rtol=1e-5)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == list(range(14))


def test_a_worker_started_again_by_its_agent_knows_it(monkeypatch, tmp_path):
    """torchrun counts a restart after a failure, not after a change of membership: the
    launcher's per-agent marks tell a worker it continues the job either way."""
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.delenv(dist.STARTS_DIR, raising=False)
    assert not dist.started_before() and not dist.started_before()  # no launcher: never
    monkeypatch.setenv(dist.STARTS_DIR, str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not dist.started_before() and dist.started_before()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not dist.started_before()  # each local rank its own mark
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.delenv(dist.STARTS_DIR)
    assert dist.started_before()
