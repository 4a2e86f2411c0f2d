"""DeepSpeed ZeRO (stage 1, 2 or 3) as an adapter behind the strategy interface.

DeepSpeed owns the optimizer step, the backward and the gradient partitioning; the adapter
generates its JSON config from ours and maps the interface onto the engine:
`forward_backward` marks whether this micro-step ends the accumulation (so the engine reduces
then, and only then) and calls `engine.backward`, `step` calls `engine.step`. Our AdamW is handed
to DeepSpeed as the client optimizer, so the update is the same arithmetic as the other
strategies'. Precision: fp32 as is; bf16 is our autocast around fp32 weights; bf16-pure is
DeepSpeed's `bf16` mode (bf16 weights, fp32 master partitions); fp16 is DeepSpeed's `fp16` mode
(fp16 weights and gradients, fp32 master partitions) under our autocast, with DeepSpeed's own
dynamic loss scaler: it checks this rank's gradient partition for inf/nan and all-reduces the
flag, so every rank skips the same step. Its settings come from ours: the initial scale (a power
of two), `loss_scale_window` = growth_interval, hysteresis 1 (halve on every overflow, as
`torch.amp.GradScaler` does). Unlike GradScaler it doubles the scale after growth_interval + 1
clean steps, and stops the run when an overflow comes at its minimum scale (1). Its CPU
accelerator runs fp16 only on CPUs with native fp16 (AVX512-FP16 / AMX-FP16): elsewhere fp16
with DeepSpeed is refused at start.

ZeRO checkpoints are per rank and resume on the same number of ranks only (DeepSpeed's
universal-checkpoint conversion would lift that; not wired here); `consolidated_weights` uses
DeepSpeed's own zero_to_fp32 to rebuild the full weights for export.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from shoestring import dist
from shoestring.config import ParallelSection
from shoestring.errors import UserError
from shoestring.levers.precision import PrecisionPolicy
from shoestring.measure.memory import tensor_bytes
from shoestring.models.llama import Llama
from shoestring.parallel.base import OptimizerSettings, StepResult, Strategy, WithLoss, make_adamw, require_file
from shoestring.parallel.cost import STEP_COUNTER_BYTES, Collective, Cost, Workload, gathered_block_buffers

DS_DIR, TAG, META = "deepspeed", "state", "deepspeed.json"


def import_deepspeed(device_type: str) -> Any:
    """deepspeed, with its accelerator chosen before import (it reads DS_ACCELERATOR then)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device_type == "cuda" else "cpu")
    try:
        import deepspeed
    except ImportError as err:
        raise UserError(f"parallel.strategy = 'deepspeed' needs the deepspeed package ({err})",
                        "pip install 'shoestring[deepspeed]' (on CPU: DS_BUILD_OPS=0)") from None
    if device_type == "cpu":
        # Its CPU backend JIT-compiles a shared-memory all-reduce on first use (~90 s of C++ on
        # 2 cores); only its inference all-reduce uses it, training goes through gloo.
        # (Imported by name: `deepspeed.comm.torch` as an attribute is the torch package.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def check_fp16(deepspeed: Any, policy: PrecisionPolicy) -> None:
    """Refuse fp16 where DeepSpeed's accelerator does (it would raise deep inside `initialize`),
    and an initial loss scale its config cannot express."""
    if not policy.uses_loss_scaling:
        return
    accelerator = deepspeed.accelerator.get_accelerator()
    if not accelerator.is_fp16_supported():
        raise UserError(f"parallel.strategy = 'deepspeed' with precision.mode = 'fp16': DeepSpeed's "
                        f"{accelerator.device_name()} accelerator does not run fp16 here (on CPU it needs native fp16: "
                        "AVX512-FP16 or AMX-FP16)", "use fsdp2 or yafsdp for fp16 here, or another precision.mode")
    if not math.log2(policy.init_scale).is_integer():
        raise UserError(f"precision.init_scale = {policy.init_scale:g}: DeepSpeed's loss scale starts at a power of two",
                        "set precision.init_scale to a power of two, e.g. 65536")


def bucket_elements(block_numel: int) -> int:
    """Reduce / all-gather / prefetch bucket size: one transformer block (`ds_config`)."""
    return max(block_numel, 2**20)


