"""Compile lever: `torch.compile` each transformer block on its own (regional compilation).

All blocks share one architecture, so dynamo compiles the first and reuses the code for the
rest: compile time is that of one block (~15-40 s on 2 CPU cores), not of the whole model. A
family with sliding and global layers (Gemma 2/3, Qwen with max_window_layers) compiles twice,
once per kind (the window is a constant of the graph).
What it buys is fusion of the elementwise work between matmuls (RMSNorm, RoPE, SwiGLU, the
residual adds and autocast's casts): on the small preset in bf16 on CPU that is most of the
non-matmul time (docs/performance.md). Inside a compiled block on CPU, attention also takes a
faster backward (`models/attention.py`: dense matmuls over query blocks instead of the slow CPU
flash-attention backward), whose element-wise steps only pay once fused.

`train.compile = "auto"` (the default) compiles where that pays, decided on the device's measured
facts (`decide`, which says why): on CUDA; on a CPU when the matmuls run in a half precision
that is fast here (fusing the element-wise work around fast matmuls is what is left to gain;
around bf16 matmuls ~100x slower than fp32, as on AVX2-only CPUs, compiling cannot help). fp32
on a CPU gains little for the compile time. Where compile cannot run
(no C++ compiler for inductor's CPU kernels, no triton for CUDA, an unsupported Python) the
blocks stay eager with a warning; an error while compiling a block at run time also falls back
to eager (dynamo's `suppress_errors`), logged by torch, instead of stopping the run.
Set SHOESTRING_COMPILE=off to make "auto" mean off (the test suite does, to stay fast).
"""

from __future__ import annotations

import os
import shutil
import warnings

import torch

from shoestring.levers.precision import Choice, DeviceFacts, PrecisionPolicy, rates_line
from shoestring.models.llama import Llama

ENV_SWITCH = "SHOESTRING_COMPILE"


def decide(setting: bool | str, facts: DeviceFacts, policy: PrecisionPolicy) -> Choice:
    """Resolve the `train.compile` setting (True, False or "auto") for this device and policy,
    with the reason (module docstring: the rule)."""
    if setting != "auto":
        return Choice(bool(setting), f"train.compile = {str(setting).lower()}")
    switch = os.environ.get(ENV_SWITCH, "")
    if switch.lower() in ("0", "off", "false", "no"):
        return Choice(False, f"{ENV_SWITCH}={switch}")
    if facts.kind == "cuda":
        return Choice(True, "CUDA: fuses the element-wise work between matmuls")
    if policy.compute_dtype == torch.float32:
        return Choice(False, "fp32 on a CPU gains little for the compile time")
    if not facts.fast(policy.mode):
        return Choice(False, f"{rates_line(facts, policy.mode)}: compiling cannot make slow matmuls fast")
    return Choice(True, f"{policy.mode} on a CPU with fast half-precision matmuls: fuses the element-wise work")


def unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run here, or None when it can."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python/platform"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "triton is not installed (inductor's CUDA kernels need it)"
    if device.type == "cpu":
        from torch._inductor import config as inductor_config

        cxx = inductor_config.cpp.cxx[-1] or os.environ.get("CXX") or "g++"
        return None if shutil.which(cxx) else f"no C++ compiler ({cxx}) for inductor's CPU kernels"
    return f"compile is not supported on {device.type}"


def compiled(model: Llama) -> bool:
    """Whether `compile_blocks` compiled this model's blocks: the loss then compiles its pass over
    the logits too (`models/loss.py`), so one decision covers both."""
    return any(getattr(b, "_compiled_call_impl", None) is not None for b in model.layers)


def compile_blocks(model: Llama, device: torch.device | None = None) -> bool:
    """Compile every block in place; returns False (blocks left eager, with a warning) when
    compile cannot run on `device`."""
    reason = unavailable(device or next(model.parameters()).device)
    if reason:
        warnings.warn(f"train.compile: {reason}; running the blocks eagerly", stacklevel=2)
        return False
    torch._dynamo.config.suppress_errors = True  # a block that fails to compile runs eagerly
    for block in model.layers:
        block.compile()
    return True
