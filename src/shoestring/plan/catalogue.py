"""The hardware catalogue (`hardware.toml`): memory, speed and price of training devices.

`Device` is one entry, typed; `parse_hardware("h100-80gb:8")` turns a command-line spec into a
device and a count; `local_hardware()` describes this machine, probed on the spot (measured
matmul peak per dtype, measured all-reduce bandwidth between local ranks) instead of read from
the file. The `[calibration.*]` tables hold per device-class corrections measured by
`benchmarks/planner_accuracy.py`; `[interruptions]` what a restart takes (plan/interruptions.py).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch

from shoestring.errors import UserError
from shoestring.levers.precision import DeviceFacts
from shoestring.plan.interruptions import Interruptions

CATALOGUE_PATH = Path(__file__).with_name("hardware.toml")
GB = 1e9
NOT_DEVICES = ("calibration", "interruptions")  # the file's other tables


@cache
def catalogue() -> dict[str, dict[str, Any]]:
    """Device entries by key."""
    raw = tomllib.loads(CATALOGUE_PATH.read_text())
    return {k: v for k, v in raw.items() if k not in NOT_DEVICES}


def interruptions_at(per_node_day: float, write_gbs: float | None = None, read_gbs: float | None = None,
                     setup_min: float | None = None) -> Interruptions:
    """An interruption rate with what a restart takes: the figures given, else `[interruptions]`'s."""
    given = {"checkpoint_write_gbs": write_gbs, "checkpoint_read_gbs": read_gbs, "restart_setup_min": setup_min}
    f = {**tomllib.loads(CATALOGUE_PATH.read_text())["interruptions"], **{k: v for k, v in given.items() if v is not None}}
    return Interruptions(per_node_day, f["checkpoint_write_gbs"], f["checkpoint_read_gbs"], f["restart_setup_min"] * 60)


_IN_USE: dict[str, dict[str, Any]] = {}  # device class -> a calibration that `calibrated` put in force


@cache
def calibration(device_class: str) -> dict[str, Any]:
    """Measured/published corrections for 'cpu' or 'gpu': the one `calibrated` holds in force,
    else this machine's own (`shoestring calibrate` writes it, for the CPU it ran on), else the
    shipped table of hardware.toml."""
    if device_class in _IN_USE:
        return _IN_USE[device_class]
    if device_class == "cpu" and (local := local_cpu_calibration()) is not None:
        return local
    return tomllib.loads(CATALOGUE_PATH.read_text()).get("calibration", {}).get(device_class, {})


@contextmanager
def calibrated(device_class: str, table: dict[str, Any]) -> Iterator[None]:
    """Plans made inside the block use `table` as the device class's calibration (the accuracy
    check predicts its check set with a fit before anything is written)."""
    _IN_USE[device_class] = table
    calibration.cache_clear()
    try:
        yield
    finally:
        del _IN_USE[device_class]
        calibration.cache_clear()


def machine_key() -> str:
    """What a CPU calibration holds for: the CPU model, the kernels torch picks on it (the
    instruction set, which ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA can lower) and torch's version."""
    from shoestring.plan import probe

    cpu = torch.device("cpu")
    return f"{probe.device_name(cpu)} | {probe.instruction_set(cpu)} | torch {torch.__version__}"


def local_calibration_path() -> Path:
    from shoestring.plan import probe

    return probe.cache_path().with_name("calibration-cpu.toml")


