"""fp16 (autocast + dynamic loss scaling) through the sharded strategies, on 2 gloo ranks.

Each strategy trains a tiny model for a few steps beside the single-process fp16 run on the same
global batches, with an inf put into one gradient at step `INJECT`: on rank 1 only, into its own
gradient shard after backward (no reduction spreads it to rank 0), and into the single run's
gradient. Every rank must skip that step with the weights unchanged, halve its scale and grow it
again after `growth_interval` clean steps as the single run's GradScaler does, and the loss curve
must follow the single run's. A checkpoint saved after the skip resumes the same curve and scale
exactly (the scaler's state travels with the shards).

DeepSpeed's CPU accelerator refuses fp16 unless the CPU computes it natively (AVX512-FP16 or
AMX-FP16), and so does the adapter (tested below); torch runs fp16 on any CPU, emulated. The
worker lifts that gate to run the adapter's wiring of DeepSpeed's own loss scaler as it would
run on CUDA.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import tempfile
from queue import Empty
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from shoestring.config import ParallelSection
from shoestring.dist import free_port
from shoestring.errors import UserError
from shoestring.levers.precision import PrecisionPolicy
from shoestring.models.llama import Llama
from shoestring.parallel.single import SingleDevice
from tests.test_yafsdp import ACCUM, ARGS, SETTINGS, _batches, _full_weights, _shard

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
STEPS, INJECT, SAVE = 8, 3, 5  # SAVE: steps done when the checkpoint is written
# A low initial scale this model never overflows by itself, and a short growth interval: the
# scale grows twice in 8 steps, around the halving at INJECT.
POLICY = PrecisionPolicy("fp16", init_scale=2.0**10, growth_interval=3)
GRADSCALER = [2.0**10, 2.0**10, 2.0**11, 2.0**10, 2.0**10, 2.0**10, 2.0**11, 2.0**11]
# DeepSpeed's scaler doubles after growth_interval + 1 clean steps (parallel/deepspeed.py).
DEEPSPEED = [2.0**10, 2.0**10, 2.0**10, 2.0**9, 2.0**9, 2.0**9, 2.0**9, 2.0**10]
# fp16 rounds at 2^-11; the ranks compute each half batch's weight gradients in fp16 and add them
# in fp32, where the single run rounds one fp16 product over the whole batch. Measured worst
# relative loss difference: 7e-5 (fsdp2, yafsdp; DeepSpeed, with fp16 weights: 5e-5). 1e-3 is
# two fp16 units in the last place; skipping the injected step on one rank only would move the
# weights of half the model by ~lr and fails the weight check below.
FP16_REL = 1e-3
# Adam turns a near-zero gradient whose sign fp16 rounding flipped into a full-size update in
# the other direction, so a few weights differ by a few lr; measured: 99.9% of elements within
# 1e-3 of the single run's (DeepSpeed: 99.7%), median 3e-5 (7e-5).
WEIGHT_ATOL, WEIGHT_SHARE = 1e-3, 0.99
torch.set_num_threads(1)


def _shard_grad(strategy) -> torch.Tensor:
    """A tensor holding part of this rank's (scaled) gradient as its optimizer will see it:
    the single run's first parameter's, FSDP2's local shard of it, the YaFSDP engine's flat
    shard, ZeRO's gradient partition."""
    if hasattr(strategy, "engine"):
        zero = strategy.engine.optimizer
        return zero.grad_partitions_flat_buffer if strategy.stage == 3 else zero.averaged_gradients[0][0]
    if isinstance(getattr(strategy, "grad", None), torch.Tensor):
        return strategy.grad
    g = next(p for p in strategy.model.parameters() if p.grad is not None).grad
    return g.to_local() if hasattr(g, "to_local") else g


def _scale(strategy) -> float:
    if hasattr(strategy, "engine"):
        return float(strategy.engine.optimizer.loss_scale)
    return strategy.scaler.get_scale()


