"""LoRA under the data-parallel strategies (2 ranks, gloo; DeepSpeed ZeRO-2 and -3 too): the
frozen base needs no special case in any strategy — only adapters get gradients and optimizer
state — and the run follows the single-process LoRA run, its base weights bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from shoestring.export import checkpoint_weights
from shoestring.levers.lora import ADAPTER_KEYS
from tests.test_parallel import FP32_REL, STRATEGIES, _params, assert_same_curve, curve, runs  # noqa: F401 (fixture)

LORA = dict(lora__enabled=True, lora__rank=4, lora__targets=["q_proj", "v_proj", "down_proj"])
CASES = {**STRATEGIES, "yafsdp": {"parallel__strategy": "yafsdp"}}


@pytest.mark.parametrize("strategy", [_params(c) for c in ("ddp", "fsdp2", "yafsdp", "zero2", "zero3")])
def test_lora_two_ranks_follow_single(runs, strategy):
    ref = runs.single("lora-single", **LORA)
    run = runs.launched(f"lora-{strategy}", **CASES[strategy], **LORA)
    assert_same_curve(curve(ref), curve(run), FP32_REL)
    expected, _ = checkpoint_weights(ref)
    got, _ = checkpoint_weights(run)
    assert got.keys() == expected.keys()
    adapter_params = sum(v.numel() for k, v in expected.items() if any(a in k for a in ADAPTER_KEYS))
    for k, v in expected.items():
        if any(a in k for a in ADAPTER_KEYS):
            torch.testing.assert_close(got[k].float(), v.float(), rtol=1e-4, atol=1e-4, msg=k)
        else:  # the frozen base leaves training bit for bit as it came in
            assert torch.equal(got[k], v), k
    mem = json.loads((run / "summary.json").read_text())["memory_bytes"]
    full = json.loads((runs.single() / "summary.json").read_text())["memory_bytes"]
    assert mem["optimizer"] < 0.1 * full["optimizer"]
    # The optimizer holds the adapters alone: AdamW's two fp32 moments each (plus step counters).
    assert mem["optimizer"] <= 8 * adapter_params + 256


def test_lora_yafsdp_holds_gradients_and_optimizer_state_for_its_adapter_shard_only(runs):
    """Counted by the engine: the adapters' 1/N shard of fp32 gradients and two Adam moments
    (plus one step counter); the frozen base shards hold none."""
    expected, _ = checkpoint_weights(runs.single("lora-single", **LORA))
    run = runs.launched("lora-yafsdp", **CASES["yafsdp"], **LORA)
    shard = -(-sum(v.numel() for k, v in expected.items() if any(a in k for a in ADAPTER_KEYS)) // 2)
    mem = json.loads((run / "summary.json").read_text())["memory_bytes"]
    assert mem["grads"] == 4 * shard and mem["optimizer"] == 8 * shard + 4
