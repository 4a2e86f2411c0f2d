"""The yafsdp engine: a flat fp32 master shard per rank, units streamed through reused slots,
communication overlapped with compute in an explicit order.

Slots. Two slots for the blocks (block i always uses slot i % 2: the block being computed and
the next one) and one for embed and head, each with a gather buffer the size of its largest unit
and, when its units train, a gradient buffer in the reduce dtype and room for what the
reduce-scatter receives. A unit's parameters are permanent views into its slot's buffers (set
once at start-up): the gather writes straight into the weights, a gradient is copied into the
gradient buffer by a post-accumulate hook (autograd's tensor is dropped), nothing is allocated
per step. The embedding's backward reads no weight, so its buffer takes the head as soon as the
lookup is done, and the head's gradient (first in backward) is reduce-scattered while the blocks'
backward runs, before the embedding's (last) lands in the same buffer. A tied embedding stays in
its buffer for the whole step; autograd sums its two gradients, which arrive once, at the end of
backward. Each resident unit has a slot of its own, gathered when stale (after a step changed
it) at the first forward of a step, its gradients accumulated in place and reduce-scattered
once, in `step`.

Schedule. The order of one micro-step's events is the section "the schedule" below, one method
per event in the order they happen; `_hook_into` says where each comes from (a module hook, or
a `_Gate`: an identity whose backward marks where a block's or the head's backward starts or
ends). With `async_collectives` (the default) each gather is issued one unit ahead and each
reduce-scatter is waited for only when its buffer is needed again; `async_collectives = false`
waits every collective where it is issued (no prefetch, no overlap: the benchmark uses it to
isolate the buffer scheme). The invariant of `units.Slot` is checked on every use (a few
compares); a violation raises.

Hybrid sharding (`parallel.shard_group`). Everything above happens within a group of ranks
that holds one whole sharded copy of the state (`collectives.Collectives`); the groups hold the
same shards. In `step`, before anything reads the shard gradient, it is all-reduced across the
groups (one collective per step, after the last micro-step: not overlapped with backward), so
every group applies the same update. The gradient norm is one group's, and one group writes the
checkpoint, which is then a flat checkpoint of that group's size (`relayout` reads it on any).

LoRA. With a frozen base the streamed units hold frozen matrices: a frozen unit has a shard in
the dtype `cast_model` would hold it in (bf16 under bf16-pure or `lora.base_dtype = "bf16"`) and
nothing else: no master, gradient buffer, reduce-scatter or optimizer state. It never changes,
so it is gathered only when its buffer held something else: the frozen resident units once per
run, blocks 0 and 1 (and a tied embedding) stay resident from one step's backward into the next
step's forward.

Precision. One flat fp32 master shard per rank is what fused AdamW steps on (two parameters over
it: matrices with weight decay, norm weights without). fp32 and bf16 (autocast) gather the fp32
shard itself; bf16-pure gathers a bf16 copy of it, made with one copy after each step. The loss
is backpropagated times the micro-step's share (1 / accumulation steps), as on one device, and
the shard gradients (fp32, accumulated across micro-steps) are divided once, in `step`, by the
world size. fp16 is autocast like bf16, with dynamic loss scaling: the loss is backpropagated
times the scale too (so a backward overflows where the single-device one would), and `step`
unscales the reduced shard gradients and checks them for inf/nan with a `RankAgreedGradScaler`,
whose flag is summed over ranks: every rank skips the same step and halves (or, after
`growth_interval` clean steps, doubles) its scale alike. Clipping sees the unscaled gradients.
The scale is saved per rank.

On CUDA the collectives run on c10d's communication stream, which waits for the compute stream at
issue time, and `wait()` makes the compute stream wait for them: the buffer ordering above is
stream-ordered with no `record_stream`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from shoestring.config import ParallelSection
from shoestring.levers.precision import PrecisionPolicy
from shoestring.models.llama import Llama
from shoestring.parallel.base import (OptimizerSettings, RankAgreedGradScaler, StepResult, Strategy, WithLoss, adamw,
                                      scaled_step)
from shoestring.parallel.cost import Cost, Workload
from shoestring.parallel.flat import FlatLayout
from shoestring.parallel.yafsdp import cost as cost_model
from shoestring.parallel.yafsdp import relayout
from shoestring.parallel.yafsdp.collectives import REDUCE_DTYPES, Collectives, Counted, nbytes
from shoestring.parallel.yafsdp.units import Slot, Unit, held_dtype, split, storage_offsets


class _Gate(torch.autograd.Function):
    """Identity whose backward calls `callback`: marks where a block's backward starts or ends."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, callback: Callable[[], None]) -> torch.Tensor:
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.callback()
        return grad, None


