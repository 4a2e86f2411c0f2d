"""FSDP2 (`torch.distributed.fsdp.fully_shard`): each rank holds 1/N of every parameter, its
gradient and its optimizer state, as DTensor shards. Each transformer block is one
all-gather/reduce-scatter unit, the root (embedding, final norm, tied head) another.

Precision lever mapping: fp32 and bf16 (autocast) keep fp32 parameters and communicate in fp32;
bf16-pure becomes `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: the sharded fp32
parameters are the master weights, gathered and computed in bf16, gradients reduced in fp32 (so
no separate master copy, and no bf16 reduce-scatter, which gloo lacks). fp16 is autocast like
bf16, with dynamic loss scaling by `torch.amp.GradScaler` over the sharded gradients: its inf/nan
check (`_amp_foreach_non_finite_check_and_unscale_`) dispatches on DTensors to a handler that
all-reduces the flag (max) over the mesh, so an overflow in any rank's shard skips the step and
halves the scale on every rank alike. Clipping sees the unscaled gradients (`scaled_step`); the
scaler's state is saved with the shards.

Checkpoints go through `torch.distributed.checkpoint` (every rank writes its shards into the
checkpoint's temporary directory), which reshards on load: a run saved on N ranks resumes on M.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from shoestring import dist
from shoestring.config import ParallelSection
from shoestring.errors import UserError
from shoestring.levers.lora import dequantize_nf4, is_nf4
from shoestring.levers.precision import PrecisionPolicy
from shoestring.models.llama import Llama
from shoestring.parallel.base import (OptimizerSettings, StepResult, Strategy, WithLoss, make_adamw, require_file,
                                      scaled_step)
from shoestring.measure.memory import model_state_bytes

DCP_DIR = "dcp"


def mixed_precision(policy: PrecisionPolicy) -> MixedPrecisionPolicy:
    if policy.uses_master_weights:
        return MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


class FSDP2(Strategy):
    def __init__(self, model: Llama, policy: PrecisionPolicy, settings: OptimizerSettings, device: torch.device,
                 options: ParallelSection):
        self.device, self.policy, self.settings, self.model = device, policy, settings, model
        self.rank, self.world_size = dist.rank(), dist.world_size()
        mesh = init_device_mesh(device.type, (self.world_size,))
        shard = dict(mesh=mesh, reshard_after_forward=options.reshard_after_forward, mp_policy=mixed_precision(policy),
                     offload_policy=CPUOffloadPolicy() if options.cpu_offload else OffloadPolicy())
        blocks = list(model.layers)
        for block in blocks:
            fully_shard(block, **shard)
        self.module = fully_shard(WithLoss(model), **shard)
        if options.prefetch:  # gather the next blocks' weights while this one computes
            k = options.prefetch
            for i, block in enumerate(blocks):
                block.set_modules_to_forward_prefetch(blocks[i + 1 : i + 1 + k])
                block.set_modules_to_backward_prefetch(blocks[max(0, i - k) : i][::-1])
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_adamw(self.params, settings, device)
        self.scaler = policy.make_scaler(device.type)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_scale: float, last_micro_step: bool) -> torch.Tensor:
        # Gradients are reduce-scattered after every micro-step (not only the last): the
        # accumulated gradient then stays sharded, which is the point of FSDP.
        loss = self._loss(x, y)
        self.scaler.scale(loss * loss_scale).backward()
        return loss.detach()

    def step(self, lr: float) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm, skipped = scaled_step(self.optimizer, self.scaler, self._clip)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm=grad_norm.detach(), skipped=skipped)

    def _clip(self) -> torch.Tensor:
        max_norm = self.settings.grad_clip if self.settings.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        return grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm

    def _sharded_state(self, saved_keys: set[str] | None = None) -> dict:
        """What a checkpoint holds: the shards, and the loss scaler's state when there is one
        (left out on load when the checkpoint has none: a run resumed in another precision). An
        NF4 base (QLoRA) goes to disk dequantised, as plain shards: DCP reshards those on load
        and export reads them without torchao; the NF4 codes themselves are rebuilt from
        model.source on resume (`load`)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": {k: _dequantized(v) for k, v in model_sd.items()}, "optim": optim_sd}
        if self.scaler.is_enabled() and (saved_keys is None or any(k.startswith("scaler.") for k in saved_keys)):
            state["scaler"] = self.scaler.state_dict()
        return state

    def save(self, directory: Path) -> None:
        dcp.save(self._sharded_state(), checkpoint_id=directory / DCP_DIR)

    def load(self, directory: Path) -> None:
        reader = dcp.FileSystemReader(require_file(directory, DCP_DIR))
        state = self._sharded_state(set(reader.read_metadata().state_dict_metadata))
        dcp.load(state, storage_reader=reader)
        quantised = {k: v for k, v in get_state_dict(self.model, [])[0].items() if is_nf4(v.to_local())}
        for key, weight in quantised.items():  # frozen: the rebuilt base must be the checkpoint's
            if not torch.equal(_dequantized(weight).to_local(), state["model"].pop(key).to_local()):
                raise UserError(f"the NF4 base weight {key} differs from the checkpoint's",
                                "model.source changed since the run started: resume from the same source")
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=not quantised))
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    @staticmethod
    def consolidated_weights(directory: Path) -> dict[str, torch.Tensor]:
        reader = dcp.FileSystemReader(require_file(directory, DCP_DIR))
        meta = reader.read_metadata().state_dict_metadata
        state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
                 if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
        dcp.load(state, storage_reader=reader, no_dist=True)
        return {k.removeprefix("model."): v for k, v in state.items()}

    @staticmethod
    def state_bytes(n_params: int, world_size: int, policy: PrecisionPolicy, options: ParallelSection) -> dict[str, int]:
        """fp32 shards whatever the precision (under bf16-pure they are the masters); the
        gathered bf16/fp32 copies live only while a block runs. Padding (dim 0 rounded up to a
        multiple of N) is ignored."""
        shard = n_params // world_size
        return {"params": 4 * shard, "grads": 4 * shard, "master": 0, "optimizer": 8 * shard}

    def memory(self) -> dict[str, int]:
        return {**model_state_bytes(self.model, self.optimizer), "master": 0}

    def unwrapped(self) -> Llama:
        return self.model


def _dequantized(t: torch.Tensor) -> torch.Tensor:
    """A sharded NF4 weight as a plain sharded tensor (each rank's rows are whole NF4 blocks)."""
    if not (isinstance(t, DTensor) and is_nf4(t.to_local())):
        return t
    return DTensor.from_local(dequantize_nf4(t.to_local()), t.device_mesh, t.placements, shape=t.shape, stride=t.stride())
