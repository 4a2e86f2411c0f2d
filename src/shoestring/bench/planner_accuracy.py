"""The planner against measurement on this machine: predicted vs measured peak memory and
tokens/s, one fresh process group per configuration (precisions x checkpointing x single / ddp /
fsdp2 / yafsdp on 2 ranks, pre-training, full fine-tuning and LoRA).

`run(size, rounds)` measures and predicts; `table(rows)` formats the rows as Markdown;
`predict_rows(raw)` re-predicts saved measurements (iterate on the model without re-measuring);
`fit(raw)` derives the `[calibration.cpu]` constants of plan/hardware.toml from them.

Measured memory is the largest per-rank peak RSS (VmHWM); tokens/s is the median over rounds of
each round's median step (the slowest rank's). Ranks split the cores (one thread each on 2).
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

MiB = 2**20


@dataclass(frozen=True)
class Case:
    preset: str
    strategy: str  # single | ddp | fsdp2 | yafsdp (2 ranks unless single)
    precision: str
    checkpointing: str
    batch: int  # global batch, sequences
    seq_len: int
    mode: str = "pretrain"  # pretrain | full-finetune | lora
    lora_rank: int = 16
    lora_base_dtype: str = "fp32"
    steps: int = 3

    @property
    def world(self) -> int:
        return 1 if self.strategy == "single" else 2

    @property
    def label(self) -> str:
        lora = f" r{self.lora_rank} base {self.lora_base_dtype}" if self.mode == "lora" else ""
        return (f"{self.preset} {self.mode}{lora}, {self.strategy}, {self.precision}, ckpt {self.checkpointing}, "
                f"{self.batch}x{self.seq_len}")

    def config_tree(self) -> dict[str, Any]:
        """The trainer's config for this case: measured through the same build path."""
        tree: dict[str, Any] = {"model": {"preset": self.preset}, "data": {"seq_len": self.seq_len},
                                "precision": {"mode": self.precision}, "checkpointing": {"mode": self.checkpointing},
                                "parallel": {"strategy": self.strategy}}
        if self.mode == "lora":
            from shoestring.plan.model import LORA_TARGETS

            tree["lora"] = {"enabled": True, "rank": self.lora_rank, "targets": list(LORA_TARGETS),
                            "base_dtype": self.lora_base_dtype}
        return tree


