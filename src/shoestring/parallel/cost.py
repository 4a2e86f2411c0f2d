"""What a strategy costs, in terms the planner composes: model-state bytes, transient buffers,
and the collectives one optimizer step runs, each with the group of ranks it spans.

Each strategy answers `Strategy.cost(workload)` for itself; the planner (plan/) prices the
collectives on the links they cross and never asks which strategy it holds. A collective's
`span` names its ranks, not a link, because the link depends on the hardware:

    group   the ranks of one shard group (consecutive ranks; the whole world when flat)
    across  one rank per shard group, the same position in each (hybrid sharding's replicas)
    world   every rank

`input_bytes` is the collective's input on one rank, summed over the calls of one step: an
all-gather's input is this rank's shard, a reduce-scatter's or an all-reduce's the full buffer.
The bytes a rank sends follow from the algorithm (`sent_fraction`, ring), the same rule the comm
meter applies to what it measures, so that a prediction and a measurement compare directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Callable, Literal

from shoestring.config import ParallelSection
from shoestring.errors import UserError
from shoestring.levers.precision import PrecisionPolicy
from shoestring.models.llama import ModelArgs

Span = Literal["group", "across", "world"]
STEP_COUNTER_BYTES = 4  # torch AdamW keeps `step` as an fp32 scalar tensor per parameter tensor


@dataclass(frozen=True)
class Collective:
    kind: Literal["all_gather", "reduce_scatter", "all_reduce"]
    input_bytes: float  # per rank, summed over the step's calls
    calls: int
    span: Span
    what: str = ""  # what it moves, for people
    size: int = 0  # a sub-group of this many consecutive ranks inside the span (0: the whole span)

    def sent_bytes(self, ranks: int) -> float:
        """Bytes one rank sends, on a ring of `ranks`."""
        return self.input_bytes * sent_fraction(self.kind, ranks)


def sent_fraction(collective: str, world: int) -> float:
    """Bytes one rank sends per byte of the collective's input tensor (ring algorithms): an
    all-reduce 2(N-1)/N of the buffer, an all-gather (N-1) times its input chunk, reduce-scatter
    and all-to-all (N-1)/N of the input, a broadcast the buffer, a point-to-point send its
    tensor (a receive nothing). `collective` may be a backend's event name (`gloo:all_reduce`)."""
    f = (world - 1) / world
    if collective.endswith(":recv"):  # point-to-point: the sender counts the bytes
        return 0.0
    if collective.endswith(":send"):
        return 1.0
    if "all_reduce" in collective or "allreduce" in collective:
        return 2 * f
    if "all_gather" in collective or "allgather" in collective:
        return world - 1  # the input is this rank's chunk; each chunk travels N-1 hops
    if "broadcast" in collective:
        return 1.0
    return f  # reduce_scatter, all_to_all, reduce


def torch_reduce_scatter(device_type: str) -> Literal["reduce_scatter", "all_reduce"]:
    """What torch's reduce-scatter runs as: gloo (CPU) has none and all-reduces the full input."""
    return "all_reduce" if device_type == "cpu" else "reduce_scatter"


def shard_group_size(setting: str | int | None, world: int, per_node: int) -> int:
    """Ranks in one shard group: the world (None), one node ("node": `per_node` ranks, at most
    the world), or N, which must divide the world."""
    if setting is None:
        return world
    size = min(per_node, world) if setting == "node" else int(setting)
    if world % size:
        raise UserError(f"parallel.shard_group = {setting} ({size} ranks) does not divide {world} ranks",
                        "use a group size that divides the number of ranks, \"node\", or leave it unset")
    return size


@dataclass(frozen=True)
class Workload:
    """What a strategy's cost model needs of one planned step, in plain numbers: the planner
    fills it in from the model's shapes (plan/ sits above the strategies and hands this down)."""

    args: ModelArgs
    shapes: tuple[tuple[int, ...], ...]  # the trained tensors (tied weights once), in model order
    n_params: int  # their elements
    model_params: int  # every parameter, trained or frozen
    block_params: int  # one transformer block's parameters, trained or frozen
    frozen_params: int
    frozen_bytes: int  # element size the frozen base (LoRA) is stored in
    frozen_state: Callable[[int], int]  # bytes of the frozen base split k ways (exact for an NF4 base)
    world: int
    per_node: int
    policy: PrecisionPolicy
    options: ParallelSection
    grad_accum: int = 1
    device_type: str = "cuda"

    @property
    def group(self) -> int:
        """Ranks the state is sharded over (the world unless `parallel.shard_group` says less)."""
        return shard_group_size(self.options.shard_group, self.world, self.per_node)

    @property
    def replicas(self) -> int:
        return self.world // self.group


@dataclass(frozen=True)
class Cost:
    state: dict[str, int]  # per rank after a step: params, grads, master, optimizer
    buffers: dict[str, int] = field(default_factory=dict)  # transient communication buffers
    collectives: tuple[Collective, ...] = ()
    overlap: float = 0.0  # share of communication a GPU run hides behind compute
    offloaded: tuple[str, ...] = ()  # state parts held in host memory
    grads_freed: bool = True  # gradients are freed after each step (not DeepSpeed's partitions)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@cache
def dim0_shard_total(shapes: tuple[tuple[int, ...], ...], shards: int) -> int:
    """`dim0_shard_numel` summed over tensors."""
    return sum(dim0_shard_numel(s, shards) for s in shapes)


def dim0_shard_numel(shape: tuple[int, ...], shards: int) -> int:
    """Elements one rank holds of a tensor sharded on dim 0, padded to a multiple of `shards`
    (FSDP2's layout): ceil(dim0 / N) rows."""
    return -(-shape[0] // shards) * _numel(shape[1:])


def gathered_block_buffers(w: Workload, gather: int, frozen: int) -> dict[str, int]:
    """Sharded parameters' transient buffers, from shapes: each block's gathered weights (in
    `gather` bytes per element, a frozen base's `frozen` bytes beside them) and unsharded fp32
    gradients; the root unit (embedding, head, final norm) stays gathered from forward to
    backward. On CUDA the caching allocator reuses one block's buffers for the next (two live:
    one computing, one prefetched); on CPU, measured (benchmarks/planner_accuracy.py), glibc
    keeps every block's freed buffers resident until the step ends, so all blocks count. Weights
    kept gathered after forward (`reshard_after_forward = false`) count for every block too;
    re-sharded to groups of N after forward, each block keeps 1/N of them until backward."""
    a, reshard = w.args, w.options.reshard_after_forward
    root = w.model_params - a.n_layers * w.block_params
    live = a.n_layers if w.device_type == "cpu" or not reshard else 2
    share = (root + live * w.block_params) / w.model_params  # of the model gathered at once
    gathered = w.n_params * gather + frozen
    out = {"gathered_params": int(share * gathered), "unsharded_grads": int(share * w.n_params * 4)}
    if reshard is not True and reshard:
        out["resharded_params"] = int(a.n_layers * w.block_params / w.model_params * gathered / reshard)
    return out
