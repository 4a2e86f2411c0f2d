"""Measure what this device can do, once, and remember it.

MFU is only honest against a peak measured on the machine itself: a CPU's nominal AVX-512 peak
is never reached by PyTorch matmuls, and a GPU's spec sheet peak is not reached either. We time
large square matmuls per dtype and cache the result keyed by device, threads and torch version.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


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


def _cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "shoestring" / "probe.json"


def _time_matmul(device: torch.device, dtype: torch.dtype, n: int, min_seconds: float) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and reps >= 3:
            return 2 * n**3 * reps / elapsed


def matmul_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s for `dtype` on `device` (cached on disk)."""
    key = f"{device_name(device)}|{device.type}|{_DTYPE_NAMES[dtype]}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    path = _cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        n = 8192 if device.type == "cuda" else 1024
        cache[key] = _time_matmul(device, dtype, n, min_seconds=0.5 if device.type == "cuda" else 0.3)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home still gets a (re-measured) answer
    return cache[key]