def _train(strategy, batches, inject: bool, steps: range = range(STEPS), save: Path | None = None) -> dict:
    """This rank's losses, the scale after each step, skipped flags, whether the injected step
    left the weights unchanged; a checkpoint into `save` after SAVE steps."""
    out = {"losses": [], "scales": [], "skipped": []}
    for s in steps:
        loss = 0.0
        for k in range(ACCUM):
            x, y = batches[s * ACCUM + k]
            loss += strategy.forward_backward(x, y, 1 / ACCUM, k == ACCUM - 1).item() / ACCUM
        if s == INJECT:
            before = _full_weights(strategy)
            if inject:
                _shard_grad(strategy).view(-1)[0] = float("inf")
        result = strategy.step(SETTINGS.lr)
        if s == INJECT:
            after = _full_weights(strategy)
            out["unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
        out["losses"].append(loss)
        out["scales"].append(_scale(strategy))
        out["skipped"].append(result.skipped)
        if save is not None and s + 1 == SAVE:
            strategy.save(save)
    return out


def _worker(rank: int, port: int, root: str, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from shoestring import dist
    from shoestring.parallel.fsdp2 import FSDP2
    from shoestring.parallel.yafsdp import YaFSDP

    cases = {"fsdp2": FSDP2, "yafsdp": YaFSDP}
    if HAS_DEEPSPEED:
        from shoestring.parallel.deepspeed import DeepSpeed, import_deepspeed

        import_deepspeed("cpu").accelerator.get_accelerator().is_fp16_supported = lambda: True  # see the docstring
        cases["deepspeed"] = DeepSpeed
    out = {}
    batches = [_shard(b, rank, 2) for b in _batches(STEPS * ACCUM)]
    with dist.process_group(torch.device("cpu"), 60, required=True):
        for name, cls in cases.items():
            def build():
                torch.manual_seed(0)
                return cls(Llama(ARGS), POLICY, SETTINGS, torch.device("cpu"), ParallelSection(strategy=name))

            s, ckpt = build(), Path(root) / name
            ckpt.mkdir(exist_ok=True)
            run = _train(s, batches, inject=rank == 1, save=ckpt)
            run["weights"] = _full_weights(s)
            s.forward_backward(*batches[0], 1.0, True)  # gradients held: the steady state's peak
            n = s.unwrapped().num_params()
            run["state"] = (s.memory(), type(s).state_bytes(n, 2, POLICY, ParallelSection(strategy=name)))
            dist.barrier()
            resumed = build()
            resumed.load(ckpt)
            run["resumed"] = _train(resumed, batches, inject=False, steps=range(SAVE, STEPS))
            for r in (run, run["resumed"]):
                r["losses"] = [dist.mean(torch.tensor(x)).item() for x in r["losses"]]
            ranks = [None, None]
            torch.distributed.all_gather_object(ranks, {k: run[k] for k in ("scales", "skipped", "unchanged")})
            run["ranks"] = ranks
            out[name] = run
    if rank == 0:
        queue.put(pickle.dumps(out))


@pytest.fixture(scope="module")
def two_ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    with tempfile.TemporaryDirectory() as root:
        procs = [ctx.Process(target=_worker, args=(r, port, root, queue)) for r in range(2)]
        for p in procs:
            p.start()
        try:
            return pickle.loads(_answer(queue, procs, timeout=240))
        finally:
            for p in procs:
                p.join(timeout=30)


def _answer(queue, procs: list, timeout: float) -> bytes:
    """Rank 0's answer; fails as soon as a rank died (its traceback is in the captured output)."""
    for _ in range(int(timeout)):
        try:
            return queue.get(timeout=1)
        except Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                raise AssertionError(f"a rank failed: exit codes {[p.exitcode for p in procs]}") from None
    raise AssertionError(f"no answer from the ranks in {timeout:.0f} s")


@pytest.fixture(scope="module")
def single() -> dict:
    torch.manual_seed(0)
    model = Llama(ARGS)
    run = _train(SingleDevice(model, POLICY, SETTINGS, torch.device("cpu")), _batches(STEPS * ACCUM), inject=True)
    run["weights"] = {k: v.detach().float() for k, v in model.state_dict().items()}
    return run


def _rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


def test_the_single_run_skips_the_injected_step(single):
    assert single["skipped"] == [s == INJECT for s in range(STEPS)]
    assert single["scales"] == GRADSCALER
    assert single["unchanged"]


def _case(name: str):
    return pytest.param(name, marks=[pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")]
                        if name == "deepspeed" else [], id=name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [_case(n) for n in ("fsdp2", "yafsdp", "deepspeed")])
def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(two_ranks, single, name):
    run = two_ranks[name]
    for rank in run["ranks"]:
        assert rank["skipped"] == single["skipped"]
        assert rank["scales"] == (DEEPSPEED if name == "deepspeed" else GRADSCALER)
        assert rank["unchanged"]
    assert _rel(single["losses"], run["losses"]) < FP16_REL
    off = torch.cat([(run["weights"][k].float() - v).abs().flatten() for k, v in single["weights"].items()])
    assert (off <= WEIGHT_ATOL).float().mean() >= WEIGHT_SHARE


@pytest.mark.slow
@pytest.mark.parametrize("name", [_case(n) for n in ("fsdp2", "yafsdp", "deepspeed")])
def test_a_checkpoint_resumes_the_curve_and_the_scale(two_ranks, name):
    run = two_ranks[name]
    assert run["resumed"]["losses"] == run["losses"][SAVE:]
    assert run["resumed"]["scales"] == run["scales"][SAVE:]


@pytest.mark.slow
@pytest.mark.parametrize("name", [_case(n) for n in ("fsdp2", "yafsdp", "deepspeed")])
def test_fp16_state_matches_the_planner_estimate(two_ranks, name):
    """fsdp2 and yafsdp keep fp32 shards under fp16 autocast; DeepSpeed's fp16 mode holds fp16
    weights and gradients beside its fp32 master partitions."""
    counted, estimate = two_ranks[name]["state"]
    for k, v in estimate.items():
        # padding, AdamW's step counters, DeepSpeed's gradient bucket (< 10% here)
        assert v <= counted[k] <= 1.1 * v + 256, (k, counted, estimate)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_deepspeed_refuses_fp16_where_its_accelerator_does(monkeypatch):
    from shoestring.parallel.deepspeed import DeepSpeed, import_deepspeed

    accelerator = import_deepspeed("cpu").accelerator.get_accelerator()
    monkeypatch.setattr(accelerator, "is_fp16_supported", lambda: False)

    def build(policy: PrecisionPolicy) -> None:
        DeepSpeed(Llama(ARGS), policy, SETTINGS, torch.device("cpu"), ParallelSection(strategy="deepspeed"))

    with pytest.raises(UserError, match="does not run fp16 here"):
        build(POLICY)
    monkeypatch.setattr(accelerator, "is_fp16_supported", lambda: True)
    with pytest.raises(UserError, match="power of two"):
        build(replace(POLICY, init_scale=1000.0))
