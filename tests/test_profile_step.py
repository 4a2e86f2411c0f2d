"""benchmarks/profile_step.py's bucketing on a fake profiler event tree, and benchmarks/gemm_ceiling.py's shapes."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ps, gc = _load("profile_step"), _load("gemm_ceiling")


@dataclass
class Ev:
    name: str
    self_cpu_time_total: float = 0.0
    cpu_parent: "Ev | None" = None


@pytest.mark.parametrize("name, ancestors, expected", [
    ("aten::mm", ["MmBackward0"], "matmul"),
    ("aten::addmm", ["aten::linear"], "matmul"),
    ("aten::mm", ["_ChunkedLinearCrossEntropy"], "matmul"),  # the LM head's GEMM is a matmul, not loss
    ("aten::exp_", ["_ChunkedLinearCrossEntropy"], "loss"),
    ("aten::_log_softmax", ["aten::log_softmax", "aten::cross_entropy_loss"], "loss"),
    ("aten::bmm", ["aten::matmul", "CompiledFunctionBackward"], "attention"),
    ("aten::mm", ["BlockedCausalAttentionBackward"], "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", [], "attention"),
    ("graph_0_cpp_fused__log_softmax__scaled_dot_product_x_1", ["## Call CompiledFxGraph f"], "attention"),
    ("graph_0_cpp_fused__log_softmax_nll_loss_2", ["## Call CompiledFxGraph f"], "loss"),
    ("graph_0_cpp_fused_add_mean_mul_pow_rsqrt_0", ["## Call CompiledFxGraph f"], "element-wise/norm/rope/act"),
    ("aten::_fused_adamw_", ["Optimizer.step#AdamW.step", ps.OPTIMIZER], "optimizer"),
    ("aten::copy_", ["aten::_to_copy"], "alloc/copies"),
    ("aten::silu", [], "element-wise/norm/rope/act"),
    ("aten::view", ["aten::reshape"], "other"),
    ("CompiledFunction", ["Torch-Compiled Region: 0/0"], "other"),
])
def test_bucket(name, ancestors, expected):
    assert ps.bucket(name, ancestors) == expected


def test_split_attributes_self_time_through_the_parent_chain():
    opt = Ev(ps.OPTIMIZER, 5.0)
    loss = Ev("_ChunkedLinearCrossEntropy", 1.0)
    events = [opt, Ev("aten::copy_", 7.0, opt), loss, Ev("aten::mm", 10.0, loss), Ev("aten::sub_", 3.0, loss),
              Ev("aten::mul", 2.0), Ev("aten::empty", 4.0)]
    assert ps.split(events) == {"matmul": 10.0, "attention": 0.0, "element-wise/norm/rope/act": 2.0, "loss": 4.0,
                                "optimizer": 12.0, "alloc/copies": 4.0, "other": 0.0}


def test_gemm_shapes_of_the_small_preset():
    shapes = gc.layers("small")
    assert shapes["q"] == (512, 512) and shapes["k"] == (512, 256) and shapes["gate"] == (512, 1376)
    assert shapes["head"] == (512, 8192)
    assert gc.gemms(2048, 512, 1376) == {"fwd": (2048, 512, 1376), "dX": (2048, 1376, 512), "dW": (1376, 2048, 512)}
