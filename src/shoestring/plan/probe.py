"""Measure what this machine can do, once, and remember it.

MFU is only honest against a peak measured on the machine itself: a CPU's nominal AVX-512 peak
is never reached by PyTorch matmuls, and a GPU's spec sheet peak is not reached either. This
module is the one yardstick: the trainer's MFU, the benchmark sections' and the planner's local
device all divide by `matmul_peak_flops` for the same device, dtype and thread count.

A peak is the best rate of square matmuls per dtype, grown in size until the rate stops rising
(a 512^2 matmul does not keep two threads of an AMX CPU busy; 2048^2 does), all dtypes timed
interleaved so that another process taking the cores slows each alike. A first probe stays
within a few seconds where a dtype is ~100x slow (bf16 without AVX-512 BF16, fp16 on any CPU):
after the first, small size a dtype clearly slower than fp32 is not timed further and is
recorded as measured-slow at the rate seen, and no size is timed whose one matmul would take
longer than `MAX_MATMUL_S`. Results are cached on disk per device, dtype, threads, instruction
set (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA change which kernels run) and torch version;
the all-reduce bandwidth between local ranks likewise.

Threads: a run's peak is measured on the threads it computes with, not one thread's peak times
their number (two vCPUs that are one core's hyperthreads share its vector units; on this
project's AMD EPYC two threads measured 2.0x one, 207 vs 104 GFLOP/s fp32). Other work on the
cores ruins a many-thread measurement (at load 10 on 2 cores, 2-thread probes came out at
0.5-8 GFLOP/s, and bf16/fp32 ratios near 1 that flipped the precision rule, while one-thread
ones held within 15%): the one-thread peak is the floor that exposes it (`_peaks_at`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from shoestring.cache import cache_dir, read_json, write_atomic
from shoestring.dist import free_port
from shoestring.levers.precision import DTYPE_NAMES, DeviceFacts

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZES = {"cpu": (256, 512, 1024, 2048), "cuda": (1024, 2048, 4096, 8192)}  # square sizes timed, in order
WINDOW_S = {"cpu": 0.1, "cuda": 0.05}  # timing per size (every dtype, interleaved; at least 3 rounds)
MAX_MATMUL_S = 0.25  # a size whose one matmul would take longer than this is not timed
CLEARLY_SLOWER = 4.0  # at the first size: a dtype this many times slower than fp32 stops there
RECHECKS = 2  # ... once it has looked that slow this many more times (a contended window is not a slow CPU)
SATURATED = 1.05  # a size gaining less than this factor over the previous one ends that dtype's growth


@dataclass(frozen=True)
class Peak:
    flops: float  # best dense matmul FLOP/s seen
    size: int  # the square size it was reached at
    slow: bool = False  # measured-slow: clearly slower than fp32 at the first size, not timed further


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def instruction_set(device: torch.device) -> str:
    """What picks the matmul kernels: a CUDA device's compute capability; on a CPU, ATen's
    capability (ATEN_CPU_CAPABILITY can lower it) and oneDNN's ISA limit when one is set."""
    if device.type == "cuda":
        return "sm_{}{}".format(*torch.cuda.get_device_capability(device))
    cap = torch.backends.cpu.get_cpu_capability()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{cap}+onednn={onednn}" if onednn else cap


def host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


# The instruction sets that decide how fast a CPU runs each dtype's matmuls: without AVX-512-BF16
# (or AMX) a bf16 matmul takes a slow path, ~100x slower than fp32 on an AVX2-only EPYC.
# /proc/cpuinfo flag -> the name we print.
ISA_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512F", "avx512_bf16": "AVX-512-BF16", "amx_bf16": "AMX-BF16",
             "amx_tile": "AMX-TILE"}


def cpu_isa(flags: str | None = None) -> list[str]:
    """The instruction sets of `ISA_FLAGS` this CPU has, from the `flags` line of /proc/cpuinfo
    (or the `flags` given); empty where that file does not say (not Linux)."""
    if flags is None:
        try:
            flags = next((line.split(":", 1)[1] for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("flags")), "")
        except OSError:
            flags = ""
    have = set(flags.split())
    return [name for flag, name in ISA_FLAGS.items() if flag in have]