def ds_config(policy: PrecisionPolicy, settings: OptimizerSettings, options: ParallelSection,
              block_numel: int) -> dict[str, Any]:
    """DeepSpeed's JSON config from ours. Its batch bookkeeping is unused (the trainer feeds the
    batches and marks accumulation boundaries), so it gets the trivial 1 x 1 split.

    Buckets are sized to one transformer block (`block_numel` elements), as FSDP2's units are:
    DeepSpeed's defaults (5e8-element reduce buckets, 5e7-element prefetch) are tuned for
    billion-parameter models and would hold a whole smaller model's gradients in one bucket."""
    buckets = bucket_elements(block_numel)
    zero: dict[str, Any] = {"stage": options.zero_stage, "reduce_bucket_size": buckets, "allgather_bucket_size": buckets,
                            "stage3_prefetch_bucket_size": buckets, "stage3_max_live_parameters": 2 * buckets}
    if options.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if options.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": dist.world_size(),
        "gradient_clipping": settings.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": policy.uses_master_weights},
        "fp16": {"enabled": policy.uses_loss_scaling, "loss_scale": 0,  # 0: dynamic
                 "initial_scale_power": round(math.log2(policy.init_scale)), "loss_scale_window": policy.growth_interval,
                 "hysteresis": 1},
        "zero_allow_untested_optimizer": True,  # our torch AdamW, the same update as elsewhere
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeed(Strategy):
    def __init__(self, model: Llama, policy: PrecisionPolicy, settings: OptimizerSettings, device: torch.device,
                 options: ParallelSection):
        deepspeed = import_deepspeed(device.type)
        check_fp16(deepspeed, policy)
        self.device, self.policy, self.settings, self.model, self.stage = device, policy, settings, model, options.zero_stage
        self.rank, self.world_size = dist.rank(), dist.world_size()
        block_numel = max(sum(p.numel() for p in block.parameters()) for block in model.layers)
        optimizer = make_adamw([p for p in model.parameters() if p.requires_grad], settings, device)
        self.module = self.engine = deepspeed.initialize(model=WithLoss(model), optimizer=optimizer,
                                               config=ds_config(policy, settings, options, block_numel), dist_init_required=False)[0]
        if self.stage == 3:  # the tied head weight is used by the loss, outside lm_head's own forward
            deepspeed.zero.register_external_parameter(self.engine.module, model.lm_head.weight)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_scale: float, last_micro_step: bool,
                         doc: torch.Tensor | None = None) -> torch.Tensor:
        self.engine.set_gradient_accumulation_boundary(last_micro_step)
        loss = self._loss(x, y, doc)
        self.engine.backward(loss * loss_scale, scale_wrt_gas=False)
        return loss.detach()

    def step(self, lr: float) -> StepResult:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        grad_norm = torch.as_tensor(float(norm) if norm is not None else float("nan"))
        # fp16: DeepSpeed's loss scaler skipped an overflow; otherwise a non-finite norm stands
        # for a step the trainer must treat as failed.
        applied = self.engine.was_step_applied() and bool(torch.isfinite(grad_norm))
        return StepResult(grad_norm=grad_norm, skipped=not applied)

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory / DS_DIR), tag=TAG, save_latest=False)
        if self.is_main:
            (directory / DS_DIR / META).write_text(json.dumps({"world_size": self.world_size, "zero_stage": self.stage}))

    def load(self, directory: Path) -> None:
        meta = json.loads(require_file(directory / DS_DIR, META).read_text())
        if (meta["world_size"], meta["zero_stage"]) != (self.world_size, self.stage):
            raise UserError(f"checkpoint {directory} was saved by ZeRO-{meta['zero_stage']} on {meta['world_size']} ranks; "
                            f"this run is ZeRO-{self.stage} on {self.world_size}: DeepSpeed checkpoints resume as saved",
                            f"resume with --nproc {meta['world_size']} and parallel.zero_stage = {meta['zero_stage']}")
        self.engine.load_checkpoint(str(directory / DS_DIR), tag=TAG, load_lr_scheduler_states=False)

    @staticmethod
    def consolidated_weights(directory: Path) -> dict[str, torch.Tensor]:
        import_deepspeed("cuda" if torch.cuda.is_available() else "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(require_file(directory, DS_DIR)), tag=TAG)
        return {k.removeprefix("model."): v for k, v in state.items()}

    @staticmethod
    def weight_dtype(policy: PrecisionPolicy) -> torch.dtype:
        """bf16 and fp16 in DeepSpeed's modes of those names (bf16-pure and fp16 here), which
        cast every parameter, a frozen base too; fp32 otherwise."""
        return {"bf16-pure": torch.bfloat16, "fp16": torch.float16}.get(policy.mode, torch.float32)

    @staticmethod
    def state_bytes(n_params: int, world_size: int, policy: PrecisionPolicy, options: ParallelSection) -> dict[str, int]:
        """ZeRO partitions optimizer state and the fp32 master copy (which DeepSpeed keeps even
        in fp32: a second copy of the weights); ZeRO-3 also the parameters. Gradients: DeepSpeed
        0.19 reduces each bucket into this rank's partition as backward goes, at stage 1 as at
        stage 2 (measured), so both hold a gradient partition plus a bucket; stage 2 differs from
        1 in what it may free, not in this steady state. Alignment padding is ignored."""
        w, shard = DeepSpeed.weight_dtype(policy).itemsize, n_params // world_size
        return {"params": w * (shard if options.zero_stage == 3 else n_params), "grads": w * shard,
                "master": 4 * shard, "optimizer": 8 * shard}

    @classmethod
    def cost(cls, w: Workload) -> Cost:
        """`state_bytes`, a frozen base (LoRA) replicated (cast to the weights' dtype in the
        half-precision modes) and one step counter per param group. ZeRO-1/2 reduce-scatter the
        gradients and all-gather the updated weights once a step, in one-block buckets (one held
        at a time); ZeRO-3 gathers each block in forward and backward and reduce-scatters its
        gradient every micro-step, as FSDP2 does. Gradient partitions persist across steps."""
        wb, n, opts = cls.weight_dtype(w.policy).itemsize, w.n_params, w.options
        state = cls.state_bytes(n, w.world, w.policy, opts)
        state["params"] += w.frozen_params * min(w.frozen_bytes, wb)
        state["optimizer"] += 2 * STEP_COUNTER_BYTES  # one flat tensor per param group (decay, no-decay)
        offloaded = ("optimizer", "master") if opts.offload_optimizer else ()
        if w.world == 1:
            return Cost(state, offloaded=offloaded, grads_freed=False)
        if opts.zero_stage < 3:
            bucket = bucket_elements(w.block_params)
            calls = -(-n // bucket)
            moves = (Collective("reduce_scatter", n * wb, calls, "world", "gradients"),
                     Collective("all_gather", n * wb / w.world, calls, "world", "updated weights"))
            return Cost(state, {"comm_buckets": min(bucket, n) * wb}, moves, overlap=0.5, offloaded=offloaded,
                        grads_freed=False)
        frozen = min(w.frozen_state(1), w.frozen_params * wb)
        units, accum = w.args.n_layers + 1, w.grad_accum
        moves = (Collective("all_gather", accum * 2 * (n * wb + frozen) / w.world, accum * units * 2, "world", "weights"),
                 Collective("reduce_scatter", accum * n * 4, accum * units, "world", "gradients"))
        return Cost(state, gathered_block_buffers(w, wb, frozen), moves, overlap=0.7, offloaded=offloaded, grads_freed=False)

    @staticmethod
    def label(options: ParallelSection) -> str:
        return f"zero-{options.zero_stage}" + ("+offload" if options.offload_optimizer else "")

    def memory(self) -> dict[str, int]:
        """Counted from the engine's own buffers: ZeRO-3's partitions (`ds_tensor`), the fp32
        master partitions, the gradient partitions (stage 2: `averaged_gradients`, stage 3: one
        flat buffer) and the client optimizer's state."""
        zero, seen = self.engine.optimizer, set()
        params = [getattr(p, "ds_tensor", p) for p in self.model.parameters()]
        masters = getattr(zero, "single_partition_of_fp32_groups", None) or getattr(zero, "fp32_partitioned_groups_flat", [])
        grads = [p.grad for p in self.model.parameters()], getattr(zero, "averaged_gradients", None), \
            getattr(zero, "grad_partitions_flat_buffer", None)
        return {"params": tensor_bytes(params, seen), "master": tensor_bytes(masters, seen),
                "grads": tensor_bytes(grads, seen), "optimizer": tensor_bytes(list(zero.optimizer.state.values()), seen)}

    def unwrapped(self) -> Llama:
        return self.model
