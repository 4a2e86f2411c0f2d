"""QLoRA: LoRA over a frozen base held in NF4 (`lora.base_dtype = "nf4"`, torchao's NF4Tensor):
the lever's bytes against what the tensors store, the loss curve against a bf16 base, the
trainer's resume and export, two ranks under DDP and FSDP2, and the planner's choice."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from rich.console import Console

from shoestring.config import build_config
from shoestring.data.loader import BatchSampler
from shoestring.data.shards import open_split
from shoestring.errors import UserError
from shoestring.export import checkpoint_weights
from shoestring.levers.lora import (ALL_TARGETS, LoRALinear, LoRASettings, apply_lora, dequantize_nf4, estimate, frozen_base_bytes,
                                    is_nf4, nf4_bytes, to_nf4)
from shoestring.measure.memory import model_state_bytes
from shoestring.models import build_model, preset_args
from shoestring.models.loss import cross_entropy_from_hidden
from shoestring.train.trainer import Trainer
from tests.conftest import config_tree
from tests.test_parallel import FP32_REL, assert_same_curve, curve, runs  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                reason="needs torchao (pip install 'shoestring[qlora]')")
QUIET = Console(quiet=True)
NF4 = dict(lora__enabled=True, lora__rank=4, lora__targets=["q_proj", "v_proj", "down_proj"], lora__base_dtype="nf4")


def test_dequantisation_is_torchaos_bit_for_bit():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        w = to_nf4(torch.randn(176, 64), dtype)
        assert w.dtype == dtype and torch.equal(dequantize_nf4(w), w.get_original_weight())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_counted_base_bytes_equal_the_estimate(dtype):
    """What the NF4 tensors store (their inner tensors: codes, scales, factors, mean, code
    table), plus the unquantised embedding and norms and the adapters, equals the estimate."""
    args = preset_args("micro", vocab_size=512)
    settings = LoRASettings(rank=4, targets=("q_proj", "v_proj"), base_dtype=dtype, nf4=True)
    model = build_model(args)
    apply_lora(model, settings)
    assert sum(is_nf4(p) for p in model.parameters()) == 7 * args.n_layers  # every block linear, targeted or not
    assert model_state_bytes(model)["params"] == estimate(args, settings).params
    q = args.dim * args.dim  # one q_proj: 4 bits a weight, an int8 scale per 64, a little metadata
    assert q / 2 + q / 64 < nf4_bytes((args.dim, args.dim), dtype.itemsize) < q / 2 + q / 64 + 64 * dtype.itemsize


def test_nf4_lora_follows_the_bf16_base_lora(prepared):
    """A briefly pre-trained micro model, LoRA-tuned on the same two batches (cycled, so the
    adapters have something to learn fast) over a bf16 base and over its NF4 quantisation.
    Tolerance 0.05 nats (about 1% of the loss): NF4's error per weight is a few % of its block's
    scale, which moved the loss by 0.006 at most here (0.014 in a 40-step trial); a wrong scale,
    code order or lost adapter moves it by tenths. The adapters must learn as much over either
    base: the drop in loss on those batches within 20% (measured 0.101 and 0.105)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # micro matmuls gain nothing from a second thread, and lose much when cores are shared
    try:
        _compare_bases(prepared)
    finally:
        torch.set_num_threads(threads)