def cpu_cores() -> int:
    """Cores this process may run on (a container's or taskset's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def forget() -> None:
    """Drop the cached measurements: the next probe measures again (the accuracy benchmark
    does this, so that the peak it calibrates against is the machine's state now)."""
    cache_path().unlink(missing_ok=True)


def cache_path() -> Path:
    return cache_dir() / "probe.json"


def _read_cache() -> dict[str, Any]:
    return read_json(cache_path()) or {}


def _write_cache(entries: dict[str, Any]) -> None:
    write_atomic(cache_path(), json.dumps({**_read_cache(), **entries}, indent=1))  # read-only home: re-measured


def _cached(key: str, measure: Callable[[], float]) -> float:
    cache = _read_cache()
    if key not in cache:
        cache[key] = measure()
        _write_cache({key: cache[key]})
    return cache[key]


def _time_size(device: torch.device, n: int, dtypes: list[str]) -> dict[str, float]:
    """Best rate of one n^3 matmul per dtype, the dtypes taking turns for the window: a peak,
    so other processes sharing the cores part of the time do not lower it."""
    ops = {}
    for d in dtypes:
        a = torch.randn(n, n, device=device).to(DTYPES[d])
        try:
            a @ a  # a dtype the device cannot multiply in at all (bf16 on old GPUs) rates 0
        except RuntimeError:
            continue
        ops[d] = (a, a.T.contiguous())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = dict.fromkeys(dtypes, float("inf"))
    rounds, start = 0, time.perf_counter()
    while rounds < 3 or time.perf_counter() - start < WINDOW_S.get(device.type, 0.1):
        for d, (a, b) in ops.items():
            t0 = time.perf_counter()
            a @ b
            sync()
            best[d] = min(best[d], time.perf_counter() - t0)
        rounds += 1
    return {d: 2 * n**3 / t for d, t in best.items()}  # inf time: rate 0


def _looks_slow(rates: dict[str, float]) -> list[str]:
    return [d for d in rates if d != "fp32" and rates[d] * CLEARLY_SLOWER < rates["fp32"]]


def _recheck_slow(device: torch.device, n: int, rates: dict[str, float]) -> dict[str, float]:
    """`rates` at the first size, with each dtype that looks clearly slower than fp32 timed again
    beside fp32 (up to RECHECKS more windows, the best rate kept): slow kernels are slow every
    time, while one window in which other work held the cores can make any dtype look slow, and
    a cached "slow" would turn `auto` precision to fp32 for every later run."""
    for _ in range(RECHECKS):
        again = _looks_slow(rates)
        if not again:
            break
        more = _time_size(device, n, ["fp32", *again])
        rates = {d: max(r, more.get(d, 0.0)) for d, r in rates.items()}
    return rates


def _measure_peaks(device: torch.device) -> dict[str, Peak]:
    """Every dtype's peak: sizes grow while a dtype's rate still rises (module docstring)."""
    best: dict[str, Peak] = {}
    growing = list(DTYPES)
    for i, n in enumerate(SIZES.get(device.type, SIZES["cpu"])):
        timed = [d for d in growing if d not in best or 2 * n**3 / best[d].flops <= MAX_MATMUL_S]
        if not timed:
            break
        rates = _time_size(device, n, timed)
        if i == 0:
            rates = _recheck_slow(device, n, rates)
        slow = _looks_slow(rates) if i == 0 else []  # at the first size only (CLEARLY_SLOWER)
        growing = []
        for d in timed:
            before = best.get(d)
            if before is None or rates[d] > before.flops:
                best[d] = Peak(rates[d], n)
            if d in slow:
                best[d] = Peak(rates[d], n, slow=True)
            elif before is None or rates[d] >= SATURATED * before.flops:
                growing.append(d)
    return best


def _peaks_at(device: torch.device, threads: int, floor: dict[str, Peak] | None = None) -> dict[str, Peak]:
    """The peaks measured on `threads` threads (cached). `floor`: the one-thread peaks, which
    more threads never fall below on an idle machine; a measurement whose fp32 does was taken
    while other work held the cores (a parallel matmul then waits for a descheduled thread at
    every barrier, and comes out 10-100x slow): the floor stands in for it, and it is not cached."""
    keys = {d: f"{device_name(device)}|{device.type}|{d}|threads={threads}|isa={instruction_set(device)}|"
               f"torch={torch.__version__}" for d in DTYPES}
    cache = _read_cache()
    if all(isinstance(cache.get(k), dict) for k in keys.values()):
        return {d: Peak(**cache[k]) for d, k in keys.items()}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        measured = _measure_peaks(device)
    finally:
        torch.set_num_threads(before)
    if floor is None:
        _write_cache({keys[d]: asdict(p) for d, p in measured.items()})
        return measured
    if measured["fp32"].flops >= floor["fp32"].flops:
        _write_cache({keys[d]: asdict(p) for d, p in measured.items()})
    return {d: max(measured[d], floor[d], key=lambda p: p.flops) for d in DTYPES}


def matmul_peaks(device: torch.device, threads: int | None = None) -> dict[str, Peak]:
    """Measured dense matmul peak per dtype on `device` (cached on disk). `threads`: CPU threads
    to measure with (default: torch's current setting, which is what a run uses); on several,
    the one-thread peaks are measured too, as the floor that tells a contended measurement."""
    threads = threads or torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        return _peaks_at(device, 1)
    return _peaks_at(device, threads, floor=_peaks_at(device, 1))


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, threads: int | None = None) -> float:
    """The yardstick every MFU divides by: `dtype`'s measured matmul peak (FLOP/s)."""
    return matmul_peaks(device, threads)[DTYPE_NAMES[dtype]].flops


