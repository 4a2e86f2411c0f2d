"""The engine's static cost model, for the planner (which asks `YaFSDP`, whose static methods
these are): model-state bytes, preallocated buffers and bytes communicated per optimizer step,
from the model's shapes alone; `engine_cost` composes them into the `Cost` the planner prices
(`YaFSDP.cost`). Tests hold each equal to what a running engine counts. With hybrid sharding
(`parallel.shard_group`) the engine shards within a group exactly as it would on a world of that
size (the `world_size` the estimates below take), and all-reduces its fp32 gradient shard across
the `replicas` groups once a step."""

from __future__ import annotations

from typing import NamedTuple

import torch

from shoestring.config import ParallelSection
from shoestring.levers.lora import LoRASettings, estimate
from shoestring.levers.precision import PrecisionPolicy
from shoestring.models.llama import ModelArgs
from shoestring.parallel.cost import STEP_COUNTER_BYTES, Collective, Cost, Workload
from shoestring.parallel.yafsdp.collectives import REDUCE_DTYPES, recv_chunks


class FrozenBase(NamedTuple):
    """A frozen base (LoRA) as the static estimates need it: the trained (adapter) parameters
    beside it and the bytes per element the base is stored in."""

    adapters: int
    itemsize: int

    @staticmethod
    def of(args: ModelArgs, lora: LoRASettings) -> "FrozenBase":
        return FrozenBase(estimate(args, lora).trainable_params, lora.base_dtype.itemsize)

    @staticmethod
    def counted(trained: int, frozen: int, itemsize: int) -> "FrozenBase | None":
        """From parameter counts (the planner's): None when nothing is frozen."""
        return FrozenBase(trained, itemsize) if frozen else None


def state_bytes(n_params: int, world_size: int, policy: PrecisionPolicy, options: ParallelSection,
                frozen_bytes: int = 0) -> dict[str, int]:
    """Flat shards (padding ignored) of the `n_params` trained parameters: fp32 master (it is
    the parameter under fp32/bf16; under bf16-pure the gathered bf16 copy is the parameter and
    the master is counted apart), fp32 shard gradient, fp32 Adam moments; and 1/N of a frozen
    base (LoRA) of `frozen_bytes` on one replica. The buffers are `buffer_bytes`."""
    shard = n_params // world_size
    lowp = policy.uses_master_weights
    return {"params": (2 if lowp else 4) * shard + frozen_bytes // world_size, "grads": 4 * shard,
            "master": 4 * shard if lowp else 0, "optimizer": 8 * shard}


