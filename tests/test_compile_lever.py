"""The compile lever's decisions (no compilation here: a first compile costs tens of seconds)."""

from __future__ import annotations

import pytest
import torch

from shoestring.levers import compile as lever
from shoestring.levers.precision import PrecisionPolicy
from shoestring.models import build_model, preset_args

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_compiles_where_it_pays(monkeypatch):
    monkeypatch.delenv(lever.ENV_SWITCH, raising=False)
    assert lever.wanted("auto", CPU, PrecisionPolicy("bf16"))
    assert lever.wanted("auto", CPU, PrecisionPolicy("bf16-pure"))
    assert not lever.wanted("auto", CPU, PrecisionPolicy("fp32"))
    assert lever.wanted("auto", CUDA, PrecisionPolicy("fp32"))
    assert lever.wanted(True, CPU, PrecisionPolicy("fp32")) and not lever.wanted(False, CUDA, PrecisionPolicy("bf16"))


def test_environment_switch_turns_auto_off(monkeypatch):
    monkeypatch.setenv(lever.ENV_SWITCH, "off")
    assert not lever.wanted("auto", CPU, PrecisionPolicy("bf16"))
    assert lever.wanted(True, CPU, PrecisionPolicy("bf16"))  # an explicit setting wins


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
