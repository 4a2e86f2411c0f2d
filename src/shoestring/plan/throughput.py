"""Step time of one candidate plan: compute, recompute, communication and offload.

    compute   = tokens per device per step x FLOPs per token / (peak[dtype] x achievable MFU);
                for LoRA the removed FLOPs save only their matmul time (`compute_seconds`); an
                NF4 base adds its dequantisation, memory-bound, in forward and backward (and in
                a checkpointed block's recompute): the lever's bytes / memory bandwidth
    recompute = checkpointing's extra time: its matmul FLOP fraction on GPUs (`full`, `every:K`);
                the device class's measured multiplier where element-wise work dominates (CPU)
    comm      = the strategy's bytes per step / per-device link bandwidth, partly hidden
                behind compute (`OVERLAP`; on the CPU, gloo runs on the cores that compute, so
                the calibrated `comm_overlap` applies instead), plus a fixed cost per collective
                call, per strategy (`collective_s` in hardware.toml, calibrated: on gloo each FSDP2
                group's gather or reduce-scatter costs hooks, copies and synchronisation besides
                its bytes, YaFSDP's flat buffers about a third of that, DDP's bucketed all-reduce
                next to nothing)
    offload   = optimizer state over PCIe and back, plus a host AdamW pass, not hidden

Achievable MFU per device comes from the catalogue (published training runs for GPUs, this
machine's measurement for the CPU: see docs/planner.md). Compiled blocks (the compile lever,
`Levers.compiled`) fuse the element-wise work between matmuls, which on the CPU is most of a
bf16 step: the CPU calibration has a `compiled` table (MFU and checkpointing multipliers) that
applies to compiled plans over the eager constants.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoestring.levers.checkpointing import checkpointed_blocks, estimate_recompute_flops_fraction, parse_mode
from shoestring.levers.precision import PrecisionPolicy
from shoestring.parallel.yafsdp import FrozenBase, YaFSDP
from shoestring.plan.catalogue import Device, calibration
from shoestring.plan.memory import DS_BUCKET_ELEMENTS, Levers
from shoestring.plan.model import ModelInfo, Trainable

# Fraction of communication time hidden behind compute. DDP all-reduces buckets during
# backward (the last bucket is exposed); FSDP2 prefetches the next block's all-gather; ZeRO-1/2
# reduce during backward but all-gather updated params after the step, exposed. YaFSDP prefetches
# the next block's gather and reduce-scatters during backward like FSDP2 (its root and norms'
# reduce-scatter in the step is exposed, and small).
OVERLAP = {"ddp": 0.8, "fsdp2": 0.8, "yafsdp": 0.8, "zero-1": 0.5, "zero-2": 0.5, "zero-3": 0.7, "single": 0.0}
HOST_ADAM_PARAMS_PER_S = 1.0e9  # DeepSpeed CPU Adam on a server host: ~1 B params/s (order of magnitude)


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    recompute_s: float
    comm_s: float  # exposed communication
    offload_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.recompute_s + self.comm_s + self.offload_s


def compute_dtype(precision: str) -> str:
    return "fp32" if precision == "fp32" else ("fp16" if precision == "fp16" else "bf16")


def device_calibration(device: Device, compiled: bool) -> dict:
    return with_compiled(calibration("cpu" if device.kind == "cpu" else "gpu"), compiled)


def with_compiled(cal: dict, compiled: bool) -> dict:
    """A calibration; for compiled blocks, its `compiled` table over it (a table in both, such
    as `mfu`, merged key by key: what compiled runs did not measure stays)."""
    if not compiled:
        return cal
    over = cal.get("compiled", {})
    return {**cal, **{k: {**cal[k], **v} if isinstance(v, dict) and isinstance(cal.get(k), dict) else v
                      for k, v in over.items()}}


def achievable_mfu(device: Device, precision: str, compiled: bool = False) -> float:
    if device.kind == "cpu":
        return device_calibration(device, compiled).get("mfu", {}).get(precision, device.mfu)
    return device.mfu


def overlap(device: Device, levers: Levers) -> float:
    if device.kind == "cpu":
        return calibration("cpu").get("comm_overlap", 0.0)
    return OVERLAP.get(levers.strategy_label().split("+")[0].split("(")[0], 0.7)


def collectives(info: ModelInfo, trainable: Trainable, levers: Levers, world: int) -> int:
    """Collective calls per optimizer step: DDP's gradient buckets (25 MB) once; the sharded
    strategies' per-group gathers (twice when resharding after forward) and reduce-scatter on
    every micro-step, one group per block plus the root; ZeRO-1/2's buckets, reduced and
    gathered once."""
    if world <= 1:
        return 0
    if levers.strategy == "ddp":
        return -(-trainable.n_params * levers.weight_bytes() // (25 * 2**20))
    if levers.strategy == "deepspeed" and levers.zero_stage < 3:
        return 2 * -(-trainable.n_params // DS_BUCKET_ELEMENTS)
    gathers = 2 if levers.reshard_after_forward or levers.strategy == "yafsdp" else 1
    return (info.args.n_layers + 1) * (gathers + 1) * levers.grad_accum


def collective_seconds(cal: dict, strategy: str) -> float:
    """The calibrated fixed cost of one collective call of `strategy` (its hooks, copies and
    synchronisation around the bytes); a strategy not calibrated takes the largest measured."""
    per = cal.get("collective_s", {})
    return per.get(strategy, max(per.values(), default=0.0))


def recompute_multiplier(info: ModelInfo, device: Device, mode: str, seq_len: int, compiled: bool = False) -> float:
    """Step-time multiplier of a checkpointing mode (1.0 = no extra time)."""
    kind, _ = parse_mode(mode)
    if kind in ("none", "offload"):
        return 1.0
    cal = device_calibration(device, compiled)
    share = len(checkpointed_blocks(info.args.n_layers, mode)) / info.args.n_layers
    if kind == "selective":
        return 1.0 + share * (cal.get("time_selective", 1.03) - 1.0)
    if "time_full" in cal:
        return 1.0 + share * (cal["time_full"] - 1.0)
    return 1.0 + estimate_recompute_flops_fraction(mode, info.args, seq_len)


def comm_bytes(info: ModelInfo, trainable: Trainable, levers: Levers, world: int) -> float:
    """Bytes each device sends per optimizer step (ring algorithms: (N-1)/N of the data per
    all-gather or reduce-scatter, twice that per all-reduce)."""
    if world <= 1:
        return 0.0
    f = (world - 1) / world
    n = trainable.n_params
    grad = 4 if levers.strategy == "fsdp2" else levers.weight_bytes()  # FSDP2 reduces in fp32
    if levers.strategy == "ddp":
        return 2 * f * n * grad
    if levers.strategy == "deepspeed" and levers.zero_stage < 3:
        return 2 * f * n * grad  # reduce-scatter grads + all-gather params
    if levers.strategy == "yafsdp":  # the engine's own count of the full tensors it moves
        base = FrozenBase.counted(n, trainable.frozen_params, trainable.frozen_bytes)
        moved = YaFSDP.communication_bytes(info.args, world, PrecisionPolicy(levers.precision), levers.parallel_options(),
                                           levers.grad_accum, base)
        return f * sum(moved.values())
    # fsdp2 / zero-3: all-gather params in forward (+ again in backward when resharded) and
    # reduce-scatter grads, every micro-step; frozen (LoRA) weights are gathered too, in their
    # own dtype where that is smaller (a bf16 or NF4 base).
    gather = levers.weight_bytes()
    gathers = 2 if levers.reshard_after_forward else 1
    gathered = n * gather + min(trainable.frozen_state_bytes(), trainable.frozen_params * gather)
    per_micro = f * (gathered * gathers + n * 4)
    return per_micro * levers.grad_accum


def compute_seconds(at_peak: float, full_at_peak: float, mfu: float) -> float:
    """A step's compute: its matmul FLOPs at the peak (`at_peak`), plus the rest of the work,
    which the MFU calibration measures as (1/MFU - 1) times the matmul time of the full model's
    step (`full_at_peak`). A parameter-efficient lever (LoRA: no weight gradients for the frozen
    base) removes matmul FLOPs but not the element-wise work between them; with every weight
    training the two are the same and this is `at_peak / mfu`."""
    return at_peak + full_at_peak * (1 / mfu - 1)


def step_time(info: ModelInfo, trainable: Trainable, levers: Levers, device: Device, world: int, seq_len: int,
              flops_per_token: float) -> StepTime:
    tokens = levers.micro_batch * levers.grad_accum * seq_len
    peak = device.peak_flops(compute_dtype(levers.precision))
    cal = device_calibration(device, levers.compiled)
    compute = compute_seconds(tokens * flops_per_token / peak, tokens * info.flops_per_token(seq_len) / peak,
                              achievable_mfu(device, levers.precision, levers.compiled))
    recompute = compute * (recompute_multiplier(info, device, levers.checkpointing, seq_len, levers.compiled) - 1.0)
    if trainable.dequant_bytes is not None:  # a quantised base: one memory-bound pass per forward, backward, recompute
        dequant = levers.grad_accum * trainable.dequant_bytes(levers.compiled) / (device.mem_bw_gbs * 1e9)
        compute += 2 * dequant
        if parse_mode(levers.checkpointing)[0] != "offload":
            recompute += dequant * len(checkpointed_blocks(info.args.n_layers, levers.checkpointing)) / info.args.n_layers
    comm = comm_bytes(info, trainable, levers, world) / (device.link_gbs(world) * 1e9)
    hidden = overlap(device, levers) * (compute + recompute)
    exposed = max(comm - hidden, comm * 0.1) if comm else 0.0
    exposed += collectives(info, trainable, levers, world) * collective_seconds(cal, levers.strategy)
    offload = 0.0
    if levers.offload:
        shard = trainable.n_params / world
        offload = 2 * shard * 4 / (device.host_gbs * 1e9) + shard / HOST_ADAM_PARAMS_PER_S
    if parse_mode(levers.checkpointing)[0] == "offload":
        from shoestring.levers.checkpointing import describe

        moved = describe(levers.checkpointing, info.args, levers.micro_batch, seq_len, levers.precision, device.kind)
        offload += levers.grad_accum * moved.get("transfer_bytes_per_step", 0) / (device.host_gbs * 1e9) * 0.5
    return StepTime(compute, recompute, exposed, offload)
