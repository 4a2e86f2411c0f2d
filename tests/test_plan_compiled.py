"""The planner's model of compiled blocks: what a `torch.compile`d block saves for backward equals
what the counter counts, and the planner compiles exactly where the trainer does."""

from __future__ import annotations

import pytest
import torch

from shoestring.levers import compile as compile_lever
from shoestring.levers.checkpointing import apply_checkpointing, block_saved_tensors, estimate_saved_activation_bytes
from shoestring.levers.precision import PrecisionPolicy, cast_model
from shoestring.measure.memory import SavedActivationCounter
from shoestring.models import PRESETS, ModelArgs, build_model
from shoestring.plan.catalogue import devices
from shoestring.plan.search import Request, compiled, search

needs_compile = pytest.mark.skipif(compile_lever.unavailable(torch.device("cpu")) is not None,
                                   reason="torch.compile cannot run here")


# Family switches in one block each: Gemma 3's (q/k norms, post-norms, norm offset, GeGLU,
# biases, a window: the flash kernel with a mask) and Gemma 2's soft-capped window (the blocked
# forward), a window shorter than the 32-token rows.
_FAMILY = dict(head_dim=24, post_norms=True, norm_offset=1.0, mlp_act="gelu_tanh", qkv_bias=True, o_bias=True, sliding_window=8)
GEMMA3_LIKE = ModelArgs(**{**PRESETS["micro"].__dict__, **_FAMILY, "qk_norm": True, "n_layers": 1})
GEMMA2_LIKE = ModelArgs(**{**PRESETS["micro"].__dict__, **_FAMILY, "attn_softcap": 2.0, "n_layers": 1})


@needs_compile
@pytest.mark.parametrize("precision,mode,args", [("bf16", "none", PRESETS["micro"]), ("bf16-pure", "selective", PRESETS["micro"]),
                                                 pytest.param("bf16-pure", "none", GEMMA3_LIKE, marks=pytest.mark.slow),
                                                 pytest.param("bf16-pure", "selective", GEMMA2_LIKE, marks=pytest.mark.slow)],
                         ids=["micro-bf16-none", "micro-bf16pure-selective", "gemma3like-none", "gemma2like-selective"])
def test_compiled_block_saves_what_the_estimate_says(precision, mode, args):
    torch._dynamo.reset()  # a recompile of another block would mark shapes dynamic (a saved size or two)
    batch, seq = 2, 32
    model = build_model(args, "cpu")
    policy = PrecisionPolicy(precision)
    if precision == "bf16-pure":
        cast_model(model, policy)
    apply_checkpointing(model, mode)
    block = model.layers[0]
    block.compile()
    dtype = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    x = torch.randn(batch, seq, args.dim, dtype=dtype, requires_grad=True)
    cos, sin = model.rope(seq)
    with SavedActivationCounter(model, exclude=[x, cos, sin]) as counter, policy.autocast("cpu"):
        out = block(x, cos, sin)
    out.float().sum().backward()
    # autocast's bf16 copies of the linears' weights are made inside the compiled graph, where the
    # counter cannot tell them from activations; the planner counts them apart (autocast_casts)
    casts = 2 * sum(p.numel() for p in block.parameters() if p.dim() == 2) if policy.uses_autocast else 0
    one_block = estimate_saved_activation_bytes(args.__class__(**{**args.__dict__, "n_layers": 1}), mode, batch, seq,
                                                precision, "cpu", compiled=True)
    expected = one_block - (batch * seq * args.dim * (2 if dtype == torch.bfloat16 else 4))  # the input is x itself
    assert counter.bytes - casts == expected


def test_compiled_rule_is_the_compile_levers(monkeypatch):
    monkeypatch.delenv(compile_lever.ENV_SWITCH, raising=False)  # the suite turns "auto" off
    cpu, gpu = devices()["cpu"], devices()["h100-80gb"]
    assert compiled("auto", cpu, "bf16") and compiled("auto", cpu, "bf16-pure") and not compiled("auto", cpu, "fp32")
    assert compiled("auto", gpu, "fp32") and not compiled(False, gpu, "bf16") and compiled(True, cpu, "fp32")
    monkeypatch.setenv(compile_lever.ENV_SWITCH, "off")
    assert not compiled("auto", cpu, "bf16")


def test_compiled_plans_save_less_and_carry_the_flag(monkeypatch):
    monkeypatch.delenv(compile_lever.ENV_SWITCH, raising=False)
    base = Request("small", 1e6, hardware=("a10g:1",), seq_len=256, fixed=(("precision", "bf16"), ("checkpointing", "none")))
    eager = search(Request(**{**base.__dict__, "compile": False})).plans[0]
    comp = search(Request(**{**base.__dict__, "compile": "auto"})).plans[0]
    assert comp.levers.compiled and not eager.levers.compiled
    assert comp.memory.components["activations"] < eager.memory.components["activations"]
    per = block_saved_tensors(PRESETS["small"], 1, 256, "bf16", "cuda", compiled=True)
    assert {n for n, _ in per["input"]} == {"block.input"} and "down_proj.out" not in {n for n, _ in per["saved_ops"]}


def test_recorded_run_repredicts_within_the_goals_and_the_fit_writes_toml(tmp_path, monkeypatch):
    """The committed calibration and model predict the recorded run's check set (benchmarks/
    planner_accuracy_raw_zen4.json, fitted to its fit set) within the issue's goals, and the fit
    comes out as a `[calibration.cpu]` block that `write_calibration` puts in place."""
    import json
    import shutil
    import tomllib
    from pathlib import Path

    from shoestring.bench import planner_accuracy as pa
    from shoestring.plan import catalogue

    raw = json.loads((Path(__file__).parents[1] / "benchmarks" / "planner_accuracy_raw_zen4.json").read_text())
    rows = pa.predict_rows(raw)
    check = [r for r in rows if r["set"] == pa.CHECK]
    assert check and all(abs(r["memory_error"]) <= 0.10 and abs(r["tokens_per_s_error"]) <= 0.20 for r in check)
    fitted = pa.fit([r for r in rows if r["set"] == pa.FIT])
    parsed = tomllib.loads(pa.calibration_toml(fitted, "test"))["calibration"]["cpu"]
    assert parsed["compiled"]["mfu"] == fitted["compiled"]["mfu"] and parsed["collective_s"] == fitted["collective_s"]
    copy = tmp_path / "hardware.toml"
    shutil.copy(catalogue.CATALOGUE_PATH, copy)
    monkeypatch.setattr(catalogue, "CATALOGUE_PATH", copy)
    try:
        pa.write_calibration(fitted, "test")
        assert catalogue.calibration("cpu")["compiled"]["mfu"] == fitted["compiled"]["mfu"]
        assert "t4" in tomllib.loads(copy.read_text())  # the devices are untouched
    finally:
        catalogue.calibration.cache_clear()
