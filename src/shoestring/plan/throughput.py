"""Step time of one candidate plan: compute, recompute, communication and offload.

    compute   = tokens per device per step x FLOPs per token / (peak[dtype] x achievable MFU),
                attention's FLOPs at their own calibrated rate on the CPU (`attention_mfu`);
                for LoRA the removed FLOPs save only their matmul time (`compute_seconds`); an
                NF4 base adds its dequantisation, memory-bound, in forward and backward (and in
                a checkpointed block's recompute): the lever's bytes / memory bandwidth
    recompute = checkpointing's extra time: its matmul FLOP fraction on GPUs (`full`, `every:K`);
                the device class's measured multiplier where element-wise work dominates (CPU)
    comm      = the strategy's collectives (its own cost model), each priced on the links it
                crosses (plan/network.py: latency per call and ring step, bytes over the slowest
                link), partly hidden behind compute: on GPUs by the strategy's own `overlap`; on
                the CPU (`cpu_exposed_comm`), where gloo's threads share the cores that compute,
                by the calibrated share of each strategy's bytes' time that runs beside the
                compute (`comm_overlap`, per strategy: DDP all-reduces its buckets while
                backward still runs), plus a fixed cost per collective call (`collective_s`:
                hooks, copies and synchronisation around the bytes, never hidden); the fit
                takes both from one row per strategy by the inverse rule (`split_exposed`)
    offload   = optimizer state over PCIe and back, plus a host AdamW pass, not hidden

Achievable MFU per device comes from the catalogue (published training runs for GPUs, this
machine's measurement for the CPU: see docs/planner.md). Compiled blocks (the compile lever,
`Levers.compiled`) fuse the element-wise work between matmuls, which on the CPU is most of a
bf16 step: the CPU calibration has a `compiled` table (MFU and checkpointing multipliers) that
applies to compiled plans over the eager constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shoestring.levers.checkpointing import checkpointed_blocks, estimate_recompute_flops_fraction, parse_mode
from shoestring.plan.catalogue import Device, calibration, with_compiled
from shoestring.plan.memory import Levers, strategy_cost
from shoestring.plan.model import ModelInfo, Trainable
from shoestring.plan.network import communication, ring_of

HOST_ADAM_PARAMS_PER_S = 1.0e9  # DeepSpeed CPU Adam on a server host: ~1 B params/s (order of magnitude)


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    recompute_s: float
    comm_s: float  # exposed communication
    offload_s: float
    comm_total_s: float = 0.0  # all communication, before overlap with compute
    bytes_by_link: dict[str, float] = field(default_factory=dict)  # sent per device per step: intra, inter

    @property
    def total_s(self) -> float:
        return self.compute_s + self.recompute_s + self.comm_s + self.offload_s


def compute_dtype(precision: str) -> str:
    return "fp32" if precision == "fp32" else ("fp16" if precision == "fp16" else "bf16")


def device_calibration(device: Device, compiled: bool) -> dict:
    return with_compiled(calibration("cpu" if device.kind == "cpu" else "gpu"), compiled)


def achievable_mfu(device: Device, precision: str, compiled: bool = False) -> float:
    """The fraction of the peak a step reaches: published per GPU class; on the CPU calibrated per
    precision for a process on every core, times `rank_mfu_gain` for a process on fewer (a rank of
    several: its threads wait less on one another; it shares the memory bandwidth with the others)."""
    if device.kind != "cpu":
        return device.mfu
    cal = device_calibration(device, compiled)
    return on_cores(cal, cal.get("mfu", {}).get(precision, device.mfu), device.cores_share)


def attention_mfu(device: Device, precision: str, compiled: bool = False) -> float:
    """The fraction of the peak attention's FLOPs reach (scores and values against the keys,
    `ModelArgs.attention_flops_per_token`), per compute dtype on the CPU, where the attention
    kernel ran at about half the rest of a step's rate (`benchmarks/attention_share.py`: the same
    tokens a step took 1.36x as long at 2 x 1024 as at 8 x 256); where no calibration has it
    (GPUs), the step's own MFU."""
    cal = device_calibration(device, compiled) if device.kind == "cpu" else {}
    rate = attention_rate(cal, precision, None)
    return achievable_mfu(device, precision, compiled) if rate is None else on_cores(cal, rate, device.cores_share)


