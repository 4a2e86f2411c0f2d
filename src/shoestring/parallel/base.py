"""The one interface every data-parallel strategy implements.

A strategy takes a plain model (levers like checkpointing and compile already applied), the
precision policy and the optimizer settings, and owns everything from there: wrapping/sharding
the model, the optimizer, loss scaling, master weights, gradient synchronisation, and the layout
of its state on disk. The trainer calls only `forward_backward`, `step`, `eval_loss`, `save` /
`load` and `memory`, on every rank. Sharded engines (FSDP2, YaFSDP-style, DeepSpeed as an
adapter) fit by implementing the same methods.

Checkpoints: `save(dir)` writes this strategy's files into a checkpoint's temporary directory
(every rank writes its own part; the trainer seals the directory atomically), `load(dir)` reads
them back, on whatever world size the strategy supports. `consolidated_weights(dir)` turns them
into one plain state dict offline (export, generation) without a process group.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from shoestring.config import ParallelSection
from shoestring.errors import UserError
from shoestring.levers.compile import compiled
from shoestring.levers.precision import PrecisionPolicy
from shoestring.parallel.cost import STEP_COUNTER_BYTES, Cost, Workload
from shoestring.models.loss import cross_entropy_from_hidden


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
    """AdamW with weight decay on matrices only (norm weights are not decayed)."""
    return adamw([p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2], settings, device)


def adamw(decay: list[nn.Parameter], no_decay: list[nn.Parameter], settings: OptimizerSettings,
          device: torch.device) -> torch.optim.AdamW:
    """AdamW, weight decay on `decay` only. The fused kernel runs on CPU and CUDA in this torch
    release: one kernel for all parameters."""
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, fused=device.type in ("cpu", "cuda"))


def with_state(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """`optimizer` with its state allocated now, at build, instead of in the first step. Created
    lazily, the state takes the place of the first step's freed activations, and the second step
    grows the heap for its own once more (60,000-67,000 page faults, 1.6-1.8x a later step's time,
    `small` bf16 on the CPU with freed memory kept); allocated first, every step's activations
    reuse the blocks the first step's left. The peak is the same: the state is there from the
    first step on either way. As torch's distributed checkpoint does for an empty optimizer: one
    step at lr 0 on zero gradients (an exact no-op on the weights), its step counters then reset."""
    groups = optimizer.param_groups
    params = [p for g in groups for p in g["params"]]
    lrs = [g["lr"] for g in groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for g in groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(groups, lrs):
        g["lr"] = lr
    for p in params:
        p.grad = None
        optimizer.state[p]["step"].zero_()
    return optimizer


def scaled_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                clip_grads: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """Unscale the gradients (a no-op without loss scaling), clip them (`clip_grads` returns the
    pre-clip global norm: clipping must see unscaled gradients) and apply the update unless they
    are not finite. With loss scaling the scaler decides, as `torch.amp.GradScaler` does: an
    inf/nan skips the update and halves the scale, `growth_interval` clean steps double it.
    Returns (pre-clip norm, skipped)."""
    scaler.unscale_(optimizer)
    grad_norm = clip_grads()
    if not scaler.is_enabled():
        skipped = not bool(torch.isfinite(grad_norm))
        if not skipped:
            optimizer.step()
        return grad_norm, skipped
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return grad_norm, scaler.get_scale() < scale


class RankAgreedGradScaler(torch.amp.GradScaler):
    """`torch.amp.GradScaler` for gradients that differ per rank (shards of one gradient): the
    inf/nan flag its unscale finds on this rank is summed over ranks by `all_reduce`, so every
    rank skips the same steps and moves its scale the same way. (FSDP2 needs none: the inf check
    on its DTensor gradients is all-reduced over the mesh by DTensor itself.)"""

    def __init__(self, device_type: str, policy: PrecisionPolicy, all_reduce: Callable[[torch.Tensor], None]):
        super().__init__(device_type, init_scale=policy.init_scale, growth_interval=policy.growth_interval,
                         enabled=policy.uses_loss_scaling)
        self.all_reduce = all_reduce

    def _unscale_grads_(self, optimizer: torch.optim.Optimizer, inv_scale: torch.Tensor, found_inf: torch.Tensor,
                        allow_fp16: bool) -> dict[torch.device, torch.Tensor]:
        found = super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        for flag in found.values():
            self.all_reduce(flag)
        return found


def require_file(directory: Path, name: str) -> Path:
    """`directory/name`, or a clear error when another strategy wrote the checkpoint."""
    path = directory / name
    if not path.exists():
        present = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        raise UserError(f"checkpoint {directory} has no {name} (it holds {present}): "
                        "it was written by another parallel.strategy",
                        "resume with the parallel.strategy that wrote it, or export it (shoestring export)")
    return path


class WithLoss(nn.Module):
    """The model and its loss in one forward. Wrappers act at forward boundaries (DDP's reducer,
    FSDP2's unshard/reshard, ZeRO-3's parameter gathers), so the tied head weight must be used
    inside a forward, not after it. The loss's pass over the logits is compiled where the blocks
    are (the compile lever's one decision)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.compiled = compiled(model)

    def forward(self, x: torch.Tensor, y: torch.Tensor, doc: torch.Tensor | None = None) -> torch.Tensor:
        return cross_entropy_from_hidden(self.model(x, doc), self.model.lm_head.weight, y,
                                         softcap=self.model.args.final_softcap, compiled=self.compiled)


def replicated_state_bytes(n_params: int, policy: PrecisionPolicy) -> dict[str, int]:
    """Model-state bytes of one full replica (params, grads, master, optimizer)."""
    return {k: n_params * v for k, v in policy.state_bytes_per_param().items()}


def replicated_state(w: Workload) -> dict[str, int]:
    """A full replica's state exactly, as the planner counts it: the trained tensors, the frozen
    base (LoRA) and AdamW's step counter per tensor."""
    state = replicated_state_bytes(w.n_params, w.policy)
    return {**state, "params": state["params"] + w.frozen_state(1),
            "optimizer": state["optimizer"] + STEP_COUNTER_BYTES * len(w.shapes)}


class Strategy(abc.ABC):
    """What the trainer holds. `rank`/`world_size` describe data parallelism."""

    rank: int = 0
    world_size: int = 1
    device: torch.device
    policy: PrecisionPolicy
    module: nn.Module  # the wrapped model: forward(x, y, doc) -> loss

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abc.abstractmethod
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_scale: float, last_micro_step: bool,
                         doc: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of one micro-batch, backpropagated with `loss_scale` (1/accumulation steps).
        `doc`: the document ids of packed rows (the model's argument), None for one per row.
        Returns the unscaled loss, detached, still on the device."""

    @abc.abstractmethod
    def step(self, lr: float) -> StepResult:
        """Clip, apply the optimizer update at `lr`, zero the gradients."""

    def discard(self) -> bool:
        """Drop a partial step's gradients after an out-of-memory error, so this process can redo
        the step; False where it cannot: with peers that may be waiting inside a collective of
        the step, or an engine whose internal state the error left mid-way (the run then
        restarts from its last checkpoint; shoestring.train.adapt)."""
        return False

    def _loss(self, x: torch.Tensor, y: torch.Tensor, doc: torch.Tensor | None) -> torch.Tensor:
        with self.policy.autocast(self.device.type):
            return self.module(x, y, doc)

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor, doc: torch.Tensor | None = None) -> torch.Tensor:
        """Loss without gradients (same precision as training)."""
        return self._loss(x, y, doc)

    @abc.abstractmethod
    def save(self, directory: Path) -> None:
        """Write this strategy's state into `directory` (called on every rank)."""

    @abc.abstractmethod
    def load(self, directory: Path) -> None:
        """Restore the state `save` wrote (called on every rank)."""

    @staticmethod
    @abc.abstractmethod
    def consolidated_weights(directory: Path) -> dict[str, torch.Tensor]:
        """The full model state dict from a checkpoint this strategy wrote (one process, CPU)."""

    @staticmethod
    def weight_dtype(policy: PrecisionPolicy) -> torch.dtype:
        """The dtype this strategy holds the trained weights (and their gradients) in, and
        gathers them in when it shards them: the policy's, unless the strategy has its own
        modes (DeepSpeed's fp16 and bf16). Autocast casts weights held in fp32 only."""
        return policy.param_dtype

    @staticmethod
    @abc.abstractmethod
    def state_bytes(n_params: int, world_size: int, policy: PrecisionPolicy, options: ParallelSection) -> dict[str, int]:
        """Estimated model-state bytes per rank (params, grads, master, optimizer), for the
        planner; `memory()` counts the same quantities."""

    @classmethod
    def cost(cls, w: Workload) -> Cost:
        """What this strategy costs one rank for `w` (state, buffers, the step's collectives),
        for the planner, which composes it without asking which strategy it is."""
        raise NotImplementedError(f"{cls.__name__} has no cost model")

    def comm_groups(self) -> dict[tuple[int, ...], str]:
        """The ranks of each sub-group this strategy communicates in, and the span it stands
        for in its cost model ("group", "across"), for the comm meter; none: the world only."""
        return {}

    @staticmethod
    def label(options: ParallelSection) -> str:
        """A short name for this strategy with these options, for plan tables."""
        return options.strategy

    @abc.abstractmethod
    def memory(self) -> dict[str, int]:
        """Exact bytes this rank holds for params, grads, optimizer state, master weights."""

    @abc.abstractmethod
    def unwrapped(self) -> nn.Module:
        """The plain model, for generation and export."""