def local_cpu_calibration() -> dict[str, Any] | None:
    """This machine's `[calibration.cpu]`, if `shoestring calibrate` wrote one for it (a file
    written on another CPU, kernel set or torch is ignored; SHOESTRING_LOCAL_CALIBRATION=off
    ignores it too: the tests plan with the shipped tables on every machine)."""
    if os.environ.get("SHOESTRING_LOCAL_CALIBRATION") == "off":
        return None
    try:
        raw = tomllib.loads(local_calibration_path().read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    table = raw.get("calibration", {}).get("cpu")
    return table if table and raw.get("machine") == machine_key() else None


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    memory_bytes: int
    tflops: dict[str, float]  # dense peak per dtype ("fp32", "bf16", "fp16", "fp8")
    mem_bw_gbs: float
    intra_gbs: float
    inter_gbs: float
    host_gbs: float
    per_node: int
    price: float
    spot_price: float
    mfu: float
    overhead_bytes: int
    fragmentation: float
    kind: str = "cuda"  # "cuda" or "cpu": which device class's calibration applies
    capability: tuple[int, int] | None = None  # CUDA compute capability
    compile_overhead_bytes: int = 0  # what compiled blocks' runtime adds to `overhead_bytes` (calibrated)
    compile_fragmentation: float | None = None  # `fragmentation` with compiled blocks (None: the same; CPU: calibrated)
    # CPU: the share of the machine's cores one process computes on (a rank of several: less),
    # which decides whether the calibrated `rank_mfu_gain` applies (plan/throughput.py)
    cores_share: float = 1.0
    # alpha of the alpha-beta model, microseconds: per collective call, per ring step on a link
    # inside a node and per ring step across nodes (0 on the CPU: gloo's per-call cost is calibrated)
    call_latency_us: float = 0.0
    intra_latency_us: float = 0.0
    inter_latency_us: float = 0.0
    sources: dict[str, str] = field(default_factory=dict)

    def peak_flops(self, dtype: str) -> float:
        return self.tflops.get(dtype, 0.0) * 1e12

    def supports(self, dtype: str) -> bool:
        return self.peak_flops(dtype) > 0

    def facts(self) -> DeviceFacts:
        """What the levers' `auto` rules decide on, for this entry (measured, for `local`)."""
        return DeviceFacts(self.kind, {d: self.peak_flops(d) for d in ("fp32", "bf16", "fp16")}, self.capability)

    def link_gbs(self, count: int) -> float:
        """Per-device collective bandwidth for a ring of `count` consecutive devices: the slowest link."""
        return self.intra_gbs if count <= self.per_node else self.inter_gbs

    def hourly(self, spot: bool) -> float:
        return self.spot_price if spot and self.spot_price > 0 else self.price


def _device(key: str, e: dict[str, Any]) -> Device:
    return Device(
        key=key, name=e["name"], memory_bytes=int(e["memory_gb"] * GB),
        tflops={k: float(v) for k, v in e["tflops"].items()}, mem_bw_gbs=e["mem_bw_gbs"],
        intra_gbs=e["intra_gbs"], inter_gbs=e["inter_gbs"], host_gbs=e["host_gbs"], per_node=e["per_node"],
        price=e["price_per_hour"], spot_price=e.get("spot_price_per_hour", 0.0), mfu=e["mfu"],
        overhead_bytes=int(e["overhead_gb"] * GB), fragmentation=e.get("fragmentation", 0.0),
        kind="cpu" if key == "cpu" else "cuda", call_latency_us=e.get("call_latency_us", 0.0),
        intra_latency_us=e.get("intra_latency_us", 0.0), inter_latency_us=e.get("inter_latency_us", 0.0),
        capability=tuple(int(p) for p in e["compute_capability"].split(".")) if "compute_capability" in e else None,
        sources={k: v for k, v in e.items() if k.endswith("_source") or k == "date"},
    )


@cache
def devices() -> dict[str, Device]:
    return {k: _device(k, e) for k, e in catalogue().items()}


def get_device(key: str) -> Device:
    if key == "local":
        return local_hardware()[0]
    found = devices().get(key.lower())
    if found is None:
        raise UserError(f"unknown device {key!r}", f"use one of {', '.join(devices())}, or local (or add it to {CATALOGUE_PATH})")
    return found


def parse_hardware(spec: str) -> tuple[Device, int]:
    """'h100-80gb:8' -> (device, 8); a bare key means one device; 'local' is this machine."""
    key, _, count = spec.partition(":")
    if key == "local" and not count:
        return local_hardware()
    try:
        n = int(count) if count else 1
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"bad hardware {spec!r}: the count must be a whole number >= 1", "write DEVICE:COUNT, e.g. h100-80gb:8")
    return get_device(key), n


def local_hardware(ranks: int | None = None) -> tuple[Device, int]:
    """This machine: CUDA devices (their catalogue entry, memory from the driver) or the CPU
    split into `ranks` processes, with the measured matmul peak and all-reduce bandwidth."""
    from shoestring.plan import probe

    if torch.cuda.is_available():
        dev = torch.device("cuda", 0)
        entry = devices().get(catalogue_key(dev)) or devices()["h100-80gb"]
        total = torch.cuda.get_device_properties(dev).total_memory
        measured = {d: p.flops / 1e12 for d, p in probe.matmul_peaks(dev).items()}
        count = ranks or torch.cuda.device_count()
        return replace(entry, key="local", memory_bytes=total, tflops={**entry.tflops, **measured},
                       capability=torch.cuda.get_device_capability(dev)), count
    count = ranks or 1
    return cpu_device(probe_cpu(count)), count


