"""Enumerate candidate plans, estimate each, rank them.

Pruning that keeps a 70B search over the whole catalogue well under a second: per-rank memory
is affine in the micro-batch (state and buffers fixed, activations linear), so each
(hardware, precision, strategy, checkpointing) combination is evaluated at micro-batch 1 and 2
and the largest power-of-two micro-batch that fits is solved for, instead of tried one by one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Iterable

from shoestring.errors import UserError
from shoestring.levers.precision import PrecisionPolicy, resolve_precision
from shoestring.plan.catalogue import Device, devices, parse_hardware
from shoestring.plan.interruptions import ExpectedLoss, Interruptions, expected_loss
from shoestring.plan.memory import Levers, MemoryEstimate, checkpoint_bytes, estimate_memory
from shoestring.plan.model import (LORA_TARGETS, ModelInfo, Trainable, full_trainable, lora_flops_per_token, lora_trainable,
                                   model_info)
from shoestring.plan.throughput import StepTime, compute_dtype, step_time

MODES = ("pretrain", "full-finetune", "lora")
CHECKPOINTING = ("none", "selective", "every:2", "full")
SEARCH_COUNTS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Request:
    model: str
    tokens: float
    hardware: tuple[str, ...] = ()  # "key:count", or "key" to search counts; empty: whole catalogue
    mode: str = "pretrain"
    seq_len: int | None = None
    global_batch_tokens: int = 2**20
    deadline_h: float | None = None
    spot: bool = False
    interruptions: Interruptions | None = None  # priced where its rate is > 0
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_base_dtype: str | None = None  # the frozen base's dtype (config lora.base_dtype); None: searched
    fixed: tuple[tuple[str, object], ...] = ()  # levers the user set (train --auto): name -> value
    ranks: int | None = None  # local hardware: processes to split this machine into
    compile: bool | str = "auto"  # train.compile: whether blocks run compiled is the compile lever's rule


@dataclass
class Plan:
    device: Device
    count: int
    levers: Levers
    memory: MemoryEstimate
    step: StepTime
    global_batch: int  # sequences per optimizer step
    seq_len: int
    tokens: float
    spot: bool
    deadline_h: float | None
    interruptions: Interruptions | None = None  # None: not priced
    checkpoint_bytes: int = 0  # what the busiest node writes per save (counted where interruptions are priced)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.device.memory_bytes

    @property
    def tokens_per_s(self) -> float:
        return self.global_batch * self.seq_len / self.step.total_s

    @property
    def nodes(self) -> int:
        return -(-self.count // self.device.per_node)

    @property
    def run_h(self) -> float:
        """Wall time, uninterrupted."""
        return self.tokens / self.tokens_per_s / 3600

    @cached_property
    def interrupted(self) -> ExpectedLoss | None:
        """What interruptions are expected to add (None: not priced)."""
        if self.interruptions is None:
            return None
        return expected_loss(self.interruptions, self.nodes, self.run_h * 3600, self.step.total_s, self.checkpoint_bytes,
                             self.count * self.device.hourly(self.spot))

    @property
    def wall_h(self) -> float:
        """Wall time with what interruptions are expected to add: the deadline and the cost hold it."""
        return self.run_h + (self.interrupted.lost_s / 3600 if self.interrupted else 0.0)

    @property
    def cost(self) -> float:
        return self.wall_h * self.count * self.device.hourly(self.spot)

    @property
    def meets_deadline(self) -> bool:
        return self.deadline_h is None or self.wall_h <= self.deadline_h

    @property
    def overflow(self) -> int:
        return self.memory.total - self.device.memory_bytes


@dataclass
class Result:
    request: Request
    model: ModelInfo
    trainable: Trainable
    seq_len: int
    plans: list[Plan]  # fitting, best first
    misses: list[Plan] = field(default_factory=list)  # every candidate that does not fit, cheapest first


def _hardware(req: Request) -> list[tuple[Device, int]]:
    if not req.hardware:
        return [(d, n) for d in devices().values() if d.kind != "cpu" for n in SEARCH_COUNTS]
    out = []
    for spec in req.hardware:
        if spec == "local" or spec.startswith("local:"):
            from shoestring.plan.catalogue import local_hardware

            n = int(spec.partition(":")[2] or req.ranks or 1)
            out.append(local_hardware(n))
        elif ":" in spec:
            out.append(parse_hardware(spec))
        else:
            d = parse_hardware(spec)[0]
            out += [(d, n) for n in SEARCH_COUNTS]
    return out


def _precisions(device: Device, mode: str, fixed: dict[str, object], bf16_base: bool) -> list[str]:
    """The precision the trainer's `auto` rule picks on this device (levers/precision.py), with
    bf16-pure beside bf16 as a memory lever; a half precision where LoRA's frozen base is held
    in 16 bits (bf16 where the rule would compute in fp32)."""
    if "precision" in fixed:
        return [str(fixed["precision"])]
    chosen = resolve_precision(device.facts()).value
    if chosen == "fp32" and bf16_base:
        chosen = "bf16"
    if chosen == "bf16" and mode != "lora":
        return ["bf16", "bf16-pure"]
    return [str(chosen)]


def _strategies(device: Device, count: int, precision: str, base_dtype: str = "") -> list[Levers]:
    """Candidate strategies (an NF4 base runs under single, ddp and fsdp2 only: the others pack
    or move every weight as a plain tensor), and past one node FSDP2's topology-aware variants."""
    base = Levers(precision, "none", "single")
    nf4 = base_dtype == "nf4"
    if count == 1:
        out = [base]
        if device.kind == "cuda" and not nf4:
            out.append(replace(base, strategy="deepspeed", zero_stage=2, offload=True))
        return out
    out = [replace(base, strategy="ddp"), replace(base, strategy="fsdp2"),
           replace(base, strategy="fsdp2", reshard_after_forward=False), *_across_nodes(device, count, base)]
    if nf4:
        return out
    out.append(replace(base, strategy="yafsdp"))
    out += [replace(base, strategy="deepspeed", zero_stage=z) for z in (1, 2, 3)]
    if device.kind == "cuda":
        out += [replace(base, strategy="fsdp2", offload=True), replace(base, strategy="deepspeed", zero_stage=3, offload=True)]
    return out


