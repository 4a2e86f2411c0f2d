"""Measure what this machine can do, once, and remember it.

MFU is only honest against a peak measured on the machine itself: a CPU's nominal AVX-512 peak
is never reached by PyTorch matmuls, and a GPU's spec sheet peak is not reached either. We time
large square matmuls per dtype, and an all-reduce between local ranks, and cache the results
keyed by device, threads and torch version.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path
from typing import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


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
    _cache_path().unlink(missing_ok=True)


def _cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "shoestring" / "probe.json"


def _cached(key: str, measure: Callable[[], float]) -> float:
    path = _cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = measure()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home still gets a (re-measured) answer
    return cache[key]


def _time_matmul(device: torch.device, dtype: torch.dtype, n: int, min_seconds: float) -> float:
    """The best single-matmul rate over `min_seconds`: a peak, so other processes sharing the
    cores for part of the time do not lower it (the slices they leave us run at full speed)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, threads: int | None = None) -> float:
    """Measured dense matmul FLOP/s for `dtype` on `device` (cached on disk). `threads`: CPU
    threads to measure with (default: torch's current setting)."""
    threads = threads or torch.get_num_threads()
    key = f"{device_name(device)}|{device.type}|{_DTYPE_NAMES[dtype]}|threads={threads}|torch={torch.__version__}"

    def measure() -> float:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            n = 8192 if device.type == "cuda" else 512  # fits in cache: its rate is the cores', not the memory's
            return _time_matmul(device, dtype, n, min_seconds=0.5 if device.type == "cuda" else 0.3)
        finally:
            torch.set_num_threads(before)

    return _cached(key, measure)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _allreduce_worker(rank: int, world: int, port: int, nbytes: int, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    t = torch.ones(nbytes // 4)
    for _ in range(2):
        dist.all_reduce(t)
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < 0.5:
        dist.all_reduce(t)
        reps += 1
    elapsed = time.perf_counter() - start
    dist.destroy_process_group()
    if rank == 0:
        queue.put(nbytes * reps / elapsed)


def allreduce_bandwidth(ranks: int, nbytes: int = 32 * 2**20) -> float:
    """Measured all-reduce *algorithm* bandwidth between `ranks` local CPU processes on gloo,
    bytes/s: tensor bytes reduced per second. (The planner converts its ring volume,
    2 (N-1)/N x bytes, with the same convention: see throughput.py.) Cached like the matmul peak."""
    import torch.multiprocessing as mp

    key = f"{device_name(torch.device('cpu'))}|gloo-allreduce|ranks={ranks}|bytes={nbytes}|torch={torch.__version__}"

    def measure() -> float:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_allreduce_worker, args=(r, ranks, port, nbytes, queue)) for r in range(ranks)]
        for p in procs:
            p.start()
        result = queue.get(timeout=120)
        for p in procs:
            p.join(timeout=60)
        return result

    return _cached(key, measure)