_SMALL = [
    Case("small", "single", "fp32", "none", 8, 256),
    Case("small", "single", "bf16", "none", 8, 256),
    Case("small", "single", "bf16", "full", 8, 256),
    Case("small", "single", "bf16-pure", "none", 8, 256),
    Case("small", "single", "bf16-pure", "selective", 8, 256),
    Case("small", "ddp", "bf16", "none", 8, 256),
    Case("small", "ddp", "fp32", "full", 8, 256),
    Case("small", "fsdp2", "bf16", "none", 8, 256),
    Case("small", "fsdp2", "bf16-pure", "full", 8, 256),
    Case("small", "yafsdp", "fp32", "none", 8, 256),
    Case("small", "yafsdp", "bf16-pure", "full", 8, 256),
    Case("small", "single", "bf16", "selective", 8, 256, mode="full-finetune"),
    Case("small", "single", "bf16", "none", 8, 256, mode="lora"),
    Case("small", "single", "bf16", "full", 8, 256, mode="lora", lora_base_dtype="bf16"),
    Case("small", "ddp", "bf16", "none", 8, 256, mode="lora", lora_base_dtype="bf16"),
]
SIZES: dict[str, list[Case]] = {
    "smoke": [Case("micro", "single", "bf16", "none", 2, 64, steps=1),
              Case("micro", "single", "bf16", "none", 2, 64, mode="lora", steps=1)],
    "small": _SMALL,
    "full": [replace(c, preset="medium", batch=8, seq_len=512, steps=4) for c in _SMALL],
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, case: Case, queue) -> None:
    """One rank: build the strategy from the case's config (the trainer's path), time its steps."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    from shoestring.build import build_strategy
    from shoestring.config import build_config
    from shoestring.models import PRESETS
    from shoestring.parallel import dist
    from shoestring.plan.probe import cpu_cores
    from shoestring.train.memory import PeakRSS

    torch.set_num_threads(max(1, cpu_cores() // world))
    vocab = PRESETS[case.preset].vocab_size
    with dist.process_group(torch.device("cpu"), 300, required=world > 1):
        s = build_strategy(build_config(case.config_tree()), vocab, torch.device("cpu"))
        gen = torch.Generator().manual_seed(rank)
        x, y = (torch.randint(0, vocab, (case.batch // world, case.seq_len), generator=gen) for _ in range(2))
        times = []
        for i in range(case.steps + 1):  # the first step (allocations, lazy init) is not timed
            dist.barrier()
            t0 = time.perf_counter()
            s.forward_backward(x, y, 1.0, True)
            s.step(1e-3)
            dist.barrier()
            if i:
                times.append(time.perf_counter() - t0)
        queue.put({"peak_rss": PeakRSS().peak_bytes(), "step_s": statistics.median(times)})


def measure(case: Case) -> dict[str, float]:
    """One fresh process per rank: the peak RSS is this configuration's own."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _port()
    procs = [ctx.Process(target=_worker, args=(r, case.world, port, case, queue)) for r in range(case.world)]
    for p in procs:
        p.start()
    out = [queue.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    return {"peak_rss": max(o["peak_rss"] for o in out), "step_s": max(o["step_s"] for o in out)}


def predict(case: Case) -> dict[str, Any]:
    """The planner's plan for exactly this case's levers on `local:<ranks>`."""
    from shoestring.plan.search import Request, search

    local = case.batch // case.world
    fixed = (("precision", case.precision), ("checkpointing", case.checkpointing), ("strategy", case.strategy),
             ("micro_batch", local), ("grad_accum", 1), ("reshard_after_forward", True), ("offload", False))
    req = Request(case.preset, tokens=1e6, hardware=(f"local:{case.world}",), mode=case.mode, seq_len=case.seq_len,
                  global_batch_tokens=case.batch * case.seq_len, fixed=fixed, ranks=case.world,
                  lora_rank=case.lora_rank, lora_base_dtype=case.lora_base_dtype)
    result = search(req)
    p = (result.plans or result.misses)[0]
    s = p.step
    return {"memory": p.memory.total, "tokens_per_s": p.tokens_per_s, "components": p.memory.components,
            "step": {"compute": s.compute_s, "recompute": s.recompute_s, "comm": s.comm_s, "offload": s.offload_s}}


def _row(case: Case, runs: list[dict]) -> dict[str, Any]:
    pred = predict(case)
    mem = statistics.median(r["peak_rss"] for r in runs)
    tps = case.batch * case.seq_len / statistics.median(r["step_s"] for r in runs)
    return {"case": asdict(case), "config": case.label, "runs": runs,
            "memory_predicted": pred["memory"], "memory_measured": mem, "memory_error": pred["memory"] / mem - 1,
            "tokens_per_s_predicted": pred["tokens_per_s"], "tokens_per_s_measured": tps,
            "tokens_per_s_error": pred["tokens_per_s"] / tps - 1, "predicted": pred}


def run(size: str = "small", rounds: int = 3, progress: Callable[[str], None] = lambda s: None,
        only: str = "") -> list[dict]:
    """Measure every case of `size` ("smoke": seconds; "small": minutes on 2 cores; "full":
    a larger model) whose label contains `only`, `rounds` fresh-process rounds interleaved, and
    predict each."""
    from shoestring.plan import probe

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    from shoestring.plan.catalogue import local_hardware

    cases = [c for c in SIZES[size] if only in c.label]
    probe.forget()  # predict against the machine as it is now, not a stale cached peak
    for world in sorted({c.world for c in cases}):
        local_hardware(world)  # probe now, before the runs, in the same conditions
    runs: dict[Case, list[dict]] = {c: [] for c in cases}
    for r in range(rounds):
        for c in cases:
            progress(f"round {r + 1}/{rounds}: {c.label}")
            runs[c].append(measure(c))
    return [_row(c, rs) for c, rs in runs.items()]


def predict_rows(raw: list[dict]) -> list[dict]:
    """Rows re-predicted by the current planner from saved measurements (no runs)."""
    return [_row(Case(**r["case"]), r["runs"]) for r in raw]


def table(rows: list[dict]) -> str:
    lines = ["| configuration | mem pred (MiB) | mem meas (MiB) | err | tok/s pred | tok/s meas | err | step s (rounds) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        miss = ("" if abs(r["memory_error"]) <= 0.10 else " **"), ("" if abs(r["tokens_per_s_error"]) <= 0.20 else " **")
        lines.append(f"| {r['config']} | {r['memory_predicted'] / MiB:,.0f} | {r['memory_measured'] / MiB:,.0f} | "
                     f"{r['memory_error']:+.1%}{miss[0]} | {r['tokens_per_s_predicted']:,.0f} | {r['tokens_per_s_measured']:,.0f} | "
                     f"{r['tokens_per_s_error']:+.1%}{miss[1]} | " + ", ".join(f"{x['step_s']:.2f}" for x in r["runs"]) + " |")
    mem_ok = sum(abs(r["memory_error"]) <= 0.10 for r in rows)
    tps_ok = sum(abs(r["tokens_per_s_error"]) <= 0.20 for r in rows)
    lines.append(f"\nmemory within 10%: {mem_ok}/{len(rows)} rows; tokens/s within 20%: {tps_ok}/{len(rows)} rows (** marks a miss)")
    return "\n".join(lines)


def fit(rows: list[dict]) -> dict[str, Any]:
    """`[calibration.cpu]` from measured rows (as `run`/`predict_rows` give them):

    * `mfu.<precision>`: fraction of the probed peak a step reaches, from the rows without
      checkpointing: measured step minus predicted exposed communication, against the FLOPs;
    * `time_full` / `time_selective`: step-time multiplier of those modes against the same
      precision's no-checkpointing compute;
    * `rss_base_gb`: the process memory that is not tensors, the median residual of memory.
    The rows must have been predicted with the constants in force (their split is used)."""
    from shoestring.plan.catalogue import calibration
    from shoestring.plan.throughput import compute_dtype

    cal = calibration("cpu")
    old_mfu = cal.get("mfu", {})

    def compute_at_mfu1(r: dict) -> float:  # predicted compute seconds at MFU 1
        return r["predicted"]["step"]["compute"] * old_mfu.get(r["case"]["precision"], 0.3)

    def measured_busy(r: dict) -> float:  # measured step seconds less the exposed comm
        return statistics.median(x["step_s"] for x in r["runs"]) - r["predicted"]["step"]["comm"]

    mfu = {}
    for prec in sorted({r["case"]["precision"] for r in rows}):
        plain = [compute_at_mfu1(r) / measured_busy(r) for r in rows
                 if r["case"]["precision"] == prec and r["case"]["checkpointing"] == "none" and r["case"]["mode"] != "lora"]
        if plain:
            mfu[prec] = round(statistics.median(plain), 3)
    for prec in {r["case"]["precision"] for r in rows} - set(mfu):  # no plain row: its compute dtype's
        mfu[prec] = next((v for k, v in mfu.items() if compute_dtype(k) == compute_dtype(prec)), old_mfu.get(prec, 0.3))
    out: dict[str, Any] = {"mfu": dict(sorted(mfu.items()))}
    for mode in ("full", "selective"):
        ratios = [measured_busy(r) / (compute_at_mfu1(r) / out["mfu"][r["case"]["precision"]]) for r in rows
                  if r["case"]["checkpointing"] == mode and r["case"]["precision"] in out["mfu"] and r["case"]["mode"] != "lora"]
        if ratios:
            out[f"time_{mode}"] = round(statistics.median(ratios), 3)
    base = cal.get("rss_base_gb", 0.3) * 1e9
    out["rss_base_gb"] = round((base + statistics.median(r["memory_measured"] - r["memory_predicted"] for r in rows)) / 1e9, 3)
    return out


def fit_toml(fitted: dict[str, Any]) -> str:
    mfu = ", ".join(f'"{k}" = {v}' if "-" in k else f"{k} = {v}" for k, v in fitted["mfu"].items())
    lines = [f"mfu = {{ {mfu} }}"] + [f"{k} = {v}" for k, v in fitted.items() if k != "mfu"]
    return "\n".join(lines)
