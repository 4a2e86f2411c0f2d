"""LoRA under the data-parallel strategies (2 ranks, gloo): the frozen base needs no special
case in any strategy — only adapters get gradients and optimizer state — and the run follows
the single-process LoRA run with a small fraction of the optimizer state."""

from __future__ import annotations

import json

import pytest
import torch

from shoestring.export import checkpoint_weights
from tests.test_parallel import FP32_REL, assert_same_curve, curve, runs  # noqa: F401 (fixture)

LORA = dict(lora__enabled=True, lora__rank=4, lora__targets=["q_proj", "v_proj", "down_proj"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_lora_two_ranks_follow_single(runs, strategy):
    ref = runs.single("lora-single", **LORA)
    run = runs.launched(f"lora-{strategy}", parallel__strategy=strategy, **LORA)
    assert_same_curve(curve(ref), curve(run), FP32_REL)
    expected, _ = checkpoint_weights(ref)
    got, _ = checkpoint_weights(run)
    for k, v in expected.items():
        torch.testing.assert_close(got[k].float(), v.float(), rtol=1e-4, atol=1e-4, msg=k)
    mem = json.loads((run / "summary.json").read_text())["memory_bytes"]
    full = json.loads((runs.single() / "summary.json").read_text())["memory_bytes"]
    assert mem["optimizer"] < 0.1 * full["optimizer"]
