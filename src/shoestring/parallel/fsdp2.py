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

Hybrid sharding (`parallel.shard_group`, HSDP): a 2-D device mesh (replicate x shard). The state
is sharded within each group of consecutive ranks and replicated across groups: the all-gathers
and reduce-scatters stay inside a group, and only the reduced gradient shards are all-reduced
across groups, once per optimizer step (skipped on the micro-steps before the last).

Checkpoints go through `torch.distributed.checkpoint` (every rank writes its shards into the
checkpoint's temporary directory), which reshards on load: a run saved on N ranks resumes on M,
with any shard group (DCP stores each tensor's global layout, not the mesh).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from shoestring import dist
from shoestring.config import ParallelSection
from shoestring.errors import UserError
from shoestring.levers.lora import dequantize_nf4, is_nf4
from shoestring.levers.precision import PrecisionPolicy
from shoestring.models.llama import Llama
from shoestring.parallel.base import (OptimizerSettings, StepResult, Strategy, WithLoss, make_adamw, require_file,
                                      scaled_step, with_state)
from shoestring.parallel.cost import (STEP_COUNTER_BYTES, Collective, Cost, Workload, dim0_shard_total,
                                      gathered_block_buffers,
                                      shard_group_size, torch_reduce_scatter)
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
        group = shard_group_size(options.shard_group, self.world_size, dist.local_world_size())
        self.hybrid = group < self.world_size
        self.mesh = mesh = device_mesh(device.type, self.world_size, group)
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
        self.optimizer = with_state(make_adamw(self.params, settings, device))
        self.scaler = policy.make_scaler(device.type)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_scale: float, last_micro_step: bool,
                         doc: torch.Tensor | None = None) -> torch.Tensor:
        # Gradients are reduce-scattered after every micro-step (not only the last): the
        # accumulated gradient then stays sharded, which is the point of FSDP. Across groups
        # (hybrid) the shards are all-reduced on the last micro-step only.
        if self.hybrid:
            self.module.set_requires_all_reduce(last_micro_step)
        loss = self._loss(x, y, doc)
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

    @classmethod
    def cost(cls, w: Workload) -> Cost:
        """fp32 shards of each trained tensor over the shard group, padded on dim 0 as FSDP2 lays
        them out (exact); a frozen base (LoRA) sharded with them. Per micro-step: every unit's
        weights (each block, and the root: embedding, norm, head) gathered in the policy's dtype
        in forward and again in backward (once when kept after forward; within groups of N when
        re-sharded to N), and every unit's fp32 gradient reduce-scattered; across groups (hybrid)
        the gradient shards are all-reduced once per step. Measured on gloo (tests/test_hybrid.py):
        these bytes, plus the gradient norm's scalars."""
        g = w.group
        local = dim0_shard_total(w.shapes, g)
        state = {"params": w.frozen_state(g) + 4 * local, "grads": 4 * local, "master": 0,
                 "optimizer": 8 * local + STEP_COUNTER_BYTES * len(w.shapes)}
        offloaded = ("optimizer", "master", "params", "grads") if w.options.cpu_offload else ()
        if w.world == 1:
            return Cost(state, offloaded=offloaded)
        p = cls.weight_dtype(w.policy).itemsize
        reshard = w.options.reshard_after_forward
        frozen = min(w.frozen_state(1), w.frozen_params * p)  # gathered in its own dtype where smaller
        units, accum = w.args.n_layers + 1, w.grad_accum
        weights = accum * (local * p + frozen / g)  # every unit's shards, gathered once
        gathers = [Collective("all_gather", weights, accum * units, "group", "weights (forward)")]
        if reshard is True:
            gathers.append(Collective("all_gather", weights, accum * units, "group", "weights (backward)"))
        elif reshard:  # re-sharded to groups of `reshard` ranks: backward gathers inside those
            gathers.append(Collective("all_gather", weights * g / reshard, accum * units, "group", "weights (backward)",
                                      size=reshard))
        scatter = Collective(torch_reduce_scatter(w.device_type), accum * 4 * local * g, accum * units, "group", "gradients")
        across = [Collective("all_reduce", 4 * local, units, "across", "gradient shards")] if w.replicas > 1 else []
        return Cost(state, gathered_block_buffers(w, p, frozen), (*gathers, scatter, *across), overlap=0.8, offloaded=offloaded)

    @staticmethod
    def label(options: ParallelSection) -> str:
        reshard = options.reshard_after_forward
        label = "fsdp2" + ("(no-reshard)" if reshard is False else "" if reshard is True else f"(reshard:{reshard})")
        if options.shard_group is not None:
            label += f"/hsdp:{options.shard_group}"
        return label + ("+offload" if options.cpu_offload else "")

    def comm_groups(self) -> dict[tuple[int, ...], str]:
        if not self.hybrid:
            return {}
        return {tuple(tdist.get_process_group_ranks(self.mesh.get_group(dim))): span
                for dim, span in (("shard", "group"), ("replicate", "across"))}

    def memory(self) -> dict[str, int]:
        return {**model_state_bytes(self.model, self.optimizer), "master": 0}

    def unwrapped(self) -> Llama:
        return self.model


def device_mesh(device_type: str, world: int, group: int) -> DeviceMesh:
    """Flat (1-D) when one group holds every rank; else replicate x shard, groups of `group`
    consecutive ranks along the shard dimension (FSDP2 then shards within and replicates across)."""
    if group == world:
        return init_device_mesh(device_type, (world,))
    return init_device_mesh(device_type, (world // group, group), mesh_dim_names=("replicate", "shard"))


def _dequantized(t: torch.Tensor) -> torch.Tensor:
    """A sharded NF4 weight as a plain sharded tensor (each rank's rows are whole NF4 blocks)."""
    if not (isinstance(t, DTensor) and is_nf4(t.to_local())):
        return t
    return DTensor.from_local(dequantize_nf4(t.to_local()), t.device_mesh, t.placements, shape=t.shape, stride=t.stride())
