"""The one interface every data-parallel strategy implements.

A strategy takes a plain model (levers like checkpointing and compile already applied), the
precision policy and the optimizer settings, and owns everything from there: wrapping/sharding
the model, the optimizer, loss scaling, master weights, gradient synchronisation. The trainer
calls only `forward_backward`, `step`, `state_dict`/`load_state_dict` and `memory`. Sharded
engines (FSDP2, YaFSDP-style, DeepSpeed as an adapter) fit by overriding the same methods.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shoestring.levers.precision import PrecisionPolicy


@dataclass(frozen=True)
class OptimizerSettings:
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float  # 0 disables clipping


@dataclass
class StepResult:
    grad_norm: torch.Tensor  # pre-clip global norm (device tensor: reading it syncs)
    skipped: bool  # the update was not applied (fp16 overflow or non-finite gradients)


def make_adamw(params: list[nn.Parameter], settings: OptimizerSettings, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights are not decayed). The fused
    kernel runs on CPU and CUDA in this torch release: one kernel for all parameters."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, fused=device.type in ("cpu", "cuda"))


class Strategy(abc.ABC):
    """What the trainer holds. `rank`/`world_size` describe data parallelism."""

    rank: int = 0
    world_size: int = 1
    device: torch.device
    policy: PrecisionPolicy

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abc.abstractmethod
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_scale: float, last_micro_step: bool) -> torch.Tensor:
        """Loss of one micro-batch, backpropagated with `loss_scale` (1/accumulation steps).
        Returns the unscaled loss, detached, still on the device."""

    @abc.abstractmethod
    def step(self, lr: float) -> StepResult:
        """Clip, apply the optimizer update at `lr`, zero the gradients."""

    @abc.abstractmethod
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss without gradients (same precision as training)."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def memory(self) -> dict[str, int]:
        """Exact bytes this rank holds for params, grads, optimizer state, master weights."""

    @abc.abstractmethod
    def unwrapped(self) -> nn.Module:
        """The plain model, for generation and export."""
