"""Peak memory per device of one candidate plan, by component.

Composes what each lever knows about itself:

* model state (params, grads, fp32 masters, optimizer): the strategy's layout, computed here
  exactly from parameter shapes (`state_bytes`), so that it equals what
  `shoestring.measure.memory.model_state_bytes` counts after a step (tests/test_plan_memory.py);
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
* communication buffers: DDP buckets, FSDP2 / ZeRO-3 gathered blocks and unsharded gradients,
  ZeRO reduce buckets, the YaFSDP engine's preallocated buffers (its own `buffer_bytes`);
* framework overhead: measured per device class (CUDA context and workspaces from the
  catalogue; the CPU process's non-tensor RSS, calibrated by benchmarks/planner_accuracy.py),
  and for compiled blocks the compiled runtime's own (inductor, its kernels and caches; CPU:
  calibrated the same way).

Gradients and saved activations are not both at full size at once: the peak counts the larger
(`estimate_memory`); `state_bytes` still gives the exact gradient bytes after a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from shoestring.config import ParallelSection
from shoestring.levers.checkpointing import block_saved_tensors, checkpointed_blocks, estimate_saved_activation_bytes, parse_mode
from shoestring.levers.precision import PrecisionPolicy
from shoestring.models.loss import LOSS_CHUNK
from shoestring.parallel import strategy_class
from shoestring.parallel.yafsdp import REDUCE_DTYPES, FrozenBase, YaFSDP
from shoestring.plan.catalogue import Device
from shoestring.plan.model import ModelInfo, Shape, Trainable, _numel

STEP_COUNTER_BYTES = 4  # torch AdamW keeps `step` as an fp32 scalar tensor per parameter tensor
DS_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce/allgather bucket size (elements)


@dataclass(frozen=True)
class Levers:
    """One candidate's choices. `strategy` is single | ddp | fsdp2 | yafsdp | deepspeed."""

    precision: str
    checkpointing: str
    strategy: str
    zero_stage: int = 0
    reshard_after_forward: bool = True
    offload: bool = False  # fsdp2 cpu_offload / deepspeed offload_optimizer (CUDA only)
    micro_batch: int = 1
    grad_accum: int = 1
    compiled: bool = False  # blocks under torch.compile (the compile lever's rule: `compile_wanted`)
    base_dtype: str = ""  # LoRA's frozen base: bf16 | fp32 | nf4 ("": nothing frozen)

    @property
    def sharded_params(self) -> bool:
        return self.strategy == "fsdp2" or (self.strategy == "deepspeed" and self.zero_stage == 3)

    def strategy_label(self) -> str:
        if self.strategy == "deepspeed":
            label = f"zero-{self.zero_stage}"
        elif self.strategy == "fsdp2":
            label = "fsdp2" + ("" if self.reshard_after_forward else "(no-reshard)")
        else:
            label = self.strategy
        return label + ("+offload" if self.offload else "")

    def weight_bytes(self) -> int:
        """Element size of the trained weights and gradients the strategy holds and moves."""
        return strategy_class(self.strategy).weight_dtype(PrecisionPolicy(self.precision)).itemsize

    def parallel_options(self) -> ParallelSection:
        if self.strategy == "fsdp2":
            return ParallelSection(strategy="fsdp2", reshard_after_forward=self.reshard_after_forward, cpu_offload=self.offload)
        if self.strategy == "deepspeed":
            return ParallelSection(strategy="deepspeed", zero_stage=self.zero_stage, offload_optimizer=self.offload)
        return ParallelSection(strategy=self.strategy)


@dataclass
class MemoryEstimate:
    components: dict[str, int] = field(default_factory=dict)
    host_bytes: int = 0  # offloaded state, in host memory

    @property
    def total(self) -> int:
        return sum(self.components.values())


