"""Precision lever: which dtype each tensor of the step lives in, and what that costs.

| mode      | weights | matmuls | grads | optimizer sees          | extra                     |
|-----------|---------|---------|-------|-------------------------|---------------------------|
| fp32      | fp32    | fp32    | fp32  | the weights             |                           |
| bf16      | fp32    | bf16    | fp32  | the weights             | autocast                  |
| fp16      | fp32    | fp16    | fp32  | the weights             | autocast + loss scaling   |
| bf16-pure | bf16    | bf16    | bf16  | fp32 master copies      | grads copied to masters   |

`bf16-pure` halves weight/grad/activation bytes and skips autocast's per-op casts; the fp32
masters keep small updates from vanishing in bf16 rounding. fp16 needs dynamic loss scaling
because its exponent range is narrow: a step whose gradients overflow is skipped and the scale
halved (`torch.amp.GradScaler`).

`precision.mode = "auto"` (the default) is this lever's rule applied to what the device measured
(`resolve_precision`): on CUDA, bf16 where the hardware has bf16 tensor cores (compute
capability 8.0 and up), else fp16 with loss scaling; on a CPU, bf16 where its matmuls run at
least `BF16_GAIN` times fp32's here (AVX-512 BF16, AMX), else fp32 (AVX2-only CPUs run bf16
matmuls ~100x slower than fp32, and fp16 is emulated on every CPU we have seen). fp32 is never
the CUDA default: both half precisions pay there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping, NamedTuple

import torch
from torch import nn

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "bf16-pure": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
BF16_GAIN = 1.5  # bf16 pays where its matmuls beat fp32's by this much (the precision rule, the bench's goals)
SLOW = 2.0  # a precision whose matmuls are this much slower than fp32's here gets a warning


@dataclass(frozen=True)
class DeviceFacts:
    """What a device measured (plan/probe.py), or what the catalogue says of one: the input of
    every `auto` decision, so the decisions are pure functions, testable with injected facts."""
    kind: str  # "cpu" or "cuda"
    matmul_flops: Mapping[str, float] = field(default_factory=dict)  # "fp32"/"bf16"/"fp16" -> FLOP/s, 0: unsupported
    capability: tuple[int, int] | None = None  # CUDA compute capability

    def rate(self, mode: str) -> float:
        return self.matmul_flops.get(DTYPE_NAMES[_DTYPES[mode]], 0.0)

    def fast(self, mode: str) -> bool:
        """Whether `mode`'s matmuls run at least as fast as fp32's here."""
        return self.rate(mode) >= self.rate("fp32")


class Choice(NamedTuple):
    """An `auto` setting resolved: the value and why, in words a user can check."""
    value: str | bool
    reason: str


def rates_line(facts: DeviceFacts, mode: str) -> str:
    """'bf16 matmul 0.9 GFLOP/s vs fp32 126 here': the two measured figures a choice rests on."""
    dtype = DTYPE_NAMES[_DTYPES[mode]]
    unit, scale = ("TFLOP/s", 1e12) if facts.rate("fp32") >= 1e12 else ("GFLOP/s", 1e9)
    return (f"{dtype} matmul {facts.rate(mode) / scale:,.3g} {unit} vs fp32 "
            f"{facts.rate('fp32') / scale:,.3g} here")


def resolve_precision(facts: DeviceFacts) -> Choice:
    """`precision.mode = "auto"` on this device (module docstring: the rule and why)."""
    if facts.kind == "cuda":
        cc = ".".join(map(str, facts.capability)) if facts.capability else "unknown"
        if facts.capability is not None and facts.capability >= (8, 0):
            return Choice("bf16", f"compute capability {cc}: bf16 tensor cores")
        return Choice("fp16", f"compute capability {cc}: no bf16 tensor cores; fp16 with dynamic loss scaling")
    if facts.rate("bf16") >= BF16_GAIN * facts.rate("fp32"):
        return Choice("bf16", rates_line(facts, "bf16"))
    return Choice("fp32", rates_line(facts, "bf16"))


def slow_warning(mode: str, facts: DeviceFacts) -> str | None:
    """One line when a forced `mode` runs its matmuls more than `SLOW` times slower than fp32
    here (it still runs: the user may have reasons), else None."""
    rate, fp32 = facts.rate(mode), facts.rate("fp32")
    if mode == "fp32" or not fp32 or rate * SLOW > fp32:
        return None
    factor = f"{fp32 / rate:,.0f}x" if rate else "far"
    return (f"precision.mode = {mode!r} is {factor} slower than fp32 on this device ({rates_line(facts, mode)}); "
            "precision.mode = 'auto' chooses for the device")


@dataclass(frozen=True)
class PrecisionPolicy:
    mode: str
    init_scale: float = 2.0**16
    growth_interval: int = 2000

    def __post_init__(self) -> None:
        if self.mode not in _DTYPES:
            raise ValueError(f"unknown precision mode {self.mode!r}")

    @property
    def compute_dtype(self) -> torch.dtype:
        return _DTYPES[self.mode]

    @property
    def param_dtype(self) -> torch.dtype:
        """dtype of the weights the model computes with."""
        return torch.bfloat16 if self.mode == "bf16-pure" else torch.float32

    @property
    def uses_autocast(self) -> bool:
        return self.mode in ("bf16", "fp16")

    @property
    def uses_loss_scaling(self) -> bool:
        return self.mode == "fp16"

    @property
    def uses_master_weights(self) -> bool:
        return self.mode == "bf16-pure"

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        if not self.uses_autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.compute_dtype)

    def make_scaler(self, device_type: str) -> torch.amp.GradScaler:
        """A GradScaler that is a no-op unless the policy scales the loss."""
        return torch.amp.GradScaler(
            device_type,
            init_scale=self.init_scale,
            growth_interval=self.growth_interval,
            enabled=self.uses_loss_scaling,
        )

    # ---- cost -----------------------------------------------------------------------------
    def state_bytes_per_param(self, optimizer_states: int = 2) -> dict[str, int]:
        """Bytes per parameter of model state on one unsharded replica (AdamW: 2 fp32 states)."""
        weight = self.param_dtype.itemsize
        return {
            "params": weight,
            "grads": weight,
            "master": 4 if self.uses_master_weights else 0,
            "optimizer": 4 * optimizer_states,
        }

    @property
    def activation_bytes(self) -> int:
        """Element size of the activations that matmuls save (what checkpointing trades)."""
        return self.compute_dtype.itemsize


class MasterWeights:
    """fp32 copies of low-precision weights, which the optimizer owns and steps on.

    After backward the low-precision grads are copied into the masters' fp32 `.grad`; after the
    optimizer step the masters are copied back (rounded) into the model's weights.
    """

    def __init__(self, params: list[nn.Parameter]):
        self.model_params = params
        self.masters = [nn.Parameter(p.detach().float().clone(), requires_grad=True) for p in params]

    def params(self) -> list[nn.Parameter]:
        return self.masters

    @torch.no_grad()
    def grads_to_masters(self) -> None:
        for p, m in zip(self.model_params, self.masters):
            if p.grad is None:
                m.grad = None
            else:
                m.grad = p.grad.float()
                p.grad = None

    @torch.no_grad()
    def masters_to_model(self) -> None:
        for p, m in zip(self.model_params, self.masters):
            p.copy_(m)

    def state_dict(self) -> list[torch.Tensor]:
        return [m.detach() for m in self.masters]

    @torch.no_grad()
    def load_state_dict(self, tensors: list[torch.Tensor]) -> None:
        for m, t in zip(self.masters, tensors):
            m.copy_(t)
        self.masters_to_model()


def cast_model(model: nn.Module, policy: PrecisionPolicy) -> None:
    """Put the weights in the policy's param dtype (only bf16-pure changes anything).
    Buffers (RoPE tables) stay fp32: they are cheap and their precision matters. A weight
    already in that dtype is left alone (a quantised base would be dequantised by `.to`)."""
    if policy.param_dtype != torch.float32:
        for p in model.parameters():
            if p.dtype != policy.param_dtype:
                p.data = p.data.to(policy.param_dtype)


def trainable(model: nn.Module) -> Iterator[nn.Parameter]:
    return (p for p in model.parameters() if p.requires_grad)
