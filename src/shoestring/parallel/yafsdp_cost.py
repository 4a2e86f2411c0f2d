"""The yafsdp engine's cost as the planner composes it (`YaFSDP.cost`): a thin adapter over the
engine's own static estimates (`YaFSDP.state_bytes`, `buffer_bytes`, `communication_bytes`),
which stay the one source of truth for its layout and traffic. With hybrid sharding
(`parallel.shard_group`) the engine shards within a group exactly as it would on a world of
that size, and all-reduces its fp32 gradient shards across groups once a step."""

from __future__ import annotations

from shoestring.parallel.cost import STEP_COUNTER_BYTES, Collective, Cost, Workload
from shoestring.parallel.yafsdp import REDUCE_DTYPES, FrozenBase, YaFSDP


def engine_cost(w: Workload) -> Cost:
    g, opts, policy = w.group, w.options, w.policy
    base = FrozenBase.counted(w.n_params, w.frozen_params, w.frozen_bytes)
    state = YaFSDP.state_bytes(w.n_params, g, policy, opts, w.frozen_state(1))  # the frozen base sharded too
    state["optimizer"] += 2 * STEP_COUNTER_BYTES  # one flat tensor per param group (decay, no-decay)
    p2p = YaFSDP.uses_p2p(opts, w.device_type)
    buffers = {"buffers": YaFSDP.buffer_bytes(w.args, g, policy, opts, base, p2p)}
    if w.device_type == "cpu" and g > 1 and not p2p:
        # measured: each block's native gloo all-gather and reduce-scatter leaves a temporary of
        # one block (the larger of the two dtypes) resident on gloo's threads, all blocks count
        size = max(policy.param_dtype.itemsize, REDUCE_DTYPES[opts.reduce_dtype].itemsize)
        buffers["gloo_temporaries"] = w.args.n_layers * w.block_params * size
    if w.world == 1:
        return Cost(state, buffers)
    moved = YaFSDP.communication_bytes(w.args, g, policy, opts, w.grad_accum, base)
    units = (w.args.n_layers + 1) * w.grad_accum
    scatter = "reduce_scatter" if p2p or w.device_type != "cpu" else "all_reduce"  # gloo's own is an all-reduce
    moves = [Collective("all_gather", moved["all_gather_bytes"] / g, 2 * units, "group", "weights"),
             Collective(scatter, moved["reduce_scatter_bytes"], units, "group", "gradients")]
    if w.replicas > 1:
        moves.append(Collective("all_reduce", 4 * w.n_params / g, w.args.n_layers + 1, "across", "gradient shards"))
    return Cost(state, buffers, tuple(moves), overlap=0.8)