def _local_numel(shape: Shape, world: int, fsdp: bool) -> int:
    """FSDP2 shards each parameter on dim 0, padded to a multiple of the world size: every rank
    holds ceil(dim0 / N) rows."""
    if not fsdp:
        return _numel(shape)
    return -(-shape[0] // world) * _numel(shape[1:])


@cache
def _local_total(trainable: Trainable, world: int, fsdp: bool) -> int:
    return sum(_local_numel(s, world, fsdp) for s in trainable.shapes)


def state_bytes(trainable: Trainable, levers: Levers, world: int) -> dict[str, int]:
    """Exact model-state bytes per rank after an optimizer step (the steady state)."""
    policy = PrecisionPolicy(levers.precision)
    if levers.strategy in ("deepspeed", "yafsdp"):  # flat partitions: the engine's own estimate
        frozen = trainable.frozen_state_bytes()
        if levers.strategy == "yafsdp":  # the frozen base (LoRA) is sharded with the rest
            est = YaFSDP.state_bytes(trainable.n_params, world, policy, levers.parallel_options(), frozen)
        else:  # ZeRO replicates it (in its fp16/bf16 modes, cast to half precision)
            est = strategy_class(levers.strategy).state_bytes(trainable.n_params, world, policy, levers.parallel_options())
            est["params"] += trainable.frozen_params * min(trainable.frozen_bytes, levers.weight_bytes())
        est["optimizer"] += 2 * STEP_COUNTER_BYTES  # one flat tensor per param group (decay, no-decay)
        return est
    fsdp = levers.strategy == "fsdp2"
    local = _local_total(trainable, world, fsdp)
    frozen = trainable.frozen_state_bytes(world if fsdp else 1)
    if fsdp:
        # fp32 shards whatever the precision: under bf16-pure they are the masters
        return {"params": frozen + 4 * local, "grads": 4 * local, "master": 0,
                "optimizer": 8 * local + STEP_COUNTER_BYTES * len(trainable.shapes)}
    per = policy.state_bytes_per_param()
    return {"params": frozen + per["params"] * local, "grads": per["grads"] * local, "master": per["master"] * local,
            "optimizer": per["optimizer"] * local + STEP_COUNTER_BYTES * len(trainable.shapes)}


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
        kept = a.n_layers if kind == "selective" else a.n_layers - len(checkpointed_blocks(a.n_layers, mode))
        blocks += kept * extra
        working += extra
    # the chunk buffers are gone before the blocks' backward starts: count what exceeds them
    backward = 2 * working + kept
    return {"activations": blocks + outside, "backward_working": max(0, backward - loss), "loss": loss}, backward


def comm_and_cast_bytes(info: ModelInfo, trainable: Trainable, levers: Levers, world: int, device_type: str) -> dict[str, int]:
    """Transient buffers the strategy and precision add on top of state and activations.

    Autocast caches a low-precision copy of every weight that trains for the whole forward
    (and linears save it for backward); frozen fp32 weights (LoRA's base) are cast per use but
    saved for backward too. Sharded strategies gather each block's weights and unsharded
    gradients from shapes: the root group (embedding, head, final norm) stays gathered from
    forward to backward; on CUDA the caching allocator reuses one block's buffers for the next
    (two live: one computing, one prefetched); on CPU, measured (benchmarks/planner_accuracy.py),
    glibc keeps every block's freed buffers resident until the step ends, so all blocks count.
    The YaFSDP engine allocates its gather and gradient buffers once and reuses them (nothing is
    freed per block, so the same bytes on CPU as on CUDA, at any world size): its `buffer_bytes`.
    On gloo, measured, each block's all-gather and reduce-scatter leaves a temporary of one block
    (the larger of the two dtypes) resident on gloo's threads: the freed-buffer effect again, all
    blocks count (the engine's tensors alone account for the whole peak with a fake collective);
    its default point-to-point collectives allocate nothing."""
    a = info.args
    low = levers.precision in ("bf16", "fp16") and levers.weight_bytes() == 4  # DeepSpeed's fp16 holds fp16 weights
    cast = trainable.n_params + (trainable.frozen_params if trainable.frozen_bytes == 4 else 0)
    out: dict[str, int] = {"autocast_casts": 2 * cast if low else 0}
    if trainable.dequant_working:
        out["dequantised"] = trainable.dequant_working
    if levers.strategy == "yafsdp":
        policy, options = PrecisionPolicy(levers.precision), levers.parallel_options()
        base = FrozenBase.counted(trainable.n_params, trainable.frozen_params, trainable.frozen_bytes)
        p2p = YaFSDP.uses_p2p(options, device_type)
        out["buffers"] = YaFSDP.buffer_bytes(a, world, policy, options, base, p2p)
        if device_type == "cpu" and world > 1 and not p2p:
            size = max(policy.param_dtype.itemsize, REDUCE_DTYPES[options.reduce_dtype].itemsize)
            out["gloo_temporaries"] = a.n_layers * info.block_params * size
    elif levers.sharded_params and world > 1:
        # FSDP2 gathers in param_dtype (bf16 under bf16-pure, else the fp32 shards themselves),
        # ZeRO-3 in the dtype its mode holds the weights in
        gather = levers.weight_bytes()
        root = info.n_params - a.n_layers * info.block_params
        blocks = a.n_layers if device_type == "cpu" or not levers.reshard_after_forward else 2
        share = (root + blocks * info.block_params) / info.n_params  # of the model gathered at once
        frozen = min(trainable.frozen_state_bytes(), trainable.frozen_params * gather)  # frozen: no gradient
        out["gathered_params"] = int(share * (trainable.n_params * gather + frozen))
        out["unsharded_grads"] = int(share * trainable.n_params * 4)
    elif levers.strategy == "ddp" and world > 1:
        out["comm_buckets"] = min(2 * 25 * 2**20, 4 * trainable.n_params)  # bucket_cap_mb=25: one reducing, one filling
    elif levers.strategy == "deepspeed" and world > 1:
        out["comm_buckets"] = min(DS_BUCKET_ELEMENTS, trainable.n_params) * levers.weight_bytes()
    return out


def estimate_memory(info: ModelInfo, trainable: Trainable, levers: Levers, world: int, seq_len: int,
                    device: Device) -> MemoryEstimate:
    state = state_bytes(trainable, levers, world)
    host = 0
    if levers.offload:  # optimizer state and masters (and FSDP2's shards) live in host memory
        moved = ("optimizer", "master", "params", "grads") if levers.strategy == "fsdp2" else ("optimizer", "master")
        host = sum(state[k] for k in moved)
        state = {k: (0 if k in moved else v) for k, v in state.items()}
    activations, backward = activation_bytes(info, trainable, levers, seq_len, device.kind)
    parts = {**state, **activations, **comm_and_cast_bytes(info, trainable, levers, world, device.kind)}
    if levers.strategy != "deepspeed":
        # Gradients are freed after each step (zero_grad(set_to_none)) and written during backward
        # as it frees the saved activations, block by block, after the loss's chunk buffers are
        # gone: they count only where the last block's backward (all gradients and one block's
        # working set) would top the end of forward (measured on CPU: usually the peak).
        forward_end = parts["activations"] + parts["loss"] + parts["backward_working"]
        parts["grads"] = max(0, parts["grads"] + backward - forward_end)
    allocated = sum(parts.values())
    parts["fragmentation"] = int(allocated * device.fragmentation)
    parts["framework"] = device.overhead_bytes
    if levers.compiled:
        parts["compile_runtime"] = device.compile_overhead_bytes
    return MemoryEstimate({k: int(v) for k, v in parts.items()}, host)