def attention_rate(cal: dict, precision: str, otherwise: float | None) -> float | None:
    """`attention_mfu` of `precision`'s compute dtype in calibration `cal` (a process on every
    core), else `otherwise`."""
    return cal.get("attention_mfu", {}).get(compute_dtype(precision), otherwise)


def on_cores(cal: dict, mfu: float, cores_share: float) -> float:
    """`mfu` (a process on every core) for a process on `cores_share` of them: `rank_mfu_gain`
    applies to one on fewer."""
    return mfu * (cal.get("rank_mfu_gain", 1.0) if cores_share < 1 else 1.0)


def collectives(info: ModelInfo, trainable: Trainable, levers: Levers, world: int, device_type: str = "cpu") -> int:
    """Collective calls per optimizer step, as the strategy lists them."""
    return sum(c.calls for c in strategy_cost(info, trainable, levers, world, device_type).collectives)


def collective_seconds(cal: dict, strategy: str) -> float:
    """The calibrated fixed cost of one collective call of `strategy` (its hooks, copies and
    synchronisation around the bytes); a strategy not calibrated takes the largest measured."""
    per = cal.get("collective_s", {})
    return per.get(strategy, max(per.values(), default=0.0))


def comm_overlap(cal: dict, strategy: str) -> float:
    """The calibrated share of `strategy`'s bytes' time hidden behind compute on the CPU; a
    strategy not calibrated takes the smallest measured (a calibration written before the share
    was per strategy holds one figure for all)."""
    per = cal.get("comm_overlap", {})
    if not isinstance(per, dict):
        return float(per)
    return per.get(strategy, min(per.values(), default=0.0))


def cpu_exposed_comm(cal: dict, strategy: str, comm_s: float, beside_s: float, calls: int) -> float:
    """The communication a CPU step waits for: of the bytes' time `comm_s` (bytes over the probed
    gloo bandwidth), the share `comm_overlap` runs while the step computes (never more than the
    compute beside it, `beside_s`), the rest adds to the step; each of the `calls` collective calls
    adds its fixed cost (`collective_s`), which is not hidden. The prediction (`step_time`) and the
    fit (`split_exposed`, its inverse) use this one rule."""
    hidden = min(comm_overlap(cal, strategy) * comm_s, beside_s)
    return comm_s - hidden + calls * collective_seconds(cal, strategy)


def split_exposed(exposed_s: float, comm_s: float, calls: int) -> tuple[float, float]:
    """`cpu_exposed_comm` inverted for one measured row: (`comm_overlap`, `collective_s`) that
    give its exposed communication `exposed_s` (measured step less compute and recompute). One
    row cannot tell hidden bytes from a cost per call, so the explanation that hides the least is
    taken: a step that waits at least its bytes' time hides none of them (the rest is the per-call
    cost: gloo on the cores that compute); only a step shorter than compute + bytes proves part of
    them ran beside the compute (DDP's bucketed all-reduce during a long backward), and then no
    per-call cost is left to charge. The two meet at (0, 0), so the split is continuous. (No
    bytes: nothing to hide, the whole remainder is per call.)"""
    if exposed_s >= comm_s or not comm_s:
        return 0.0, (exposed_s - comm_s) / calls if calls else 0.0
    return 1 - exposed_s / comm_s, 0.0


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


def comm_bytes(info: ModelInfo, trainable: Trainable, levers: Levers, world: int, device_type: str = "cpu") -> float:
    """Bytes each device sends per optimizer step (ring algorithms), all links together."""
    cost = strategy_cost(info, trainable, levers, world, device_type)
    return sum(c.sent_bytes(ring_of(c, world, levers.shard_group or world, world).ranks) for c in cost.collectives)


