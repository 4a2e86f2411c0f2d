"""The compile lever's decisions (no compilation here: a first compile costs tens of seconds)."""

from __future__ import annotations

import pytest
import torch

from shoestring.levers import compile as lever
from shoestring.levers.precision import DeviceFacts, PrecisionPolicy
from shoestring.models import build_model, preset_args

CPU = torch.device("cpu")
FAST_BF16 = DeviceFacts("cpu", {"fp32": 100e9, "bf16": 400e9, "fp16": 1e9})
SLOW_BF16 = DeviceFacts("cpu", {"fp32": 126e9, "bf16": 0.9e9, "fp16": 1e9})
GPU = DeviceFacts("cuda", {"fp32": 60e12, "bf16": 900e12, "fp16": 900e12}, (9, 0))


def test_auto_compiles_where_it_pays(monkeypatch):
    monkeypatch.delenv(lever.ENV_SWITCH, raising=False)
    assert lever.decide("auto", FAST_BF16, PrecisionPolicy("bf16")).value
    assert lever.decide("auto", FAST_BF16, PrecisionPolicy("bf16-pure")).value
    assert not lever.decide("auto", FAST_BF16, PrecisionPolicy("fp32")).value
    assert lever.decide("auto", GPU, PrecisionPolicy("fp32")).value
    assert lever.decide(True, FAST_BF16, PrecisionPolicy("fp32")).value
    assert not lever.decide(False, GPU, PrecisionPolicy("bf16")).value


def test_auto_does_not_compile_around_slow_bf16(monkeypatch):
    """Fusing the element-wise work cannot help where the matmuls themselves are ~100x slow; the
    reason names the measured figures."""
    monkeypatch.delenv(lever.ENV_SWITCH, raising=False)
    choice = lever.decide("auto", SLOW_BF16, PrecisionPolicy("bf16"))
    assert choice.value is False and "bf16 matmul 0.9 GFLOP/s vs fp32 126" in choice.reason
    assert lever.decide(True, SLOW_BF16, PrecisionPolicy("bf16")).value  # an explicit setting wins


def test_environment_switch_turns_auto_off(monkeypatch):
    monkeypatch.setenv(lever.ENV_SWITCH, "off")
    assert lever.decide("auto", FAST_BF16, PrecisionPolicy("bf16")) == (False, "SHOESTRING_COMPILE=off")
    assert lever.decide(True, FAST_BF16, PrecisionPolicy("bf16")).value  # an explicit setting wins


def test_falls_back_to_eager_with_a_warning(monkeypatch):
    monkeypatch.setattr(lever.shutil, "which", lambda name: None)
    model = build_model(preset_args("micro"))
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        assert lever.compile_blocks(model, CPU) is False
    assert all(block._compiled_call_impl is None for block in model.layers)
    model(torch.zeros(1, 4, dtype=torch.long))  # still runs, eagerly


def test_default_config_is_auto():
    from shoestring.config import build_config

    assert build_config({}).train.compile == "auto"
