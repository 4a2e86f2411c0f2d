"""One LoRA step and one full step of every family under every strategy: single in this process,
ddp, fsdp2, yafsdp and DeepSpeed ZeRO-3 on 2 gloo ranks, all in ONE launch of two ranks that
loop over the cases (tests/family_worker.py): building a process group and importing torch per
case would cost more than the cases. Each step's loss equals the plain single-process model's
loss on the same rows, is finite, and the step changes what trains.

DeepSpeed runs on three families only: its engine start is ~2 s a case on 2 CPU cores (2/3 of
all the cases' time when it ran on every family: 30 s of 41 s, contended), and what it does
with a model depends on the parameters alone (flat partitions, gathers around module
forwards), which these three cover: q/k/v biases (Qwen2), q/k norms, post-norms, biases and the
norm offset (Gemma 3), a tied head used by the soft-capped loss (Gemma 2)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.multiprocessing as mp

from shoestring.dist import free_port
from tests.family_worker import BATCH, LORA, SEQ, _batch, _config, run_cases

transformers = pytest.importorskip("transformers")
from tests.families import FAMILIES, make_family  # noqa: E402

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
STRATEGIES = {"ddp": {"strategy": "ddp"}, "fsdp2": {"strategy": "fsdp2"}, "yafsdp": {"strategy": "yafsdp"},
              **({"zero3": {"strategy": "deepspeed", "zero_stage": 3}} if HAS_DEEPSPEED else {})}
DEEPSPEED_FAMILIES = {"qwen2", "gemma2", "gemma3_text"}
FP32_REL = 1e-5


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-strategies")
    return {name: str(make_family(root / name, name, seed=i)) for i, name in enumerate(sorted(FAMILIES))}


@pytest.fixture(scope="module")
def two_rank_results(dirs):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=run_cases, args=(r, port, dirs, STRATEGIES, {"zero3": DEEPSPEED_FAMILIES}, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        return dict(queue.get(timeout=900) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_strategy_steps_every_family_on_two_ranks(two_rank_results, family):
    for rank, cases in two_rank_results.items():
        for (fam, strategy, mode), r in cases.items():
            if fam != family:
                continue
            where = f"{family} {strategy} {mode} rank {rank}"
            assert r["finite"], where
            assert abs(r["loss"] - r["reference"]) <= FP32_REL * abs(r["reference"]), (where, r)
            assert abs(r["after"] - r["loss"]) > 1e-4, f"{where}: the step changed nothing"
    expected = {s for s in STRATEGIES if s != "zero3" or family in DEEPSPEED_FAMILIES}
    assert {(f, s, m) for f, s, m in two_rank_results[0] if f == family} == {(family, s, m) for s in expected for m in ("lora", "full")}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_yafsdp_flat_buffers_hold_the_new_parameters_as_estimated(dirs, two_rank_results, family):
    """Biases and q/k / post norms are small parameters of the flat resident units: the engine's
    counted state and buffers equal its static estimates, LoRA (frozen base) or not."""
    from shoestring.config import ParallelSection
    from shoestring.build import lora_settings
    from shoestring.levers.precision import PrecisionPolicy
    from shoestring.models.hf import read_source
    from shoestring.parallel.yafsdp import FrozenBase, YaFSDP

    args = read_source(f"hf:{dirs[family]}").args
    policy, options = PrecisionPolicy("fp32"), ParallelSection(strategy="yafsdp")
    for mode in ("lora", "full"):
        counted = two_rank_results[0][(family, "yafsdp", mode)]["memory"]
        base = FrozenBase.of(args, lora_settings(_config("hf:x", {}, True))) if mode == "lora" else None
        trained = base.adapters if base else args.num_params()
        frozen = args.num_params() * 4 if base else 0
        estimate = YaFSDP.state_bytes(trained, 2, policy, options, frozen_bytes=frozen)
        assert all(0 <= counted[k] - estimate[k] <= 16 * (4 + args.n_layers) for k in estimate), (mode, counted, estimate)
        assert counted["buffers"] == YaFSDP.buffer_bytes(args, 2, policy, options, base, p2p=True), mode


def test_two_rank_launch_time_is_reported(two_rank_results):
    """Not a speed target: the per-case seconds, printed for the report (pytest -s)."""
    seconds = {}
    for (fam, strategy, mode), r in two_rank_results[0].items():
        seconds.setdefault(strategy, []).append(r["seconds"])
    print({s: f"{sum(v):.1f}s over {len(v)} cases" for s, v in seconds.items()})
    assert all(math.isfinite(sum(v)) for v in seconds.values())


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_single_process_step(dirs, family, mode):
    """The `single` strategy on the whole batch, in this process."""
    from shoestring.build import build_strategy
    from shoestring.models.hf import load_llama, read_source
    from shoestring.models.loss import cross_entropy_from_hidden

    src = read_source(f"hf:{dirs[family]}")
    x, y = (torch.cat(parts) for parts in zip(_batch(src.args.vocab_size, 0), _batch(src.args.vocab_size, 1)))
    assert x.shape == (BATCH, SEQ)
    plain = load_llama(src).eval()
    with torch.no_grad():
        reference = cross_entropy_from_hidden(plain(x), plain.lm_head.weight, y, softcap=plain.args.final_softcap).item()
    s = build_strategy(_config(f"hf:{dirs[family]}", {"strategy": "single"}, mode == "lora"), src.args.vocab_size,
                       torch.device("cpu"), src)
    loss = s.forward_backward(x, y, 1.0, True).item()
    s.step(1e-2)
    assert abs(loss - reference) <= FP32_REL * abs(reference)
    assert abs(s.eval_loss(x, y).item() - loss) > 1e-4
    trainable = {n for n, p in s.unwrapped().named_parameters() if p.requires_grad}
    if mode == "lora":
        assert trainable and all("lora_" in n for n in trainable)
        assert {n.rsplit(".", 2)[-2] for n in trainable} == set(LORA["targets"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_precision_and_checkpointing_modes_on_every_family(dirs, family):
    """Each precision mode, each with a checkpointing mode, on the single strategy: the loss is
    the fp32 loss within low-precision rounding, and a step moves it."""
    from shoestring.build import build_strategy
    from shoestring.models.hf import read_source

    src = read_source(f"hf:{dirs[family]}")
    x, y = (torch.cat(parts) for parts in zip(_batch(src.args.vocab_size, 0), _batch(src.args.vocab_size, 1)))
    losses = {}
    for precision, ckpt in (("fp32", "none"), ("bf16", "selective"), ("bf16-pure", "full"), ("fp16", "every:2")):
        cfg = _config(f"hf:{dirs[family]}", {"strategy": "single"}, False)
        cfg = cfg.model_copy(update={"precision": cfg.precision.model_copy(update={"mode": precision}),
                                     "checkpointing": cfg.checkpointing.model_copy(update={"mode": ckpt})})
        s = build_strategy(cfg, src.args.vocab_size, torch.device("cpu"), src)
        losses[precision] = s.forward_backward(x, y, 1.0, True).item()
        s.step(1e-2)
        assert math.isfinite(losses[precision]) and math.isfinite(s.eval_loss(x, y).item()), precision
    for precision, loss in losses.items():
        assert abs(loss - losses["fp32"]) < 0.05 * losses["fp32"], (precision, losses)
