"""QLoRA: LoRA over a frozen base held in NF4 (`lora.base_dtype = "nf4"`, torchao's NF4Tensor)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from rich.console import Console

from shoestring.levers.lora import LoRASettings, apply_lora, dequantize_nf4, estimate, is_nf4, nf4_bytes, to_nf4
from shoestring.models import build_model, preset_args
from shoestring.train.memory import model_state_bytes
from shoestring.train.metrics import read_metrics
from shoestring.train.trainer import Trainer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao (pip install 'shoestring[qlora]')")
QUIET = Console(quiet=True)
NF4 = dict(lora__enabled=True, lora__rank=4, lora__base_dtype="nf4")


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_dequantisation_is_torchaos_bit_for_bit():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        w = to_nf4(torch.randn(176, 64), dtype)
        assert w.dtype == dtype and torch.equal(dequantize_nf4(w), w.get_original_weight())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_counted_base_bytes_equal_the_estimate(dtype):
    """What the NF4 tensors actually store (their inner tensors: codes, scales, factors, mean,
    code table), plus the unquantised embedding and norms, equals the lever's estimate."""
    args = preset_args("micro", vocab_size=512)
    settings = LoRASettings(rank=4, targets=("q_proj", "v_proj"), base_dtype=dtype, nf4=True)
    model = build_model(args)
    apply_lora(model, settings)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert sum(is_nf4(p) for p in frozen) == 7 * args.n_layers
    counted = model_state_bytes(model)["params"]
    assert counted == estimate(args, settings).params
    q = args.dim * args.dim  # one q_proj: 4 bits a weight, an int8 scale per 64, small metadata
    assert q / 2 + q / 64 < nf4_bytes((args.dim, args.dim), dtype.itemsize) < q / 2 + q / 64 + 64 * dtype.itemsize