def _across_nodes(device: Device, count: int, base: Levers) -> list[Levers]:
    """FSDP2 past one node: the state sharded within groups of one node, two, four, ... (each
    dividing the count: hybrid sharding, only the gradient shards' all-reduce crosses between
    groups), and weights re-sharded to one node after forward (backward's gathers stay inside
    a node), flat or within a larger group."""
    node = device.per_node
    if count <= node or count % node:
        return []
    fsdp2 = replace(base, strategy="fsdp2")
    out = [replace(fsdp2, reshard_after_forward=node)]
    group = node
    while group < count:
        if count % group == 0:
            out.append(replace(fsdp2, shard_group=group))
            if group > node:
                out.append(replace(fsdp2, shard_group=group, reshard_after_forward=node))
        group *= 2
    return out


def _matches(levers: Levers, fixed: dict[str, object]) -> bool:
    return all(getattr(levers, k) == v for k, v in fixed.items())


def _validate(req: Request, info: ModelInfo) -> int:
    if req.mode not in MODES:
        raise UserError(f"unknown mode {req.mode!r}", f"use one of {', '.join(MODES)}")
    if not (isinstance(req.tokens, (int, float)) and math.isfinite(req.tokens) and req.tokens >= 1):
        raise UserError(f"impossible token count {req.tokens!r}", "give a positive number of training tokens, e.g. --tokens 2e9")
    seq_len = req.seq_len or min(info.args.max_seq_len, 4096)
    if seq_len < 2 or seq_len > info.args.max_seq_len:
        raise UserError(f"--seq-len {seq_len} does not fit {info.name} (context {info.args.max_seq_len})",
                        f"use a sequence length between 2 and {info.args.max_seq_len}")
    if req.tokens < seq_len:
        raise UserError(f"{req.tokens:.0f} tokens are fewer than one sequence of {seq_len}",
                        "train on more tokens or lower --seq-len")
    if req.global_batch_tokens < seq_len:
        raise UserError(f"--global-batch-tokens {req.global_batch_tokens} is less than one sequence ({seq_len})",
                        "raise it to at least --seq-len")
    return seq_len


def compiled(setting: bool | str, device: Device, precision: str) -> bool:
    """Whether the trainer compiles the blocks: the compile lever's own rule (`train.compile`,
    SHOESTRING_COMPILE) for this device class and precision."""
    from shoestring.levers.compile import decide

    return bool(decide(setting, device.facts(), PrecisionPolicy(precision)).value)


