"""Peak memory per device of one candidate plan, by component.

Composes what each lever knows about itself:

* model state (params, grads, fp32 masters, optimizer) and communication buffers: the
  strategy's own cost model (`Strategy.cost`, asked through `strategy_cost`), exact from
  parameter shapes, so that it equals what the strategy's `memory()` counts after a step
  (tests/test_plan.py);
* saved activations: the checkpointing lever (`estimate_saved_activation_bytes`, eager or
  compiled blocks), plus the embedding output and final norm outside the blocks;
* loss buffers: the chunked cross-entropy keeps grad_hidden (tokens x dim) and grad_weight
  (vocab x dim, unless the head is frozen) from forward to backward, and one chunk's fp32
  logits while it runs;
* the working set of backward: one block's activations (recomputed, for checkpointed blocks)
  and their gradients, alive while that block runs backward, after the loss's chunk buffers
  are freed: only what exceeds those counts;
* autocast's weight casts (bf16/fp16 autocast keeps a low-precision copy of every weight while
  the step runs; under FSDP2 / ZeRO-3 only a block's worth at a time);
* a quantised base (QLoRA's NF4): the dequantised copy of the largest weight and its indices,
  alive while that weight's matmul runs (the lever's `nf4_working_bytes`);
* framework overhead: measured per device class (CUDA context and workspaces from the
  catalogue; the CPU process's non-tensor RSS, calibrated by benchmarks/planner_accuracy.py),
  and for compiled blocks the compiled runtime's own (inductor, its kernels and caches; CPU:
  calibrated the same way).

Gradients and saved activations are not both at full size at once: the peak counts the larger
(`estimate_memory`); `state_bytes` still gives the exact gradient bytes after a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cache

from shoestring.config import ParallelSection
from shoestring.levers.checkpointing import block_saved_tensors, checkpointed_blocks, estimate_saved_activation_bytes, parse_mode
from shoestring.levers.precision import PrecisionPolicy
from shoestring.models.loss import LOSS_CHUNK
from shoestring.parallel import strategy_class
from shoestring.parallel.cost import Cost, Workload
from shoestring.plan.catalogue import Device
from shoestring.plan.model import ModelInfo, Trainable



@dataclass(frozen=True)
class Levers:
    """One candidate's choices. `strategy` is single | ddp | fsdp2 | yafsdp | deepspeed;
    `shard_group` the ranks a sharded strategy's state is split over (None: every rank)."""

    precision: str
    checkpointing: str
    strategy: str
    zero_stage: int = 0
    reshard_after_forward: bool | int = True
    offload: bool = False  # fsdp2 cpu_offload / deepspeed offload_optimizer (CUDA only)
    micro_batch: int = 1
    grad_accum: int = 1
    compiled: bool = False  # blocks under torch.compile (the compile lever's rule: `compile_wanted`)
    base_dtype: str = ""  # LoRA's frozen base: bf16 | fp32 | nf4 ("": nothing frozen)
    shard_group: int | None = None

    def strategy_label(self) -> str:
        return strategy_class(self.strategy).label(self.parallel_options())

    def weight_bytes(self) -> int:
        """Element size of the trained weights and gradients the strategy holds and moves."""
        return strategy_class(self.strategy).weight_dtype(PrecisionPolicy(self.precision)).itemsize

    def parallel_options(self) -> ParallelSection:
        """The config section these levers stand for (each strategy reads its own options)."""
        return _options(self.strategy, self.zero_stage, self.reshard_after_forward, self.offload, self.shard_group)


@cache
def _options(strategy: str, zero_stage: int, reshard: bool | int, offload: bool, group: int | None) -> ParallelSection:
    return ParallelSection(strategy=strategy, reshard_after_forward=reshard, cpu_offload=offload, offload_optimizer=offload,
                           shard_group=group, **({"zero_stage": zero_stage} if zero_stage else {}))


def strategy_cost(info: ModelInfo, trainable: Trainable, levers: Levers, world: int, device_type: str) -> Cost:
    """What the strategy says this plan costs one rank (its own model: parallel/cost.py). It
    depends on the strategy's options, the precision and the accumulation only (cached on those)."""
    l = levers
    return _strategy_cost(info, trainable, l.strategy, l.zero_stage, l.reshard_after_forward, l.offload, l.shard_group,
                          l.precision, l.grad_accum, world, device_type)


@cache
def _strategy_cost(info: ModelInfo, trainable: Trainable, strategy: str, zero_stage: int, reshard: bool | int, offload: bool,
                   group: int | None, precision: str, grad_accum: int, world: int, device_type: str) -> Cost:
    w = Workload(info.args, trainable.shapes, trainable.n_params, info.n_params, info.block_params, trainable.frozen_params,
                 trainable.frozen_bytes, trainable.frozen_state_bytes, world, world, PrecisionPolicy(precision),
                 _options(strategy, zero_stage, reshard, offload, group), grad_accum, device_type)
    return strategy_class(strategy).cost(w)


@dataclass
class MemoryEstimate:
    components: dict[str, int] = field(default_factory=dict)
    host_bytes: int = 0  # offloaded state, in host memory

    @property
    def total(self) -> int:
        return sum(self.components.values())


def state_bytes(info: ModelInfo, trainable: Trainable, levers: Levers, world: int) -> dict[str, int]:
    """Exact model-state bytes per rank after an optimizer step (the steady state)."""
    return dict(strategy_cost(info, trainable, levers, world, "cuda").state)


