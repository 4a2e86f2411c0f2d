"""Measure what a training step communicates: every collective the process group runs, with
its exact payload, whoever issued it (DDP's C++ reducer, FSDP2, DeepSpeed or our own engine).

The profiler records each collective the backend executes (`gloo:all_reduce`,
`nccl:all_gather`, ...) with the shapes and dtypes of its tensors, on the backend's own threads.
From the payload, the bytes one rank *sends* follow from the algorithm's traffic (ring):
all-reduce 2(N-1)/N of the buffer, all-gather (N-1) times its input chunk, reduce-scatter and
all-to-all (N-1)/N of the input, broadcast the buffer, a point-to-point send its tensor (a
receive nothing). Gloo has no native reduce-scatter: torch runs an all-reduce of the full input
there, which this meter sees (and counts) as such.

With sub-groups (hybrid sharding) the backend's events do not say which process group ran
them, and a ring's bytes depend on its size: given `groups` (the ranks of each sub-group and
the span it stands for, `Strategy.comm_groups`), a dispatch mode records the process group of
every collective issued through torch's c10d ops, and each backend event is matched, in order,
to the issued collective of the same input size. Events with no match span the world: DDP's
C++ reducer calls the backend directly, and DTensor issues its own collectives (a gradient
norm's scalars) from inside its dispatch, where the mode does not see them. The mode runs only
on the measured step of a strategy that has sub-groups. `by_span` then splits the bytes sent by span (group,
across, world), the same spans the strategies' cost models list.

`busy_s` is the time collectives were running on the backend's threads (overlapping calls
counted once): communication time, whether or not compute hid it. A point-to-point receive runs
from when it is posted, so one posted ahead (a prefetch) counts its wait for the peer's send.
"""

from __future__ import annotations

import os
from collections import defaultdict, deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
import torch.distributed as tdist
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from shoestring.parallel.cost import sent_fraction

_BACKENDS = ("gloo:", "nccl:", "mpi:", "ucc:")
_ITEMSIZE = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4,
             "signed char": 1, "unsigned char": 1, "bool": 1, "c10::Float8_e4m3fn": 1, "c10::Float8_e5m2": 1}


@dataclass
class CommStats:
    bytes_sent: float = 0.0
    calls: int = 0
    busy_s: float = 0.0
    by_collective: dict[str, float] = field(default_factory=dict)
    by_span: dict[str, float] = field(default_factory=dict)  # bytes sent within a group, across groups, world


class _IssuedOn(TorchDispatchMode):
    """Records, for every c10d collective issued, the ranks of its process group, queued by the
    element count of the input the backend's event will show (an all-gather's or a
    reduce-scatter's second tensor, otherwise the first)."""

    def __init__(self) -> None:
        super().__init__()
        self.queues: dict[int, deque[tuple[int, ...]]] = defaultdict(deque)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func.namespace in ("c10d", "_c10d_functional"):  # torch.distributed's ops, DTensor's functional ones
            tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, torch.Tensor)]
            group = _process_group(args)
            second = "_base_" in func.__name__ or "allgather" in func.__name__ or "reduce_scatter" in func.__name__
            if tensors and group is not None:
                numel = tensors[1 if second and len(tensors) > 1 else 0].numel()
                self.queues[numel].append(tuple(tdist.get_process_group_ranks(group)))
        return func(*args, **(kwargs or {}))


def _process_group(args: tuple) -> tdist.ProcessGroup | None:
    """The process group among a c10d op's arguments: boxed (torch.distributed's ops) or by name
    (functional collectives)."""
    for a in args:
        if isinstance(a, torch.ScriptObject):
            return tdist.ProcessGroup.unbox(a)
    names = [a for a in args if isinstance(a, str)]  # the group's name comes last
    return _resolve_process_group(names[-1]) if names else None


class CommMeter:
    """`with CommMeter(world) as meter: step()` then `meter.stats`. Disabled (no profiler, no
    cost) when `enabled` is false or the world has one rank. `groups`: the ranks of each
    sub-group a strategy communicates in, and the span it stands for ("group", "across")."""

    def __init__(self, world: int, enabled: bool = True, groups: dict[tuple[int, ...], str] | None = None):
        self.world = world
        self.enabled = enabled and world > 1
        self.groups = groups or {}
        self.stats = CommStats()
        self._prof: profile | None = None
        self._issued: _IssuedOn | None = None

    def __enter__(self) -> "CommMeter":
        if self.enabled:
            # Kineto otherwise prints a start/stop line per profiled step into the run's output.
            os.environ.setdefault("KINETO_LOG_LEVEL", "6")
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._prof = profile(activities=activities, record_shapes=True)
            self._prof.__enter__()
            if self.groups:
                self._issued = _IssuedOn()
                self._issued.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if self._prof is None:
            return
        if self._issued is not None:
            self._issued.__exit__(kind, err, tb)
        self._prof.__exit__(kind, err, tb)
        queues = self._issued.queues if self._issued is not None else {}
        events = [e for e in self._prof.profiler.kineto_results.events() if e.name().startswith(_BACKENDS) and e.shapes()]
        intervals = []
        for event in sorted(events, key=lambda e: e.start_ns()):
            name = event.name()
            numel = 1
            for d in event.shapes()[0]:
                numel *= d
            ranks = queues[numel].popleft() if queues.get(numel) else None
            span = self.groups.get(ranks, "world") if ranks else "world"
            size = len(ranks) if ranks else self.world
            sent = numel * _ITEMSIZE.get(event.dtypes()[0], 4) * sent_fraction(name, size)
            self.stats.bytes_sent += sent
            self.stats.calls += 1
            self.stats.by_collective[name] = self.stats.by_collective.get(name, 0.0) + sent
            self.stats.by_span[span] = self.stats.by_span.get(span, 0.0) + sent
            intervals.append((event.start_ns(), event.start_ns() + event.duration_ns()))
        self.stats.busy_s = _union_ns(intervals) / 1e9


def _union_ns(intervals: list[tuple[int, int]]) -> int:
    total, end = 0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total
