"""Measure what a training step communicates: every collective the process group runs, with
its exact payload, whoever issued it (DDP's C++ reducer, FSDP2, DeepSpeed or our own engine).

The profiler records each collective the backend executes (`gloo:all_reduce`,
`nccl:all_gather`, ...) with the shapes and dtypes of its tensors, on the backend's own threads.
From the payload, the bytes one rank *sends* follow from the algorithm's traffic (ring):
all-reduce 2(N-1)/N of the buffer, all-gather (N-1) times its input chunk, reduce-scatter and
all-to-all (N-1)/N of the input, broadcast the buffer, a point-to-point send its tensor (a
receive nothing). Gloo has no native reduce-scatter: torch runs an all-reduce of the full input
there, which this meter sees (and counts) as such.

Point-to-point sends are also counted by their tag (`by_tag`), read from the `c10d::send` call
that issued each one: an engine that tags its transfers by link (yafsdp: within a shard group or
across groups) gets its bytes per link measured, which the payload alone cannot tell.

`busy_s` is the time collectives were running on the backend's threads (overlapping calls
counted once): communication time, whether or not compute hid it. A point-to-point receive runs
from when it is posted, so one posted ahead (a prefetch) counts its wait for the peer's send.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import TracebackType

import torch
from torch.profiler import ProfilerActivity, profile

_BACKENDS = ("gloo:", "nccl:", "mpi:", "ucc:")
_ITEMSIZE = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4,
             "signed char": 1, "unsigned char": 1, "bool": 1, "c10::Float8_e4m3fn": 1, "c10::Float8_e5m2": 1}


def sent_fraction(collective: str, world: int) -> float:
    """Bytes one rank sends per byte of the collective's input tensor (ring algorithms)."""
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


@dataclass
class CommStats:
    bytes_sent: float = 0.0
    calls: int = 0
    busy_s: float = 0.0
    by_collective: dict[str, float] = field(default_factory=dict)
    by_tag: dict[int, float] = field(default_factory=dict)  # point-to-point sends


class CommMeter:
    """`with CommMeter(world) as meter: step()` then `meter.stats`. Disabled (no profiler, no
    cost) when `enabled` is false or the world has one rank."""

    def __init__(self, world: int, enabled: bool = True):
        self.world = world
        self.enabled = enabled and world > 1
        self.stats = CommStats()
        self._prof: profile | None = None

    def __enter__(self) -> "CommMeter":
        if self.enabled:
            # Kineto otherwise prints a start/stop line per profiled step into the run's output.
            os.environ.setdefault("KINETO_LOG_LEVEL", "6")
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._prof = profile(activities=activities, record_shapes=True)
            self._prof.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if self._prof is None:
            return
        self._prof.__exit__(kind, err, tb)
        intervals = []
        events = self._prof.profiler.kineto_results.events()
        issued: dict[int, list[tuple[int, int, int]]] = {}  # thread -> (start, end, tag) of its c10d::send calls
        for event in events:
            if event.name() == "c10d::send":
                issued.setdefault(event.start_thread_id(), []).append((event.start_ns(), event.end_ns(),
                                                                       event.concrete_inputs()[3]))
        for event in events:
            name = event.name()
            if not name.startswith(_BACKENDS) or not event.shapes():
                continue
            numel = 1
            for d in event.shapes()[0]:
                numel *= d
            sent = numel * _ITEMSIZE.get(event.dtypes()[0], 4) * sent_fraction(name, self.world)
            self.stats.bytes_sent += sent
            self.stats.calls += 1
            self.stats.by_collective[name] = self.stats.by_collective.get(name, 0.0) + sent
            if name.endswith(":send"):
                tag = next((t for a, b, t in issued.get(event.start_thread_id(), []) if a <= event.start_ns() <= b), -1)
                self.stats.by_tag[tag] = self.stats.by_tag.get(tag, 0.0) + sent
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