def _compare_bases(prepared) -> None:
    batches = BatchSampler(open_split(prepared, "train"), 64, 8, seed=0)
    torch.manual_seed(0)
    base = build_model(preset_args("micro", vocab_size=512))
    opt = torch.optim.AdamW(base.parameters(), lr=1e-2)
    for _ in range(20):
        x, y = batches.next_batch()
        cross_entropy_from_hidden(base(x), base.lm_head.weight, y).backward()
        opt.step()
        opt.zero_grad()
    data = [batches.next_batch() for _ in range(2)]

    def loss_of(model, x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return cross_entropy_from_hidden(model(x), model.lm_head.weight, y)

    curves, drops = {}, {}
    for nf4 in (False, True):
        model = copy.deepcopy(base)
        torch.manual_seed(1)
        apply_lora(model, LoRASettings(rank=8, targets=ALL_TARGETS, base_dtype=torch.bfloat16, nf4=nf4))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
        curves[nf4] = []
        for step in range(10):
            loss = loss_of(model, *data[step % 2])
            loss.backward()
            opt.step()
            opt.zero_grad()
            curves[nf4].append(loss.item())
        with torch.no_grad():
            drops[nf4] = sum(curves[nf4][:2]) / 2 - sum(loss_of(model, *b).item() for b in data) / 2
    assert max(abs(a - b) for a, b in zip(curves[False], curves[True])) < 0.05, curves
    assert drops[False] > 0.05 and abs(drops[True] - drops[False]) < 0.2 * drops[False], drops


def test_nf4_run_resumes_exports_and_counts(make_config, tmp_path):
    """Under bf16 autocast and full checkpointing: the trainer's counted params equal the lever's
    estimate; a run resumed half-way follows the uninterrupted one; the checkpoint reads back as
    plain tensors (the dequantised base) and the export merges the adapters into it."""
    from safetensors.torch import load_file

    from shoestring.export_hf import export_hf
    from shoestring.build import lora_settings
    from shoestring.export import load_run
    from shoestring.train.metrics import read_metrics

    common = dict(**NF4, precision__mode="bf16", checkpointing__mode="full", train__steps=6, run__save_every=3)
    whole = make_config(run__dir=str(tmp_path / "whole"), **common)
    trainer = Trainer(whole, console=QUIET)
    summary = trainer.run()
    model = trainer.strategy.unwrapped()
    assert summary["memory_bytes"]["params"] == estimate(model.args, lora_settings(whole)).params
    Trainer(make_config(run__dir=str(tmp_path / "half"), **{**common, "train__steps": 3}), console=QUIET).run()
    Trainer(make_config(run__dir=str(tmp_path / "half"), **common), console=QUIET).run(resume="auto")
    losses = [[r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r] for d in ("whole", "half")]
    assert losses[0] == losses[1]

    weights, _ = checkpoint_weights(tmp_path / "whole")
    q = "layers.0.self_attn.q_proj.weight"
    assert type(weights[q]) is torch.Tensor and torch.equal(weights[q], dequantize_nf4(model.layers[0].self_attn.q_proj.weight))
    lora = load_run(tmp_path / "whole").model.layers[0].self_attn.q_proj
    assert isinstance(lora, LoRALinear) and not is_nf4(lora.weight)
    with pytest.raises(ValueError, match="re-quantised"):
        model.layers[0].self_attn.q_proj.merge()
    exported = load_file(str(export_hf(tmp_path / "whole", tmp_path / "hf") / "model.safetensors"))
    torch.testing.assert_close(exported["model." + q], weights[q].float() + lora.delta())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_nf4_two_ranks_follow_single(runs, strategy):
    """2 gloo ranks: the loss curve and the final weights are the single-process NF4 run's, and
    FSDP2 holds 1/2 of the NF4 codes and scales per rank (exactly the lever's count)."""
    ref = runs.single("nf4-single", **NF4)
    run = runs.launched(f"nf4-{strategy}", parallel__strategy=strategy, **NF4)
    assert_same_curve(curve(ref), curve(run), FP32_REL)
    expected, _ = checkpoint_weights(ref)
    got, _ = checkpoint_weights(run)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-4, msg=k)
    if strategy == "fsdp2":
        cfg = build_config(config_tree(runs.corpus, runs.prepared, run, **NF4))
        from shoestring.build import lora_settings

        settings, args = lora_settings(cfg), preset_args("micro", vocab_size=512)
        adapters = estimate(args, settings).trainable_params
        params = json.loads((run / "summary.json").read_text())["memory_bytes"]["params"]
        assert params == frozen_base_bytes(args, settings, shards=2) + 4 * adapters // 2


def test_nf4_under_fp16_trains(make_config):
    """fp16 (a T4 has no bf16): the NF4 weights dequantise to fp16, the loss scaler steps."""
    trainer = Trainer(make_config(**NF4, precision__mode="fp16", train__steps=3, run__save_every=0), console=QUIET)
    summary = trainer.run()
    model = trainer.strategy.unwrapped()
    assert {p.dtype for p in model.parameters() if is_nf4(p)} == {torch.float16}
    assert summary["final_train_loss"] < 7.0 and not any(p.grad is not None for p in model.parameters() if is_nf4(p))


def test_nf4_refuses_the_flat_buffer_strategies(make_config):
    for strategy in ("yafsdp", "deepspeed"):
        with pytest.raises(UserError, match="nf4.*tensor subclass"):
            make_config(**NF4, parallel__strategy=strategy)


def test_planner_puts_llama3_8b_qlora_on_one_t4():
    """The plan QLoRA users run: Llama 3 8B on one 16 GB T4, the base in NF4 (fp16: a T4 has no
    bf16), where a bf16 base (16 GB of weights alone) fits nowhere."""
    from shoestring.plan.search import Request, search

    result = search(Request("llama3-8b", tokens=2e7, hardware=("t4:1",), mode="lora", seq_len=2048))
    assert result.plans and all(p.levers.base_dtype == "nf4" for p in result.plans)
    best = result.plans[0]
    assert best.levers.precision == "fp16" and best.memory.total <= best.device.memory_bytes
    nf4_params = best.memory.components["params"]
    assert 5.0e9 < nf4_params < 6.0e9  # 7.0 B block weights at ~0.52 byte + embedding and head in fp16
    assert any(p.levers.base_dtype == "bf16" for p in result.misses)


def test_fsdp2_refuses_an_nf4_weight_it_cannot_split(make_config):
    from shoestring.build import build_plain_model, check_nf4_sharding, shape_model

    cfg = make_config(**NF4, parallel__strategy="fsdp2")
    model = build_plain_model(cfg, 512, torch.device("cpu"))
    shape_model(cfg, model)
    check_nf4_sharding(cfg, model, 2)
    with pytest.raises(UserError, match="cannot split the NF4 weight layers.0.self_attn.q_proj.weight"):
        check_nf4_sharding(cfg, model, 3)