def probe_cpu(ranks: int, threads: int | None = None) -> dict[str, Any]:
    """What the CPU split into `ranks` processes measures: each rank gets `threads` threads
    (default cores/ranks), and its peak is the probe's on that many threads (the yardstick the
    trainer's MFU uses for a rank running them; probe.py says why not one thread's times their
    number); the gloo all-reduce bandwidth between the ranks; host memory per rank."""
    from shoestring.plan import probe

    cores = probe.cpu_cores()
    threads = threads or max(1, cores // ranks)
    peaks = probe.matmul_peaks(torch.device("cpu"), threads)
    return {"name": f"{probe.device_name(torch.device('cpu'))} ({threads} of {cores} core(s) per rank)",
            "tflops": {d: peaks[d].flops / 1e12 for d in ("fp32", "bf16")},
            "link_gbs": probe.allreduce_bandwidth(ranks) / GB if ranks > 1 else devices()["cpu"].intra_gbs,
            "memory_bytes": probe.host_memory_bytes() // ranks, "ranks": ranks, "threads": threads, "cores": cores}


def cpu_device(probed: dict[str, Any]) -> Device:
    """The local CPU as a device, from what `probe_cpu` measured (now, or saved with a benchmark
    row) and the current calibration's non-tensor memory."""
    link, ranks = probed["link_gbs"], max(probed["ranks"], 1)
    share = probed["threads"] / probed["cores"] if "threads" in probed else 1 / ranks  # rows saved before threads were
    return replace(budget_device(torch.device("cpu"), probed["memory_bytes"]), key="local", name=probed["name"],
                   tflops={**probed["tflops"], "fp16": 0.0, "fp8": 0.0}, intra_gbs=link, inter_gbs=link,
                   per_node=ranks, cores_share=share)


def with_compiled(cal: dict, compiled: bool) -> dict:
    """A calibration; for compiled blocks, its `compiled` table over it (a table in both, such
    as `mfu`, merged key by key: what compiled runs did not measure stays)."""
    if not compiled:
        return cal
    over = cal.get("compiled", {})
    return {**cal, **{k: {**cal[k], **v} if isinstance(v, dict) and isinstance(cal.get(k), dict) else v
                      for k, v in over.items()}}


def budget_device(device: torch.device, memory_bytes: int) -> Device:
    """This device's catalogue class with `memory_bytes` to spend (a run's memory budget): what
    a memory estimate needs, without probing anything (the CPU's non-tensor memory calibrated)."""
    key = catalogue_key(device)
    entry = devices()[key] if key in devices() else devices()["h100-80gb"]
    if device.type != "cpu":
        return replace(entry, memory_bytes=memory_bytes)
    cal = calibration("cpu")
    return replace(entry, memory_bytes=memory_bytes, overhead_bytes=int(cal.get("rss_base_gb", 0.3) * GB),
                   fragmentation=cal.get("fragmentation", entry.fragmentation),
                   compile_fragmentation=with_compiled(cal, True).get("fragmentation", entry.fragmentation),
                   compile_overhead_bytes=int(cal.get("compiled", {}).get("rss_compile_gb", 0.0) * GB))


def catalogue_key(device: torch.device) -> str:
    """Best catalogue entry for a local device: the entry whose key prefix is in the device
    name and whose memory is closest to the device's."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower().replace(" ", "")
        total = torch.cuda.get_device_properties(device).total_memory
        hits = [k for k in catalogue() if k != "cpu" and k.split("-")[0] in name]
        if hits:
            return min(hits, key=lambda k: abs(catalogue()[k]["memory_gb"] * GB - total))
    return "cpu"


def default_price(device: torch.device) -> tuple[float, str]:
    """(USD per device-hour, where that figure comes from)."""
    key = catalogue_key(device)
    entry = catalogue()[key]
    return entry["price_per_hour"], f"catalogue price for {key}: {entry['price_source']}"