def base_dtypes(req: Request) -> tuple[str, ...]:
    """LoRA's frozen-base dtypes to try: the one asked for, else bf16 and QLoRA's NF4 (which wins
    only where bf16 does not fit: its dequantisation costs time); "" when nothing is frozen."""
    if req.mode != "lora":
        return ("",)
    return (req.lora_base_dtype,) if req.lora_base_dtype else ("bf16", "nf4")


def trainable_for(req: Request, info: ModelInfo, seq_len: int, base_dtype: str = "",
                  precision: str = "bf16") -> tuple[Trainable, float]:
    """What trains, and the FLOPs per token that costs. An NF4 base keeps its unquantised part
    (embedding, head, norms) in the compute dtype: fp32 under fp32, else 16 bits."""
    if req.mode == "lora":
        base = base_dtype or req.lora_base_dtype or "bf16"
        wide = base == "fp32" or (base == "nf4" and precision == "fp32")
        trainable = lora_trainable(info, req.lora_rank, tuple(req.lora_targets), 4 if wide else 2, nf4=base == "nf4")
        return trainable, lora_flops_per_token(info, trainable, seq_len)
    return full_trainable(info), info.flops_per_token(seq_len)


def plan_exactly(req: Request, device: Device, count: int, levers: Levers) -> Plan:
    """The plan for levers fixed in full (micro-batch and accumulation included) on a given
    device: what the accuracy benchmark compares with what it measured on that device."""
    info = model_info(req.model)
    seq_len = _validate(req, info)
    trainable, flops = trainable_for(req, info, seq_len, levers.base_dtype, levers.precision)
    levers = replace(levers, compiled=compiled(req.compile, device, levers.precision))
    return _plan(info, trainable, levers, device, count, seq_len, flops, req)


