"""A YaFSDP-style sharded data-parallel engine: flat per-block shards, two reused gather buffers
and two reused gradient buffers, communication overlapped with compute in an explicit order.

Units. Each transformer block's matrices form one flat padded unit (`flat.FlatLayout`), sharded
evenly: rank r owns a contiguous 1/N slice. The other matrices (embedding, and the head unless it
is tied to the embedding) form the `root` unit, and every small parameter (norm weights) the
`small` unit. Those two are *resident*: gathered once per optimizer step (the step's first
forward), kept for the whole step like FSDP2 keeps its root, their gradients accumulated in place
and reduce-scattered once, in `step`.

Buffers. Two gather buffers (the size of the largest block) hold the block being computed and the
next one; block i always uses buffer i % 2, and its parameters are permanent views into it (set
once at start-up: the gather writes straight into the weights, no copy-out, no per-step
allocation). Two gradient buffers in the reduce dtype take each block's gradients (the
post-accumulate hook copies them in and drops autograd's tensor) and are reduce-scattered from.

Schedule (async, the default). Forward: entering block i waits for its gather and issues block
i+1's into the other buffer. Backward: an identity autograd node on block i's output runs before
any of the block's backward (and before a checkpointed block's recompute, which reads the same
views): it waits for block i's gather (usually still resident from forward for the last two
blocks, or issued by block i+1) and issues block i-1's. An identity node on the block's input
runs after the block's backward and frees its buffer. When the last gradient of block i lands,
its reduce-scatter is issued and runs while block i-1's backward computes; the buffer is waited
for before block i-2 reuses it. `async_collectives = false` waits every collective where it is
issued (no prefetch, no overlap): the benchmark uses it to isolate the buffer scheme.

Invariant (checked on every use, it costs a few integer compares): a gather buffer is never
written while a block still reads it, and never read while its gather is in flight; a gradient
buffer is never overwritten before its reduce-scatter has completed. Violations raise.

Precision. One flat fp32 master shard per rank is what fused AdamW steps on (two parameters over
it: matrices with weight decay, norm weights without). fp32 and bf16 (autocast) gather the fp32
shard itself; bf16-pure gathers a bf16 copy of it, made with one copy after each step. The loss
is backpropagated unscaled and the shard gradients (fp32, accumulated across micro-steps) are
multiplied once, in `step`, by loss_scale / world size. fp16 is refused by the config.

On CUDA the collectives run on c10d's communication stream, which waits for the compute stream at
issue time, and `wait()` makes the compute stream wait for them: the buffer ordering above is
stream-ordered with no `record_stream`. The `comm_wait_s` counter then measures host blocking
only. LoRA (frozen base shards) is not supported yet: `build.check_parallel` refuses it.

Checkpoints: every rank writes its flat master and Adam moments with the layouts
(`yafsdp/rank{r}.pt`); `load` cuts them again for any world size; `consolidated_weights` rebuilds
the full fp32 state dict for export.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as tdist
from torch import nn

from shoestring.config import ParallelSection
from shoestring.levers.precision import PrecisionPolicy
from shoestring.models.llama import Llama, ModelArgs
from shoestring.parallel import dist
from shoestring.parallel.base import OptimizerSettings, StepResult, Strategy, WithLoss, adamw, require_file
from shoestring.parallel.flat import FlatLayout
from shoestring.train import checkpoint as ckpt

CKPT_DIR = "yafsdp"
REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Collectives:
    """The collectives the engine uses, as async work handles (tests pass a fake)."""

    def __init__(self) -> None:
        self.rank, self.world_size = dist.rank(), dist.world_size()

    def all_gather(self, out: torch.Tensor, shard: torch.Tensor) -> Any:
        return tdist.all_gather_into_tensor(out, shard, async_op=True)

    def reduce_scatter(self, shard: torch.Tensor, full: torch.Tensor) -> Any:
        return tdist.reduce_scatter_tensor(shard, full, op=tdist.ReduceOp.SUM, async_op=True)

    def all_reduce(self, t: torch.Tensor) -> None:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)


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


def _units(model: Llama, world: int) -> tuple[FlatLayout, list[FlatLayout], FlatLayout]:
    """(root, blocks, small) layouts, each parameter once (tied weights keep all their names)."""
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p

    def layout(unit: str, keep: Callable[[str, nn.Parameter], bool]) -> FlatLayout:
        ids = [i for i, p in params.items() if keep(names[i][0], p)]
        return FlatLayout(unit, tuple(tuple(names[i]) for i in ids), tuple(tuple(params[i].shape) for i in ids), world)

    blocks = [layout(f"layers.{b}", lambda n, p, b=b: n.startswith(f"layers.{b}.") and p.dim() >= 2)
              for b in range(len(model.layers))]
    root = layout("root", lambda n, p: not n.startswith("layers.") and p.dim() >= 2)
    small = layout("small", lambda n, p: p.dim() < 2)
    return root, blocks, small


class YaFSDP(Strategy):
    def __init__(self, model: Llama, policy: PrecisionPolicy, settings: OptimizerSettings, device: torch.device,
                 options: ParallelSection, comm: Collectives | None = None):
        self.device, self.policy, self.settings, self.model = device, policy, settings, model
        self.comm = comm or Collectives()
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.overlap = options.async_collectives
        self.reduce_dtype = REDUCE_DTYPES[options.reduce_dtype]
        self.module = WithLoss(model)
        by_name = dict(model.named_parameters())
        self.root, self.blocks, self.small = _units(model, self.world_size)
        self.units = [self.root, *self.blocks, self.small]  # matrices first: one decayed range
        self.offsets = [sum(u.shard for u in self.units[:k]) for k in range(len(self.units) + 1)]
        total, n_decay = self.offsets[-1], self.offsets[-2]

        # The fp32 master shard, its gradient, Adam's moments: one flat tensor each.
        self.master = torch.zeros(total, dtype=torch.float32, device=device)
        for unit, at in zip(self.units, self.offsets):
            full = unit.flatten([by_name[n[0]] for n in unit.names], torch.float32)
            self.master[at : at + unit.shard].copy_(full[self.rank * unit.shard : (self.rank + 1) * unit.shard])
        self.grad = torch.zeros_like(self.master)
        self.moments = torch.zeros(2, total, dtype=torch.float32, device=device)
        decay, no_decay = nn.Parameter(self.master[:n_decay]), nn.Parameter(self.master[n_decay:])
        decay.grad, no_decay.grad = self.grad[:n_decay], self.grad[n_decay:]
        self.optimizer = adamw([decay], [no_decay], settings, device)
        for p, sl in ((decay, slice(0, n_decay)), (no_decay, slice(n_decay, total))):
            self.optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=device),
                                       "exp_avg": self.moments[0, sl], "exp_avg_sq": self.moments[1, sl]}
        # What is gathered: the master itself, or its low-precision copy (one copy per step).
        lowp = policy.param_dtype != torch.float32
        self.send = self.master.to(policy.param_dtype) if lowp else self.master

        # Resident units and the two gather + two gradient buffers, allocated once.
        pdt, rdt = policy.param_dtype, self.reduce_dtype
        largest = max((u.padded for u in self.blocks), default=0)
        self.resident = {u.unit: torch.empty(u.padded, dtype=pdt, device=device) for u in (self.root, self.small)}
        self.resident_grad = {u.unit: torch.zeros(u.padded, dtype=rdt, device=device) for u in (self.root, self.small)}
        self.gather_buf = [torch.zeros(largest, dtype=pdt, device=device) for _ in range(2)]
        self.grad_buf = [torch.zeros(largest, dtype=rdt, device=device) for _ in range(2)]
        self.rs_out = [torch.zeros(largest // self.world_size, dtype=rdt, device=device) for _ in range(2)]

        # Parameters become views into their buffers; gradients leave through hooks.
        for u in (self.root, self.small):
            self._bind(u, self.resident[u.unit], self.resident_grad[u.unit], by_name, self._resident_grad)
        for i, u in enumerate(self.blocks):
            self._bind(u, self.gather_buf[i % 2], self.grad_buf[i % 2], by_name, functools.partial(self._block_grad, i))
            model.layers[i].register_forward_pre_hook(functools.partial(self._enter, i))
            model.layers[i].register_forward_hook(functools.partial(self._leave, i))
        model.register_forward_pre_hook(lambda *_: self._gather_resident())

        # Schedule state (see the module docstring's invariant).
        self.slot_unit: list[int | None] = [None, None]  # block whose weights a gather buffer holds
        self.slot_work: list[Any] = [None, None]  # its gather, while in flight
        self.slot_reader: list[int | None] = [None, None]  # block computing with it now
        self.rs_pending: list[tuple[int, Any] | None] = [None, None]  # (block, reduce-scatter) per grad buffer
        self.grads_seen = [0] * len(self.blocks)
        self.resident_valid = False
        self.loss_scale = 1.0
        # Communication of the last completed optimizer step, for the trainer or a benchmark to
        # log: seconds blocked in wait(), bytes of full tensors gathered and reduced (an eval
        # forward since the previous step is counted in the next step).
        self.comm_wait_s, self.gathered_bytes, self.reduced_bytes = 0.0, 0, 0
        self.comm_stats: dict[str, float] = {}

    # ---- layout binding ---------------------------------------------------------------------
    def _bind(self, unit: FlatLayout, buf: torch.Tensor, grad_buf: torch.Tensor, by_name: dict, on_grad: Callable) -> None:
        for names, view, gview in zip(unit.names, unit.views(buf), unit.views(grad_buf)):
            p = by_name[names[0]]
            p.data = view
            p.register_post_accumulate_grad_hook(functools.partial(on_grad, gview))

    # ---- collectives --------------------------------------------------------------------------
    def _wait(self, work: Any) -> None:
        t0 = time.perf_counter()
        work.wait()
        self.comm_wait_s += time.perf_counter() - t0

    def _shard_of(self, k: int) -> torch.Tensor:
        """This rank's slice of unit `k` (in `self.units` order) in the gathered dtype."""
        return self.send[self.offsets[k] : self.offsets[k + 1]]

    def _all_gather(self, out: torch.Tensor, k: int) -> Any:
        self.gathered_bytes += out.numel() * out.element_size()
        return self.comm.all_gather(out, self._shard_of(k))

    def _reduce_scatter(self, out: torch.Tensor, full: torch.Tensor) -> Any:
        self.reduced_bytes += full.numel() * full.element_size()
        return self.comm.reduce_scatter(out, full)

    def _accumulate(self, k: int, shard: torch.Tensor) -> None:
        self.grad[self.offsets[k] : self.offsets[k + 1]].add_(shard)

    # ---- resident units -----------------------------------------------------------------------
    def _gather_resident(self) -> None:
        if self.resident_valid:
            return
        works = [self._all_gather(self.resident[u.unit], k) for k, u in ((0, self.root), (len(self.units) - 1, self.small))]
        if self.overlap and self.blocks:
            self._gather(0)  # block 0 lands while the embedding runs
        for w in works:
            self._wait(w)
        self.resident_valid = True

    def _resident_grad(self, dest: torch.Tensor, p: nn.Parameter) -> None:
        dest.add_(p.grad)
        p.grad = None

    # ---- block gather buffers -----------------------------------------------------------------
    def _gather(self, i: int) -> None:
        """Start block i's gather into buffer i % 2 (nothing when the buffer already holds it)."""
        s = i % 2
        if self.slot_unit[s] == i:
            return
        if self.slot_reader[s] is not None:
            raise RuntimeError(f"yafsdp: gather of block {i} would overwrite buffer {s} while block "
                               f"{self.slot_reader[s]} still reads it")
        if self.slot_work[s] is not None:
            raise RuntimeError(f"yafsdp: buffer {s} still receives block {self.slot_unit[s]}")
        work = self._all_gather(self.gather_buf[s][: self.blocks[i].padded], i + 1)
        self.slot_unit[s], self.slot_work[s] = i, work
        if not self.overlap:
            self._landed(s)

    def _landed(self, s: int) -> None:
        if self.slot_work[s] is not None:
            self._wait(self.slot_work[s])
            self.slot_work[s] = None

    def _acquire(self, i: int) -> None:
        """Block i is about to compute (forward, or backward with its recompute)."""
        self._gather(i)
        s = i % 2
        self._landed(s)
        self.slot_reader[s] = i

    def _release(self, i: int) -> None:
        s = i % 2
        if self.slot_reader[s] != i:
            raise RuntimeError(f"yafsdp: block {i} releases buffer {s}, read by {self.slot_reader[s]}")
        self.slot_reader[s] = None

    def _enter(self, i: int, module: nn.Module, args: tuple) -> tuple:
        self._acquire(i)
        if self.overlap and i + 1 < len(self.blocks):
            self._gather(i + 1)
        if not torch.is_grad_enabled():
            return args
        return (_Gate.apply(args[0], functools.partial(self._release, i)), *args[1:])

    def _leave(self, i: int, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        self._release(i)
        if not torch.is_grad_enabled():
            return out
        return _Gate.apply(out, functools.partial(self._backward_starts, i))

    def _backward_starts(self, i: int) -> None:
        self._acquire(i)
        s = i % 2
        self._reduced(s)  # the gradient buffer block i + 2 used is free again
        unit = self.blocks[i]
        self.grad_buf[s][unit.numel : unit.padded].zero_()
        self.grads_seen[i] = 0
        if self.overlap and i > 0:
            self._gather(i - 1)

    # ---- block gradients ----------------------------------------------------------------------
    def _block_grad(self, i: int, dest: torch.Tensor, p: nn.Parameter) -> None:
        dest.copy_(p.grad)
        p.grad = None
        self.grads_seen[i] += 1
        if self.grads_seen[i] == len(self.blocks[i].names):
            s, unit = i % 2, self.blocks[i]
            out = self.rs_out[s][: unit.shard]
            self.rs_pending[s] = (i, self._reduce_scatter(out, self.grad_buf[s][: unit.padded]))
            if not self.overlap:
                self._reduced(s)

    def _reduced(self, s: int) -> None:
        """Finish the reduce-scatter from gradient buffer s, add it to the shard gradient."""
        if self.rs_pending[s] is None:
            return
        i, work = self.rs_pending[s]
        self._wait(work)
        self._accumulate(i + 1, self.rs_out[s][: self.blocks[i].shard])
        self.rs_pending[s] = None

    # ---- the Strategy interface ---------------------------------------------------------------
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_scale: float, last_micro_step: bool) -> torch.Tensor:
        self.loss_scale = loss_scale  # applied once, in step (the same for every micro-step)
        loss = self._loss(x, y)
        loss.backward()
        for s in (0, 1):
            self._reduced(s)
        missing = [i for i, n in enumerate(self.grads_seen) if n != len(self.blocks[i].names)]
        if missing:
            raise RuntimeError(f"yafsdp: blocks {missing} did not receive a gradient for every parameter")
        return loss.detach()

    def _reduce_resident(self) -> None:
        for k, u in ((0, self.root), (len(self.units) - 1, self.small)):
            full = self.resident_grad[u.unit]
            out = torch.empty(u.shard, dtype=full.dtype, device=full.device)
            self._wait(self._reduce_scatter(out, full))
            self._accumulate(k, out)
            full.zero_()

    def step(self, lr: float) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._reduce_resident()
        self.grad.mul_(self.loss_scale / self.world_size)
        sq = self.grad.square().sum()
        self.comm.all_reduce(sq)
        grad_norm = sq.sqrt()
        if self.settings.grad_clip > 0:
            self.grad.mul_(torch.clamp(self.settings.grad_clip / (grad_norm + 1e-6), max=1.0))
        skipped = not bool(torch.isfinite(grad_norm))
        if not skipped:
            self.optimizer.step()
            self._refresh()
        self.grad.zero_()
        self.comm_stats = {"comm_wait_s": self.comm_wait_s, "all_gather_bytes": self.gathered_bytes,
                           "reduce_scatter_bytes": self.reduced_bytes}
        self.comm_wait_s, self.gathered_bytes, self.reduced_bytes = 0.0, 0, 0
        return StepResult(grad_norm=grad_norm.detach(), skipped=skipped)

    def _refresh(self) -> None:
        """New masters: the gathered copy and every gathered buffer are stale."""
        if self.send is not self.master:
            self.send.copy_(self.master)
        self.slot_unit = [None, None]
        self.resident_valid = False

    # ---- checkpoints --------------------------------------------------------------------------
    def _layouts(self) -> list[tuple]:
        return [(u.unit, u.names, u.shapes) for u in self.units]

    def save(self, directory: Path) -> None:
        state = {"world_size": self.world_size, "layouts": self._layouts(), "master": self.master,
                 "moments": self.moments, "step": self.optimizer.state[self.optimizer.param_groups[0]["params"][0]]["step"]}
        (directory / CKPT_DIR).mkdir(exist_ok=True)
        ckpt.write_file(directory / CKPT_DIR / f"rank{self.rank}.pt", ckpt.torch_bytes(state))

    @torch.no_grad()
    def load(self, directory: Path) -> None:
        for saved in _rank_files(require_file(directory, CKPT_DIR)):
            if [(u, tuple(map(tuple, n)), tuple(map(tuple, s))) for u, n, s in saved["layouts"]] != self._layouts():
                raise RuntimeError(f"{directory}: the checkpoint's parameters differ from this model's")
            for k, (old, new) in enumerate(zip(_relayout(saved), self.units)):
                a, b = old.shard_range(saved["rank"])
                c, d = new.shard_range(self.rank)
                lo, hi = max(a, c), min(b, d)
                if lo < hi:
                    src = slice(saved["offsets"][k] + lo - a, saved["offsets"][k] + hi - a)
                    dst = slice(self.offsets[k] + lo - c, self.offsets[k] + hi - c)
                    self.master[dst] = saved["master"][src]
                    self.moments[:, dst] = saved["moments"][:, src]
            for group in self.optimizer.param_groups:
                self.optimizer.state[group["params"][0]]["step"].fill_(saved["step"])
        self._refresh()

    @staticmethod
    def consolidated_weights(directory: Path) -> dict[str, torch.Tensor]:
        full: dict[int, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for saved in _rank_files(require_file(directory, CKPT_DIR)):
            for k, unit in enumerate(_relayout(saved)):
                a, b = unit.shard_range(saved["rank"])
                if k not in full:
                    full[k] = torch.zeros(unit.padded)
                full[k][a:b] = saved["master"][saved["offsets"][k] :][: b - a]
        for k, unit in enumerate(_relayout(saved)):
            for names, view in zip(unit.names, unit.views(full[k])):
                out.update({n: view.clone() for n in names})
        return out

    # ---- cost ---------------------------------------------------------------------------------
    @staticmethod
    def state_bytes(n_params: int, world_size: int, policy: PrecisionPolicy, options: ParallelSection) -> dict[str, int]:
        """Flat shards (padding ignored): fp32 master (it is the parameter under fp32/bf16; under
        bf16-pure the gathered bf16 copy is the parameter and the master is counted apart), fp32
        shard gradient, fp32 Adam moments. The buffers are `buffer_bytes`."""
        shard = n_params // world_size
        lowp = policy.uses_master_weights
        return {"params": (2 if lowp else 4) * shard, "grads": 4 * shard, "master": 4 * shard if lowp else 0,
                "optimizer": 8 * shard}

    @staticmethod
    def buffer_bytes(args: ModelArgs, world_size: int, policy: PrecisionPolicy, options: ParallelSection) -> int:
        """The preallocated buffers: two gather + two gradient buffers of the largest block, their
        reduce-scatter outputs, and the resident root/small units with their gradients."""
        blocks, root, small = (_padded(n, world_size) for n in _unit_sizes(args))
        p, r = policy.param_dtype.itemsize, REDUCE_DTYPES[options.reduce_dtype].itemsize
        return 2 * blocks * (p + r) + 2 * blocks // world_size * r + (root + small) * (p + r)

    @staticmethod
    def communication_bytes(args: ModelArgs, world_size: int, policy: PrecisionPolicy, options: ParallelSection,
                            grad_accum: int) -> dict[str, int]:
        """Bytes of gathered and reduced (full, unsharded) tensors per optimizer step, as the
        engine counts them in `comm_stats`. Forward gathers every block, backward re-gathers all
        but the last two (still resident from forward), and a later micro-step's forward finds
        blocks 0 and 1 still resident from the backward before; every block is reduce-scattered
        each micro-step, root and small once per step. A ring all-gather or reduce-scatter sends
        (N-1)/N of these bytes per rank; gloo's reduce-scatter is an all-reduce (twice that)."""
        blocks, root, small = (_padded(n, world_size) for n in _unit_sizes(args))
        p, r = policy.param_dtype.itemsize, REDUCE_DTYPES[options.reduce_dtype].itemsize
        n = args.n_layers
        regathered = n - min(n, 2)
        gathers = n + regathered + (grad_accum - 1) * 2 * regathered
        return {"all_gather_bytes": (gathers * blocks + root + small) * p,
                "reduce_scatter_bytes": (grad_accum * n * blocks + root + small) * r}

    def memory(self) -> dict[str, int]:
        buffers = [*self.gather_buf, *self.grad_buf, *self.rs_out, *self.resident.values(), *self.resident_grad.values()]
        steps = sum(_nbytes(s["step"]) for s in self.optimizer.state.values())
        return {"params": _nbytes(self.send), "grads": _nbytes(self.grad),
                "master": _nbytes(self.master) if self.send is not self.master else 0,
                "optimizer": _nbytes(self.moments) + steps, "buffers": sum(_nbytes(b) for b in buffers)}

    def unwrapped(self) -> Llama:
        return self.model


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _padded(n: int, world_size: int) -> int:
    return -(-n // world_size) * world_size


def _unit_sizes(args: ModelArgs) -> tuple[int, int, int]:
    """Elements of one block's matrices, of the root unit, of the small unit."""
    d, q, kv = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    block = d * (q + 2 * kv) + q * d + 3 * d * args.ffn_dim
    root = args.vocab_size * d * (1 if args.tie_embeddings else 2)
    return block, root, (2 * args.n_layers + 1) * d


def _rank_files(directory: Path) -> list[dict]:
    """Every rank's saved state (memory-mapped), with its rank and unit offsets."""
    out = []
    for path in sorted(directory.glob("rank*.pt")):
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        saved["rank"] = int(path.stem.removeprefix("rank"))
        units = _relayout(saved)
        saved["offsets"] = [sum(u.shard for u in units[:k]) for k in range(len(units))]
        out.append(saved)
    return out


def _relayout(saved: dict) -> list[FlatLayout]:
    return [FlatLayout(u, tuple(map(tuple, n)), tuple(map(tuple, s)), saved["world_size"]) for u, n, s in saved["layouts"]]