def device_facts(device: torch.device, threads: int | None = None) -> DeviceFacts:
    """What the `auto` settings decide on: the measured peaks, and a CUDA device's capability."""
    peaks = matmul_peaks(device, threads)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return DeviceFacts(device.type, {d: p.flops for d, p in peaks.items()}, capability)


def mfu(flops_per_s: float, peak: float) -> float | None:
    """Model FLOPs utilisation against the measured peak; None where it comes out above 1, which
    no step can reach: the peak was measured wrong (e.g. probed while other work held the
    cores), and the figure is an error to report, not a result (`mfu_error`)."""
    if not peak:
        return None
    value = flops_per_s / peak
    return value if value <= 1.0 else None


def mfu_error(flops_per_s: float, peak: float) -> str | None:
    """The one-line report of an impossible MFU (see `mfu`), or None when it is a figure."""
    if not peak or flops_per_s <= peak:
        return None
    return (f"MFU would be {flops_per_s / peak:.2f}: the measured matmul peak ({peak / 1e9:,.1f} GFLOP/s) is wrong; "
            f"delete {cache_path()} to measure it again")


def _allreduce_worker(rank: int, world: int, port: int, nbytes: int, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    t = torch.ones(nbytes // 4)
    dist.all_reduce(t)
    start = time.perf_counter()
    dist.all_reduce(t)
    # Every rank must call all_reduce as often as the others (a rank that stops early closes its
    # connection under one still reducing): the count for ~0.5 s is agreed, the largest rank's.
    reps = torch.tensor([max(3, math.ceil(0.5 / max(time.perf_counter() - start, 1e-6)))])
    dist.all_reduce(reps, op=dist.ReduceOp.MAX)
    start = time.perf_counter()
    for _ in range(int(reps)):
        dist.all_reduce(t)
    elapsed = time.perf_counter() - start
    dist.destroy_process_group()
    if rank == 0:
        queue.put(nbytes * int(reps) / elapsed)


def allreduce_bandwidth(ranks: int, nbytes: int = 32 * 2**20) -> float:
    """Measured all-reduce *algorithm* bandwidth between `ranks` local CPU processes on gloo,
    bytes/s: tensor bytes reduced per second. (The planner converts its ring volume,
    2 (N-1)/N x bytes, with the same convention: see throughput.py.) Cached like the matmul peak."""
    import torch.multiprocessing as mp

    key = f"{device_name(torch.device('cpu'))}|gloo-allreduce|ranks={ranks}|bytes={nbytes}|torch={torch.__version__}"

    def measure() -> float:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=_allreduce_worker, args=(r, ranks, port, nbytes, queue)) for r in range(ranks)]
        for p in procs:
            p.start()
        result = queue.get(timeout=120)
        for p in procs:
            p.join(timeout=60)
        return result

    return _cached(key, measure)