def search(req: Request) -> Result:
    info = model_info(req.model)
    seq_len = _validate(req, info)
    trainables: dict[tuple[str, str], tuple[Trainable, float]] = {}  # (base dtype, precision) -> what trains
    global_seqs = max(1, min(req.global_batch_tokens, int(req.tokens)) // seq_len)
    fixed = dict(req.fixed)
    plans: list[Plan] = []
    misses: list[Plan] = []
    for device, count in _hardware(req):
        per_device = -(-global_seqs // count)
        for base in base_dtypes(req):
            for precision in _precisions(device, req.mode, fixed, base == "bf16"):
                if not device.supports(compute_dtype(precision)):
                    continue
                if (base, precision) not in trainables:
                    trainables[base, precision] = trainable_for(req, info, seq_len, base, precision)
                trainable, flops = trainables[base, precision]
                blocks_compiled = compiled(req.compile, device, precision)
                for strat in _strategies(device, count, precision, base):
                    for mode in CHECKPOINTING if "checkpointing" not in fixed else (str(fixed["checkpointing"]),):
                        levers = replace(strat, checkpointing=mode, compiled=blocks_compiled, base_dtype=base)
                        if not _matches(levers, {k: v for k, v in fixed.items() if k not in ("micro_batch", "grad_accum")}):
                            continue
                        plan = _best_micro_batch(info, trainable, levers, device, count, per_device, seq_len, flops, req, fixed)
                        (plans if plan.fits else misses).append(plan)
    plans.sort(key=_rank)
    misses.sort(key=lambda p: (p.cost, p.overflow))
    return Result(req, info, trainable_for(req, info, seq_len)[0], seq_len, plans, misses)


def one_per_option(plans: list[Plan], limit: int) -> list[Plan]:
    """The first plan per (device, count, strategy), so a table shows alternatives, not variants."""
    seen: set[tuple] = set()
    out = []
    for p in plans:
        key = (p.device.key, p.count, p.levers.strategy_label())
        if key not in seen:
            seen.add(key)
            out.append(p)
            if len(out) == limit:
                break
    return out


def cheapest_misses(result: Result, limit: int = 3) -> list[Plan]:
    """The cheapest candidates that do not fit, one per hardware and strategy: what the user
    would pay if memory allowed, and (their memory breakdown) what stands in the way."""
    return one_per_option(result.misses, limit)


def _rank(p: Plan) -> tuple:
    return (not p.meets_deadline, p.cost if p.meets_deadline else p.wall_h)


def _plan(info: ModelInfo, trainable: Trainable, levers: Levers, device: Device, count: int, seq_len: int,
          flops: float, req: Request) -> Plan:
    mem = estimate_memory(info, trainable, levers, count, seq_len, device)
    step = step_time(info, trainable, levers, device, count, seq_len, flops)
    rates = req.interruptions if req.interruptions and req.interruptions.priced else None
    saved = checkpoint_bytes(info, trainable, levers, count, device.per_node) if rates else 0
    return Plan(device, count, levers, mem, step, levers.micro_batch * levers.grad_accum * count, seq_len,
                req.tokens, req.spot, req.deadline_h, rates, saved)


def _best_micro_batch(info: ModelInfo, trainable: Trainable, levers: Levers, device: Device, count: int,
                      per_device: int, seq_len: int, flops: float, req: Request, fixed: dict[str, object]) -> Plan:
    """The largest power-of-two micro-batch (<= the per-device batch) that fits, solved from
    memory at micro-batch 1 and 2 (memory is affine in it); micro-batch 1 if none fits."""
    if "micro_batch" in fixed:
        mb = int(fixed["micro_batch"])
    else:
        one = estimate_memory(info, trainable, replace(levers, micro_batch=1), count, seq_len, device).total
        two = estimate_memory(info, trainable, replace(levers, micro_batch=2), count, seq_len, device).total
        slope = max(two - one, 1)
        room = (device.memory_bytes - one) // slope + 1
        mb = 1
        while mb * 2 <= min(room, per_device):
            mb *= 2
        if per_device <= room and per_device > mb:
            mb = per_device if per_device & (per_device - 1) == 0 else mb
    accum = int(fixed.get("grad_accum", -(-per_device // mb)))
    return _plan(info, trainable, replace(levers, micro_batch=mb, grad_accum=accum), device, count, seq_len, flops, req)


def leanest(result: Result) -> Plan | None:
    """The attempt that came closest to fitting (for 'fits nowhere' advice)."""
    return min(result.misses, key=lambda p: p.overflow / p.device.memory_bytes, default=None)


def smallest_fitting_count(req: Request, device_key: str, limit: int = 1024) -> Plan | None:
    """The cheapest plan on the fewest devices of one kind (powers of two up to `limit`) that fits."""
    n = 1
    while n <= limit:
        found = search(replace(req, hardware=(f"{device_key}:{n}",))).plans
        if found:
            return found[0]
        n *= 2
    return None


def require_fit(result: Result) -> None:
    """Raise a clear error, with what would be needed, when no candidate fits anywhere."""
    if result.plans:
        return
    best = leanest(result)
    if best is None:
        raise UserError("no candidate plan was possible for this hardware and these constraints",
                        "relax the levers you fixed, or try other --hardware")
    fix = f"it needs {best.memory.total / 1e9:.1f} GB per device; {best.device.key} has {best.device.memory_bytes / 1e9:.0f} GB"
    enough = None if best.device.key == "local" else smallest_fitting_count(result.request, best.device.key)
    if enough is not None:
        fix += f"; {describe(enough)} would fit ({enough.memory.total / 1e9:.1f} GB per device, ${enough.cost:,.0f})"
    elif options := _untried_options(result):
        fix += "; try " + (", ".join(options[:-1]) + " or " if len(options) > 1 else "") + options[-1]
    raise UserError(f"{result.model.name} fits nowhere: the leanest plan ({describe(best)}) overflows by "
                    f"{best.overflow / 1e9:.1f} GB per device", fix)


def _untried_options(result: Result) -> list[str]:
    """What else could fit, leaving out what the request already says: other devices when it
    named some (the whole catalogue was searched otherwise), a shorter sequence, LoRA, and an
    NF4 base under LoRA (searched unless the request fixed the base)."""
    req = result.request
    options = ["larger devices (--hardware)"] if req.hardware else []
    if result.seq_len > 256:
        options.append(f"a --seq-len shorter than {result.seq_len}")
    if req.mode != "lora":
        options.append("--mode lora")
    elif req.lora_base_dtype in ("fp32", "bf16"):
        options.append("--lora-base-dtype " + ("bf16 or nf4" if req.lora_base_dtype == "fp32" else "nf4"))
    return options


def describe(p: Plan) -> str:
    l = p.levers
    base = f" base={l.base_dtype}" if l.base_dtype else ""
    return (f"{p.device.key}:{p.count} {l.precision}{base} ckpt={l.checkpointing} {l.strategy_label()} "
            f"mb={l.micro_batch}x{l.grad_accum}")


def candidates_count(result: Result) -> int:
    return len(result.plans) + len(result.misses)


__all__: Iterable[str] = ["Plan", "Request", "Result", "cheapest_misses", "compiled", "describe", "one_per_option", "leanest",
                         "plan_exactly", "require_fit", "search"]