def compute_seconds(at_peak: float, full_at_peak: float, attention_at_peak: float, mfu: float, attention: float,
                    rest_scale: float = 1.0) -> float:
    """A step's compute: attention's FLOPs at the peak (`attention_at_peak`) at their own rate
    (`attention`: `attention_mfu`); the rest of its matmul FLOPs at the peak (`at_peak` less
    attention's), plus the work between the matmuls, which the MFU calibration measures as
    (1/MFU - 1) times the matmul time of the full model's step less attention
    (`full_at_peak` less `attention_at_peak`), times `rest_scale` for a model other than the one
    it was measured on (`elementwise_scale`). A parameter-efficient lever (LoRA: no weight
    gradients for the frozen base) removes matmul FLOPs but not the element-wise work between
    them, nor any of attention's (it has no weights); with every weight training, attention at
    the step's rate and the model it was measured on, this is `at_peak / mfu`."""
    rest = full_at_peak - attention_at_peak
    return at_peak - attention_at_peak + rest * (1 / mfu - 1) * rest_scale + attention_at_peak / attention


def elementwise_per_mflop(info: ModelInfo) -> float:
    """Layers x width per MFLOP of a token's training step outside attention: the element-wise
    work (norms, rope, activations, residual adds: each touches a token's `dim` values per layer)
    against the matmul work (which grows with dim^2 per layer), at any sequence length."""
    return info.args.n_layers * info.args.dim / weight_flops_per_token(info) * 1e6


def weight_flops_per_token(info: ModelInfo) -> float:
    """A token's training FLOPs in the matmuls with weights: all but attention's."""
    return info.flops_per_token(1) - info.args.attention_flops_per_token(1)


def elementwise_scale(cal: dict, per_mflop: float) -> float:
    """How much more non-matmul time per matmul second a model of `per_mflop`
    (`elementwise_per_mflop`) has than the one the CPU MFU was fitted on (`elementwise_ref` in
    the calibration; 1 where there is none): a narrower model spends a larger share of its step
    outside the matmuls, a wider one a smaller."""
    ref = cal.get("elementwise_ref")
    return per_mflop / ref if ref else 1.0


def step_time(info: ModelInfo, trainable: Trainable, levers: Levers, device: Device, world: int, seq_len: int,
              flops_per_token: float) -> StepTime:
    tokens = levers.micro_batch * levers.grad_accum * seq_len
    peak = device.peak_flops(compute_dtype(levers.precision))
    cal = device_calibration(device, levers.compiled)
    compute = compute_seconds(tokens * flops_per_token / peak, tokens * info.flops_per_token(seq_len) / peak,
                              tokens * info.args.attention_flops_per_token(seq_len) / peak,
                              achievable_mfu(device, levers.precision, levers.compiled),
                              attention_mfu(device, levers.precision, levers.compiled),
                              elementwise_scale(cal, elementwise_per_mflop(info)))
    recompute = compute * (recompute_multiplier(info, device, levers.checkpointing, seq_len, levers.compiled) - 1.0)
    if trainable.dequant_bytes is not None:  # a quantised base: one memory-bound pass per forward, backward, recompute
        dequant = levers.grad_accum * trainable.dequant_bytes(levers.compiled) / (device.mem_bw_gbs * 1e9)
        compute += 2 * dequant
        if parse_mode(levers.checkpointing)[0] != "offload":
            recompute += dequant * len(checkpointed_blocks(info.args.n_layers, levers.checkpointing)) / info.args.n_layers
    cost = strategy_cost(info, trainable, levers, world, device.kind)
    net = communication(cost, world, levers.shard_group or world, device)
    comm = net.seconds
    if device.kind == "cpu":
        exposed = cpu_exposed_comm(cal, levers.strategy, comm, compute + recompute, net.calls)
    else:  # the strategy's published overlap hides up to that share of the compute's time, never the last 10%
        exposed = max(comm - cost.overlap * (compute + recompute), comm * 0.1)
    offload = 0.0
    if levers.offload:
        shard = trainable.n_params / world
        offload = 2 * shard * 4 / (device.host_gbs * 1e9) + shard / HOST_ADAM_PARAMS_PER_S
    if parse_mode(levers.checkpointing)[0] == "offload":
        from shoestring.levers.checkpointing import describe

        moved = describe(levers.checkpointing, info.args, levers.micro_batch, seq_len, levers.precision, device.kind)
        offload += levers.grad_accum * moved.get("transfer_bytes_per_step", 0) / (device.host_gbs * 1e9) * 0.5
    return StepTime(compute, recompute, exposed, offload, comm, net.bytes_by_link)