def buffer_bytes(args: ModelArgs, world_size: int, policy: PrecisionPolicy, options: ParallelSection,
                 base: FrozenBase | None = None, p2p: bool = False) -> int:
    """The preallocated buffers: two gather buffers of the largest block and one of the larger
    of embed and head, and when those train a gradient buffer for each with what its
    reduce-scatter receives into (`p2p`: on gloo, `uses_p2p`); the resident units, with a
    gradient buffer for the trained ones."""
    block, outer, trains, resident = _unit_sizes(args, base)
    p, r, f = _itemsizes(policy, options, base)

    def streamed(n: int) -> int:
        n = _padded(n, world_size)
        return n * (p if trains else f) + ((n + recv_chunks(p2p, world_size) * n // world_size) * r if trains else 0)

    out = 2 * streamed(block) + streamed(max(outer))
    return out + sum(_padded(n, world_size) * (p + r if t else f) for n, t in resident)


def uses_p2p(options: ParallelSection, device_type: str) -> bool:
    """Whether the engine's collectives are point-to-point ones (gloo: CPU)."""
    return options.gloo_collectives == "p2p" and device_type == "cpu"


def communication_bytes(args: ModelArgs, world_size: int, policy: PrecisionPolicy, options: ParallelSection,
                        grad_accum: int, base: FrozenBase | None = None, replicas: int = 1) -> dict[str, int]:
    """Bytes of gathered and reduced (full, unsharded) tensors per optimizer step, as the
    engine counts them in `comm_stats`. Forward gathers every block, backward re-gathers all
    but the last two (still resident from forward), and a later micro-step's forward finds
    blocks 0 and 1 still resident from the backward before. Embed and head take turns in
    their buffer, both gathered every micro-step; tied, the one unit stays there until the
    step changes it. Every block, embed and head is reduce-scattered each micro-step, the
    resident units once per step. Frozen units (LoRA) are never reduced and, as they never
    change, blocks 0 and 1 (and a tied embedding) stay resident into the next step too: this
    is the steady state, after a first step that also gathers them and the frozen resident
    units. A ring all-gather or reduce-scatter sends (N-1)/N of these bytes per rank, and so
    do the point-to-point ones on gloo (gloo's own reduce-scatter is an all-reduce: twice). With
    hybrid sharding all of this stays within a group, and the fp32 shard gradient (every trained
    unit's shard) is all-reduced across the `replicas` groups once per step (`all_reduce_bytes`)."""
    block, outer, trains, resident = _unit_sizes(args, base)
    blk, out = _padded(block, world_size), sum(_padded(k, world_size) for k in outer)
    p, r, f = _itemsizes(policy, options, base)
    n = args.n_layers
    regathered = n - min(n, 2)
    gathers = (grad_accum * 2 * regathered + (min(n, 2) if trains else 0)) * blk
    gathers += grad_accum * out if len(outer) > 1 else (out if trains else 0)
    trained = sum(_padded(k, world_size) for k, t in resident if t)
    grad_shard = ((n * blk + out if trains else 0) + trained) // world_size
    return {"all_gather_bytes": gathers * (p if trains else f) + trained * p,
            "reduce_scatter_bytes": (grad_accum * (n * blk + out) if trains else 0) * r + trained * r,
            "all_reduce_bytes": 4 * grad_shard if replicas > 1 else 0}


def engine_cost(w: Workload) -> Cost:
    """The estimates above as the planner composes them: state and buffers per rank, and the
    step's collectives with the ranks they span (within the shard group, across groups)."""
    g, opts, policy = w.group, w.options, w.policy
    base = FrozenBase.counted(w.n_params, w.frozen_params, w.frozen_bytes)
    state = state_bytes(w.n_params, g, policy, opts, w.frozen_state(1))  # the frozen base sharded too
    state["optimizer"] += 2 * STEP_COUNTER_BYTES  # one flat tensor per param group (decay, no-decay)
    p2p = uses_p2p(opts, w.device_type)
    buffers = {"buffers": buffer_bytes(w.args, g, policy, opts, base, p2p)}
    if w.device_type == "cpu" and g > 1 and not p2p:
        # measured: each block's native gloo all-gather and reduce-scatter leaves a temporary of
        # one block (the larger of the two dtypes) resident on gloo's threads, all blocks count
        size = max(policy.param_dtype.itemsize, REDUCE_DTYPES[opts.reduce_dtype].itemsize)
        buffers["gloo_temporaries"] = w.args.n_layers * w.block_params * size
    if w.world == 1:
        return Cost(state, buffers)
    moved = communication_bytes(w.args, g, policy, opts, w.grad_accum, base, w.replicas)
    units = (w.args.n_layers + 1) * w.grad_accum
    scatter = "reduce_scatter" if p2p or w.device_type != "cpu" else "all_reduce"  # gloo's own is an all-reduce
    moves = [Collective("all_gather", moved["all_gather_bytes"] / g, 2 * units, "group", "weights"),
             Collective(scatter, moved["reduce_scatter_bytes"], units, "group", "gradients")]
    if w.replicas > 1:
        moves.append(Collective("all_reduce", moved["all_reduce_bytes"], 1, "across", "gradient shards"))
    return Cost(state, buffers, tuple(moves), overlap=0.8)


def _padded(n: int, world_size: int) -> int:
    return -(-n // world_size) * world_size


def _unit_sizes(args: ModelArgs, base: FrozenBase | None) -> tuple[int, list[int], bool, list[tuple[int, bool]]]:
    """Elements of one block's matrices, of embed (and head unless tied), whether those train,
    and (elements, trains) of each resident unit (the order of `units.split`)."""
    d, block = args.dim, args.block_matrices()
    outer = [args.vocab_size * d] * (1 if args.tie_embeddings else 2)
    small = args.n_layers * args.block_vectors() + d  # norms and biases
    if base is None:
        return block, outer, True, [(small, True)]
    return block, outer, False, [(base.adapters, True), (small, False)]


def _itemsizes(policy: PrecisionPolicy, options: ParallelSection, base: FrozenBase | None) -> tuple[int, int, int]:
    """Element sizes of trained gathered weights, of reduced gradients, of frozen weights."""
    frozen = (base.itemsize if base else 4) if policy.param_dtype == torch.float32 else policy.param_dtype.itemsize
    return policy.param_dtype.itemsize, REDUCE_DTYPES[options.reduce_dtype].itemsize, frozen