CHECKPOINTED = ("params", "master", "optimizer")  # the state a checkpoint saves; gradients are zero between steps


def checkpoint_bytes(info: ModelInfo, trainable: Trainable, levers: Levers, world: int, per_node: int) -> int:
    """Bytes the busiest node writes per checkpoint (and reads back on a restart): every rank
    saves its share of each part of the state, so a node writes its ranks' shares, but never
    more than one whole copy of a part (a replicated part is saved once: DDP's and ZeRO-1/2's
    weights by rank 0, a hybrid-sharded state by one replica)."""
    whole = state_bytes(info, trainable, replace(levers, shard_group=None), 1)
    share = state_bytes(info, trainable, levers, world)
    return sum(min(whole.get(k, 0), share.get(k, 0) * min(world, per_node)) for k in CHECKPOINTED)


def activation_bytes(info: ModelInfo, trainable: Trainable, levers: Levers, seq_len: int,
                     device_type: str) -> tuple[dict[str, int], int]:
    """Activations of one micro-batch on one rank, by part, and the working set of one block's
    backward (its saved tensors and their gradients, plus what flows between blocks)."""
    a, b = info.args, levers.micro_batch
    mode = "none" if parse_mode(levers.checkpointing)[0] == "offload" and device_type != "cuda" else levers.checkpointing
    residual = 2 if levers.precision == "bf16-pure" else 4
    compute = 4 if levers.precision == "fp32" else 2
    tokens = b * seq_len
    blocks = estimate_saved_activation_bytes(a, mode, b, seq_len, levers.precision, device_type, levers.compiled)
    per_block = block_saved_tensors(a, b, seq_len, levers.precision, device_type, levers.compiled)
    working = sum(n for _, n in per_block["none"])  # one block's full set, live during its backward
    outside = tokens * a.dim * residual * 2 + tokens * 4  # embedding output, final norm input/rstd
    head = a.vocab_size * a.dim * 4 if not trainable.frozen_params else 0  # a frozen head (LoRA) gets no gradient
    kept = tokens * a.dim * compute + head  # grad_hidden, grad_weight: into backward
    # + one chunk's logits while it runs (a final soft-cap keeps its tanh and 1 - tanh^2 beside them)
    loss = kept + (5 if a.final_softcap else 3) * min(LOSS_CHUNK, tokens) * a.vocab_size * 4
    if trainable.block_activation_bytes is not None:  # e.g. LoRA's adapters, the lever's own estimate
        kind = parse_mode(mode)[0]
        extra = trainable.block_activation_bytes(tokens, levers.precision, levers.compiled)
        keeping = a.n_layers if kind == "selective" else a.n_layers - len(checkpointed_blocks(a.n_layers, mode))
        blocks += keeping * extra  # the blocks that keep the adapters' activations
        working += extra
    # the chunk buffers are gone before the blocks' backward starts: count what exceeds them
    backward = 2 * working + kept
    return {"activations": blocks + outside, "backward_working": max(0, backward - loss), "loss": loss}, backward


def comm_and_cast_bytes(info: ModelInfo, trainable: Trainable, levers: Levers, world: int, device_type: str) -> dict[str, int]:
    """Transient buffers the strategy and precision add on top of state and activations.

    Autocast caches a low-precision copy of every weight that trains for the whole forward
    (and linears save it for backward); frozen fp32 weights (LoRA's base) are cast per use but
    saved for backward too. The strategy's own buffers (gathered blocks, buckets, an engine's
    preallocated buffers) are its cost model's (`Strategy.cost`)."""
    low = levers.precision in ("bf16", "fp16") and levers.weight_bytes() == 4  # DeepSpeed's fp16 holds fp16 weights
    cast = trainable.n_params + (trainable.frozen_params if trainable.frozen_bytes == 4 else 0)
    out: dict[str, int] = {"autocast_casts": 2 * cast if low else 0}
    if trainable.dequant_working:
        out["dequantised"] = trainable.dequant_working
    return {**out, **strategy_cost(info, trainable, levers, world, device_type).buffers}


def estimate_memory(info: ModelInfo, trainable: Trainable, levers: Levers, world: int, seq_len: int,
                    device: Device) -> MemoryEstimate:
    cost = strategy_cost(info, trainable, levers, world, device.kind)
    host = sum(cost.state[k] for k in cost.offloaded)  # offloaded state lives in host memory
    state = {k: (0 if k in cost.offloaded else v) for k, v in cost.state.items()}
    activations, backward = activation_bytes(info, trainable, levers, seq_len, device.kind)
    parts = {**state, **activations, **comm_and_cast_bytes(info, trainable, levers, world, device.kind)}
    if cost.grads_freed:
        # Gradients are freed after each step (zero_grad(set_to_none)) and written during backward
        # as it frees the saved activations, block by block, after the loss's chunk buffers are
        # gone: they count only where the last block's backward (all gradients and one block's
        # working set) would top the end of forward (measured on CPU: usually the peak).
        forward_end = parts["activations"] + parts["loss"] + parts["backward_working"]
        parts["grads"] = max(0, parts["grads"] + backward - forward_end)
    allocated = sum(parts.values())
    frag = device.compile_fragmentation if levers.compiled and device.compile_fragmentation is not None else device.fragmentation
    parts["fragmentation"] = int(allocated * frag)
    parts["framework"] = device.overhead_bytes
    if levers.compiled:
        parts["compile_runtime"] = device.compile_overhead_bytes
    return MemoryEstimate({k: int(v) for k, v in parts.items()}, host)
