"""One device, whole model: the reference every other strategy must reproduce.

Subclasses that keep a full replica per rank (DDP) reuse this and change only how the model is
wrapped and when gradients are synchronised. Their state is the same on every rank, so rank 0
alone writes it (`strategy.pt`) and any world size can read it back.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shoestring.config import ParallelSection
from shoestring.levers.precision import MasterWeights, PrecisionPolicy, cast_model
from shoestring.models.llama import Llama
from shoestring.parallel.cost import Cost, Workload
from shoestring.parallel.base import (OptimizerSettings, StepResult, Strategy, WithLoss, make_adamw, replicated_state,
                                      replicated_state_bytes, require_file, scaled_step, with_state)
from shoestring import checkpoint as ckpt
from shoestring.measure.memory import model_state_bytes

STATE_FILE = "strategy.pt"


class SingleDevice(Strategy):
    def __init__(self, model: Llama, policy: PrecisionPolicy, settings: OptimizerSettings, device: torch.device,
                 options: ParallelSection | None = None):
        self.device, self.policy, self.settings = device, policy, settings
        self.options = options or ParallelSection()
        cast_model(model, policy)
        self.model = model
        self.module = self.wrap(WithLoss(model))
        params = [p for p in model.parameters() if p.requires_grad]
        self.master = MasterWeights(params) if policy.uses_master_weights else None
        self.opt_params = self.master.params() if self.master else params
        self.optimizer = with_state(make_adamw(self.opt_params, settings, device))
        self.scaler = policy.make_scaler(device.type)
        self.step_grad_bytes = 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """Hook for replicated strategies (DDP wraps here)."""
        return module

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Hook: suppress gradient synchronisation on non-final micro-steps."""
        return contextlib.nullcontext()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_scale: float, last_micro_step: bool,
                         doc: torch.Tensor | None = None) -> torch.Tensor:
        with contextlib.nullcontext() if last_micro_step else self.no_sync():
            loss = self._loss(x, y, doc)
            self.scaler.scale(loss * loss_scale).backward()
        return loss.detach()

    def step(self, lr: float) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # What backward left behind (in the weights' dtype), before it is freed below.
        self.step_grad_bytes = model_state_bytes(self.model)["grads"]
        if self.master:
            self.master.grads_to_masters()
        max_norm = self.settings.grad_clip if self.settings.grad_clip > 0 else float("inf")
        grad_norm, skipped = scaled_step(self.optimizer, self.scaler, lambda: torch.nn.utils.clip_grad_norm_(
            self.opt_params, max_norm, foreach=True))
        self.optimizer.zero_grad(set_to_none=True)
        if self.master and not skipped:
            self.master.masters_to_model()
        return StepResult(grad_norm=grad_norm.detach(), skipped=skipped)

    def discard(self) -> bool:
        """Alone, nothing else holds the step: its gradients are all there is to drop (the loss
        scaler and the optimizer move only in `step`)."""
        self.model.zero_grad(set_to_none=True)
        return True

    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        if self.master:
            state["master"] = self.master.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.master:
            self.master.load_state_dict(state["master"])

    def save(self, directory: Path) -> None:
        if self.is_main:
            ckpt.write_file(directory / STATE_FILE, ckpt.torch_bytes(self.state_dict()))

    def load(self, directory: Path) -> None:
        self.load_state_dict(ckpt.load_path(require_file(directory, STATE_FILE)))

    @staticmethod
    def consolidated_weights(directory: Path) -> dict[str, torch.Tensor]:
        return ckpt.load_path(require_file(directory, STATE_FILE))["model"]

    @staticmethod
    def state_bytes(n_params: int, world_size: int, policy: PrecisionPolicy, options: ParallelSection) -> dict[str, int]:
        return replicated_state_bytes(n_params, policy)

    @classmethod
    def cost(cls, w: Workload) -> Cost:
        return Cost(replicated_state(w))

    def memory(self) -> dict[str, int]:
        counted = model_state_bytes(self.model, self.optimizer)
        # Gradients are freed after each step; report what the step held.
        counted["grads"] = max(counted["grads"], self.step_grad_bytes)
        counted["master"] = sum(m.numel() * m.element_size() for m in self.master.masters) if self.master else 0
        return counted

    def unwrapped(self) -> Llama:
        return self.model