class YaFSDP(Strategy):
    def __init__(self, model: Llama, policy: PrecisionPolicy, settings: OptimizerSettings, device: torch.device,
                 options: ParallelSection, comm: Collectives | None = None):
        self.device, self.policy, self.settings, self.model = device, policy, settings, model
        comm = comm or Collectives(p2p=options.gloo_collectives == "p2p", shard_group=options.shard_group)
        self.comm = Counted(comm)
        # Shards within this rank's group; data parallel over every rank of every group.
        self.shard_rank, self.shards, self.replica = comm.rank, comm.world_size, comm.replica
        self.rank, self.world_size = comm.replica * comm.world_size + comm.rank, comm.replicas * comm.world_size
        self.overlap = options.async_collectives
        self.module = WithLoss(model)
        by_name = dict(model.named_parameters())
        blocks, outer, resident = split(model, self.shards)
        self.layouts = [*blocks, *outer, *resident]
        offset = dict(zip((u.unit for u in self.layouts), storage_offsets(self.layouts)))
        trained = [u for u in self.layouts if u.trainable]
        total = sum(u.shard for u in trained)
        n_decay = sum(u.shard for u in trained if all(len(s) >= 2 for s in u.shapes))
        frozen_dtypes = {by_name[n[0]].dtype for u in self.layouts if not u.trainable for n in u.names}
        if len(frozen_dtypes) > 1:
            raise ValueError(f"yafsdp: frozen parameters of several dtypes {sorted(map(str, frozen_dtypes))}")
        frozen_dtype = held_dtype(policy, frozen_dtypes.pop() if frozen_dtypes else torch.float32)

        # The fp32 master shard of the trained units, its gradient, Adam's moments: one flat tensor
        # each; the frozen units' shards in one more.
        self.master = torch.zeros(total, dtype=torch.float32, device=device)
        self.frozen = torch.zeros(sum(u.shard for u in self.layouts) - total, dtype=frozen_dtype, device=device)
        for u in self.layouts:
            store = self.master if u.trainable else self.frozen
            full = u.flatten([by_name[n[0]] for n in u.names], store.dtype)
            mine = full[self.shard_rank * u.shard : (self.shard_rank + 1) * u.shard]
            store[offset[u.unit] : offset[u.unit] + u.shard].copy_(mine)
        self.grad = torch.zeros_like(self.master)
        self.moments = torch.zeros(2, total, dtype=torch.float32, device=device)
        ranges = [(0, n_decay), (n_decay, total)]
        decay, no_decay = ([nn.Parameter(self.master[lo:hi])] if hi > lo else [] for lo, hi in ranges)
        self.optimizer = adamw(decay, no_decay, settings, device)
        self.scaler = RankAgreedGradScaler(device.type, policy, self.comm.all_reduce)
        for group, (lo, hi) in zip(self.optimizer.param_groups, ranges):
            for p in group["params"]:
                p.grad = self.grad[lo:hi]
                self.optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=device),
                                           "exp_avg": self.moments[0, lo:hi], "exp_avg_sq": self.moments[1, lo:hi]}
        # What is gathered: the master itself, or its low-precision copy (one copy per step).
        lowp = policy.param_dtype != torch.float32
        self.send = self.master.to(policy.param_dtype) if lowp else self.master

        # The slots, allocated once: two for the blocks, one for embed and head, one per resident unit.
        pdt, rdt = policy.param_dtype, REDUCE_DTYPES[options.reduce_dtype]

        def dtype(u: FlatLayout) -> torch.dtype:
            return pdt if u.trainable else frozen_dtype

        def streamed_slot(name: str, group: list[FlatLayout]) -> Slot:
            largest = max((u.padded for u in group), default=0)
            trained = max((u.padded for u in group if u.trainable), default=0)
            return Slot(name, torch.zeros(largest, dtype=dtype(group[0]) if group else pdt, device=device),
                        torch.zeros(trained, dtype=rdt, device=device),
                        torch.zeros(self.comm.recv_size(trained), dtype=rdt, device=device))

        def resident_slot(u: FlatLayout) -> Slot:
            return Slot(u.unit, torch.empty(u.padded, dtype=dtype(u), device=device),
                        torch.zeros(u.padded if u.trainable else 0, dtype=rdt, device=device),
                        torch.empty(0, dtype=rdt, device=device))  # reduced once per step, into a temporary

        def unit(u: FlatLayout, slot: Slot) -> Unit:
            at = slice(offset[u.unit], offset[u.unit] + u.shard)
            if u.trainable:
                return Unit(u, slot, self.master[at], self.send[at], self.grad[at])
            return Unit(u, slot, self.frozen[at], self.frozen[at], None)

        block_slots = (streamed_slot("even blocks", blocks), streamed_slot("odd blocks", blocks))
        self.streamed_slots = [*block_slots, streamed_slot("embed and head", outer)]
        self.blocks = [unit(u, block_slots[i % 2]) for i, u in enumerate(blocks)]
        self.outer = [unit(u, self.streamed_slots[2]) for u in outer]
        self.embed, self.head = self.outer[0], self.outer[-1]  # one unit when the head is tied
        self.resident = [unit(u, resident_slot(u)) for u in resident]
        self.units = [*self.blocks, *self.outer, *self.resident]  # the order of `self.layouts`
        self.slots = [*self.streamed_slots, *(u.slot for u in self.resident)]
        self._hook_into(model, by_name)
        self.comm_stats: dict[str, float] = {}  # the last completed step's `Counted.take()`

    def _hook_into(self, model: Llama, by_name: dict[str, nn.Parameter]) -> None:
        """Parameters become views into their slots, and the model's events call the schedule."""
        for u in self.units:
            on_grad = self._resident_gradient_lands if u in self.resident else functools.partial(self._gradient_lands, u)
            for names, view in zip(u.layout.names, u.layout.views(u.slot.weights)):
                by_name[names[0]].data = view
            if u.trainable:
                for names, gview in zip(u.layout.names, u.layout.views(u.slot.grads)):
                    by_name[names[0]].register_post_accumulate_grad_hook(functools.partial(on_grad, gview))
        model.register_forward_pre_hook(self._forward_starts)
        model.embed_tokens.register_forward_hook(self._embedding_done)
        for i, block in enumerate(model.layers):
            block.register_forward_pre_hook(functools.partial(self._block_enters, i))
            block.register_forward_hook(functools.partial(self._block_leaves, i))
        model.register_forward_hook(self._head_starts)
        # Backward: the gates planted above call `_head_done`, `_block_backward_starts` and
        # `_block_backward_ends`; each parameter's gradient calls `_gradient_lands`.

    # ---- the schedule: one micro-step's events, in the order they happen ------------------------
    def _forward_starts(self, *_) -> None:
        """Gather the embedding (and block 0, which lands while the embedding runs) and whatever
        resident unit is stale."""
        if torch.is_grad_enabled():
            for u in self.outer:
                u.grads_seen = 0
        self._gather(self.embed)
        if self.overlap and self.blocks:
            self._gather(self.blocks[0])
        stale = [u for u in self.resident if u.slot.holds is not u]
        for u in stale:
            self._gather(u)
        for u in stale:
            self._landed(u.slot)
        self._acquire(self.embed)

    def _embedding_done(self, *_) -> None:
        """The embedding's backward needs no weight: its buffer can take the head now."""
        self._release(self.embed)
        if self.overlap:
            self._gather(self.head)

    def _block_enters(self, i: int, module: nn.Module, args: tuple) -> tuple:
        """Wait for block i's gather, issue block i+1's into the other slot."""
        block = self.blocks[i]
        self._acquire(block)
        if self.overlap and i + 1 < len(self.blocks):
            self._gather(self.blocks[i + 1])
        if not torch.is_grad_enabled():
            return args
        # Without a gradient into the input (nothing before the block trains: LoRA's frozen
        # embedding) no gate can mark the end of the block's backward; `_backward_done` releases
        # the block when backward returns.
        block.input_gated = args[0].requires_grad
        if not block.input_gated:
            return args
        return (_Gate.apply(args[0], functools.partial(self._block_backward_ends, i)), *args[1:])

    def _block_leaves(self, i: int, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        self._release(self.blocks[i])
        if not torch.is_grad_enabled():
            return out
        return _Gate.apply(out, functools.partial(self._block_backward_starts, i))

    def _head_starts(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """The head reads its buffer from the loss's forward to the end of its backward."""
        self._acquire(self.head)
        if not torch.is_grad_enabled():  # the loss follows at once and nothing is gathered meanwhile
            self._release(self.head)
            return out
        return _Gate.apply(out, self._head_done)

    def _head_done(self) -> None:
        self._release(self.head)

    def _block_backward_starts(self, i: int) -> None:
        """Before block i's backward (and its recompute, which reads the same views): wait for its
        gather (the last two blocks are still there from forward), issue block i-1's."""
        block = self.blocks[i]
        self._acquire(block)
        if block.trainable:
            self._claim_grads(block)  # the gradient buffer block i + 2 used is free again
            block.grads_seen = 0
        if self.overlap and i > 0 and block.input_gated:  # block i - 1 has a backward
            self._gather(self.blocks[i - 1])

    def _gradient_lands(self, unit: Unit, dest: torch.Tensor, p: nn.Parameter) -> None:
        """Into the slot's gradient buffer; with the unit's last one, its reduce-scatter starts
        (it runs while the next unit's backward computes)."""
        if unit in self.outer and unit.grads_seen == 0:  # embed and head share a gradient buffer
            self._claim_grads(unit)
        dest.copy_(p.grad)
        p.grad = None
        unit.grads_seen += 1
        if unit.complete:
            slot = unit.slot
            slot.reducing = (unit, self.comm.reduce_scatter(slot.recv, slot.grads[: unit.layout.padded]))
            if not self.overlap:
                self._reduced(slot)

    def _resident_gradient_lands(self, dest: torch.Tensor, p: nn.Parameter) -> None:
        """Accumulated in place, reduce-scattered once per step (`_reduce_resident`)."""
        dest.add_(p.grad)
        p.grad = None

    def _block_backward_ends(self, i: int) -> None:
        self._release(self.blocks[i])

    def _backward_done(self) -> None:
        """Finish every reduce-scatter; only a unit no gradient passed may still hold its slot."""
        for slot in self.streamed_slots:
            self._reduced(slot)
            if slot.reader is not None:
                if slot.reader in self.blocks and slot.reader.input_gated:
                    raise RuntimeError(f"yafsdp: {slot.reader.name} still holds the {slot.name} buffer after backward")
                self._release(slot.reader)
        missing = [u.name for u in [*self.blocks, *self.outer] if u.trainable and not u.complete]
        if missing:
            raise RuntimeError(f"yafsdp: units {missing} did not receive a gradient for every parameter")

    def _reduce_resident(self) -> None:
        for u in self.resident:
            if u.trainable:
                full = u.slot.grads
                recv = torch.empty(self.comm.recv_size(full.numel()), dtype=full.dtype, device=full.device)
                self.comm.wait(self.comm.reduce_scatter(recv, full))
                u.grad.add_(recv[: u.layout.shard])
                full.zero_()

    # ---- slots: the invariant ---------------------------------------------------------------------
    def _gather(self, unit: Unit) -> None:
        """Start the unit's gather into its slot (nothing when the slot already holds it)."""
        slot = unit.slot
        if slot.holds is unit:
            return
        if slot.reader is not None:
            raise RuntimeError(f"yafsdp: gather of {unit.name} would overwrite the {slot.name} buffer while "
                               f"{slot.reader.name} still reads it")
        if slot.gathering is not None:
            raise RuntimeError(f"yafsdp: the {slot.name} buffer still receives {slot.holds.name}")
        slot.holds, slot.gathering = unit, self.comm.all_gather(slot.weights[: unit.layout.padded], unit.sent)
        if not self.overlap:
            self._landed(slot)

    def _landed(self, slot: Slot) -> None:
        if slot.gathering is not None:
            self.comm.wait(slot.gathering)
            slot.gathering = None

    def _acquire(self, unit: Unit) -> None:
        """The unit is about to compute (forward, or backward with a block's recompute)."""
        self._gather(unit)
        self._landed(unit.slot)
        unit.slot.reader = unit

    def _release(self, unit: Unit) -> None:
        slot = unit.slot
        if slot.reader is not unit:
            raise RuntimeError(f"yafsdp: {unit.name} releases the {slot.name} buffer, read by "
                               f"{slot.reader.name if slot.reader else 'nobody'}")
        slot.reader = None

    def _claim_grads(self, unit: Unit) -> None:
        """The unit's gradients are about to land in its slot: the reduce-scatter from it must be
        over, and the padding is zeroed."""
        slot = unit.slot
        self._reduced(slot)
        slot.grads[unit.layout.numel : unit.layout.padded].zero_()

    def _reduced(self, slot: Slot) -> None:
        """Finish the reduce-scatter from the slot's gradient buffer, add it to the shard gradient."""
        if slot.reducing is None:
            return
        unit, work = slot.reducing
        self.comm.wait(work)
        unit.grad.add_(slot.recv[: unit.layout.shard])
        slot.reducing = None

    # ---- the Strategy interface ---------------------------------------------------------------
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_scale: float, last_micro_step: bool,
                         doc: torch.Tensor | None = None) -> torch.Tensor:
        loss = self._loss(x, y, doc)
        self.scaler.scale(loss * loss_scale).backward()
        self._backward_done()
        return loss.detach()

    def step(self, lr: float) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._reduce_resident()
        if self.world_size > self.shards:  # hybrid: the same shard of every group, summed
            self.comm.wait(self.comm.all_reduce_across(self.grad))
        self.grad.div_(self.world_size)
        grad_norm, skipped = scaled_step(self.optimizer, self.scaler, self._clip)
        if not skipped:
            self._refresh()
        self.grad.zero_()
        self.comm_stats = self.comm.take()
        return StepResult(grad_norm=grad_norm.detach(), skipped=skipped)

    def _clip(self) -> torch.Tensor:
        """Clip the shard gradients by their global norm (over ranks); the pre-clip norm."""
        sq = self.grad.square().sum()
        if self.replica:  # every group holds the same shard gradients: one group's make the norm
            sq.zero_()
        self.comm.all_reduce(sq)
        grad_norm = sq.sqrt()
        if self.settings.grad_clip > 0:
            self.grad.mul_(torch.clamp(self.settings.grad_clip / (grad_norm + 1e-6), max=1.0))
        return grad_norm

    def _refresh(self, frozen_too: bool = False) -> None:
        """New masters (after a load, new frozen shards too): every gathered copy of them is stale."""
        if self.send is not self.master:
            self.send.copy_(self.master)
        for slot in self.slots:
            if slot.holds is not None and (frozen_too or slot.holds.trainable):
                slot.holds = None

    def save(self, directory: Path) -> None:
        """One group's shards (the groups hold the same): a checkpoint as a flat run of that group's
        size writes, which `load` cuts again for any world and group size."""
        if self.replica:
            return
        relayout.save(directory, self.shard_rank, self.shards, self.layouts, self.master, self.moments, self.frozen,
                      self.scaler.state_dict(), next(iter(self.optimizer.state.values()))["step"])

    @torch.no_grad()
    def load(self, directory: Path) -> None:
        for saved in relayout.rank_files(directory):
            relayout.load_shards(saved, self.layouts, storage_offsets(self.layouts), self.shard_rank, self.master,
                                 self.moments, self.frozen)
            for state in self.optimizer.state.values():
                state["step"].fill_(saved["step"])
            if saved.get("scaler"):  # the same on every rank
                self.scaler.load_state_dict(saved["scaler"])
        self._refresh(frozen_too=True)

    consolidated_weights = staticmethod(relayout.consolidated_weights)

    # The static cost model (`cost.py`), which the planner asks the strategy for.
    state_bytes = staticmethod(cost_model.state_bytes)
    buffer_bytes = staticmethod(cost_model.buffer_bytes)
    uses_p2p = staticmethod(cost_model.uses_p2p)
    communication_bytes = staticmethod(cost_model.communication_bytes)

    @classmethod
    def cost(cls, w: Workload) -> Cost:
        return cost_model.engine_cost(w)

    def comm_groups(self) -> dict[tuple[int, ...], str]:
        return self.comm.comm.spans

    def memory(self) -> dict[str, int]:
        steps = sum(nbytes(s["step"]) for s in self.optimizer.state.values())
        return {"params": nbytes(self.send) + nbytes(self.frozen), "grads": nbytes(self.grad),
                "master": nbytes(self.master) if self.send is not self.master else 0,
                "optimizer": nbytes(self.moments) + steps,
                "buffers": sum(nbytes(t) for s in self.slots for t in (s.weights, s.grads, s.recv))}

    def unwrapped(self) -> Llama:
        return self.model
