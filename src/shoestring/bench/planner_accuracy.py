"""The planner against measurement on this machine: predicted vs measured peak memory and
tokens/s, one fresh process group per configuration (precisions x checkpointing x single / ddp /
fsdp2 / yafsdp on 2 ranks, pre-training, full fine-tuning and LoRA).

`run(size)` measures and predicts; `table(rows)` formats the rows as Markdown;
`predict_rows(raw)` re-predicts saved measurements (iterate on the model without re-measuring);
`fit(raw)` derives the `[calibration.cpu]` constants of plan/hardware.toml from them
(`calibration_toml` writes them as that table).

Method: each configuration runs in its own fresh process(es), built through the trainer's path
(`resolve_auto` + `build_strategy`: LoRA, checkpointing, compile where `train.compile = "auto"`
compiles on this machine's measured facts, the strategy), so the planner is asked about exactly what ran (the compile lever's rule included).
The first step (compilation, allocations, lazy optimizer state) is not timed; tokens/s is the
median of the next `steps` steps (the slowest rank's), measured memory the largest per-rank peak
RSS (VmHWM) of the same processes. Ranks split the cores (one thread each on 2). What the probe
measured (matmul peak, all-reduce bandwidth) is saved with each row, so a re-prediction or a fit
later uses the machine as it was during the run.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from shoestring.measure.memory import MiB


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
    steps: int = 3  # timed (their median), after one untimed

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


# Every precision, checkpointing mode and strategy at least once, each lever beside a row that
# differs only in it where the time allows: 13 rows. Estimated ~2.5 minutes on 2 idle cores with
# inductor's on-disk cache warm (~50 s of steps, ~4 s per process start, ~4 s per compile); each
# compiled row whose graph is not cached yet adds 10-30 s of C++ compilation.
_SMALL = [
    Case("small", "single", "fp32", "none", 8, 256),
    Case("small", "single", "bf16", "none", 8, 256),
    Case("small", "single", "bf16", "full", 8, 256),
    Case("small", "single", "bf16-pure", "selective", 8, 256, mode="full-finetune"),
    Case("small", "ddp", "bf16", "none", 8, 256),
    Case("small", "ddp", "fp32", "full", 8, 256),
    Case("small", "fsdp2", "bf16", "none", 8, 256),
    Case("small", "fsdp2", "bf16-pure", "full", 8, 256),
    Case("small", "yafsdp", "fp32", "none", 8, 256),
    Case("small", "yafsdp", "bf16-pure", "full", 8, 256),
    Case("small", "single", "bf16", "none", 8, 256, mode="lora"),
    Case("small", "single", "bf16", "full", 8, 256, mode="lora", lora_base_dtype="bf16"),
    Case("small", "ddp", "bf16", "none", 8, 256, mode="lora", lora_base_dtype="bf16"),
]
SIZES: dict[str, list[Case]] = {
    "smoke": [Case("micro", "single", "bf16", "none", 2, 64, steps=1),
              Case("micro", "single", "bf16", "none", 2, 64, mode="lora", steps=1)],
    "small": _SMALL,
    "full": [replace(c, preset="medium", batch=8, seq_len=512) for c in _SMALL],
}


def _worker(rank: int, world: int, port: int, case: Case, queue) -> None:
    """One rank: build the strategy from the case's config (the trainer's path), time its steps."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    from shoestring.build import build_strategy, resolve_auto
    from shoestring.config import build_config
    from shoestring.models import PRESETS
    from shoestring import dist
    from shoestring.plan.probe import cpu_cores, device_facts
    from shoestring.measure.memory import PeakRSS

    torch.set_num_threads(max(1, cpu_cores() // world))
    vocab = PRESETS[case.preset].vocab_size
    with dist.process_group(torch.device("cpu"), 300, required=world > 1):
        cpu = torch.device("cpu")
        s = build_strategy(resolve_auto(build_config(case.config_tree()), device_facts(cpu)).cfg, vocab, cpu)
        gen = torch.Generator().manual_seed(rank)
        x, y = (torch.randint(0, vocab, (case.batch // world, case.seq_len), generator=gen) for _ in range(2))
        times = []
        for i in range(case.steps + 1):  # the first step (compilation, allocations, lazy init) is not timed
            dist.barrier()
            t0 = time.perf_counter()
            s.forward_backward(x, y, 1.0, True)
            s.step(1e-3)
            dist.barrier()
            if i:
                times.append(time.perf_counter() - t0)
        compiled = any(getattr(b, "_compiled_call_impl", None) is not None for b in s.unwrapped().layers)
        queue.put({"peak_rss": PeakRSS().peak_bytes(), "step_s": statistics.median(times), "steps_s": times,
                   "compiled": compiled})


def measure(case: Case) -> dict[str, Any]:
    """One fresh process per rank: the peak RSS is this configuration's own."""
    import torch.multiprocessing as mp

    from shoestring.dist import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_worker, args=(r, case.world, port, case, queue)) for r in range(case.world)]
    for p in procs:
        p.start()
    out = [queue.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    slowest = max(out, key=lambda o: o["step_s"])
    return {"peak_rss": max(o["peak_rss"] for o in out), "step_s": slowest["step_s"], "steps_s": slowest["steps_s"],
            "compiled": out[0]["compiled"]}


def predict(case: Case, probed: dict[str, Any], compiled: bool | str = "auto") -> dict[str, Any]:
    """The planner's plan for exactly this case's levers on the local CPU as `probed` found it,
    with the blocks compiled as they were in the run (`compiled`)."""
    from shoestring.plan.catalogue import cpu_device
    from shoestring.plan.memory import Levers
    from shoestring.plan.search import Request, plan_exactly

    req = Request(case.preset, tokens=1e6, mode=case.mode, seq_len=case.seq_len, global_batch_tokens=case.batch * case.seq_len,
                  lora_rank=case.lora_rank, lora_base_dtype=case.lora_base_dtype, compile=compiled)
    levers = Levers(case.precision, case.checkpointing, case.strategy, micro_batch=case.batch // case.world)
    p = plan_exactly(req, cpu_device(probed), case.world, levers)
    s = p.step
    return {"memory": p.memory.total, "tokens_per_s": p.tokens_per_s, "components": p.memory.components,
            "compiled": p.levers.compiled,
            "step": {"compute": s.compute_s, "recompute": s.recompute_s, "comm": s.comm_s, "offload": s.offload_s}}


def _row(case: Case, runs: list[dict], probed: dict[str, Any]) -> dict[str, Any]:
    pred = predict(case, probed, runs[0].get("compiled", "auto"))
    mem = statistics.median(r["peak_rss"] for r in runs)
    tps = case.batch * case.seq_len / statistics.median(r["step_s"] for r in runs)
    return {"case": asdict(case), "config": case.label, "runs": runs, "probe": probed,
            "memory_predicted": pred["memory"], "memory_measured": mem, "memory_error": pred["memory"] / mem - 1,
            "tokens_per_s_predicted": pred["tokens_per_s"], "tokens_per_s_measured": tps,
            "tokens_per_s_error": pred["tokens_per_s"] / tps - 1, "predicted": pred}


def run(size: str = "small", rounds: int = 1, progress: Callable[[str], None] = lambda s: None,
         only: str = "") -> list[dict]:
    """Measure every case of `size` ("smoke": seconds; "small": minutes on 2 cores; "full":
    a larger model) whose label contains `only`, `rounds` fresh-process rounds interleaved, and
    predict each."""
    from shoestring.plan import probe
    from shoestring.plan.catalogue import probe_cpu

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    cases = [c for c in SIZES[size] if only in c.label]
    probe.forget()  # predict against the machine as it is now, not a stale cached peak
    probed = {w: probe_cpu(w) for w in sorted({c.world for c in cases})}  # before the runs, in the same conditions
    runs: dict[Case, list[dict]] = {c: [] for c in cases}
    for r in range(rounds):
        for c in cases:
            progress(f"round {r + 1}/{rounds}: {c.label}")
            runs[c].append(measure(c))
    return [_row(c, rs, probed[c.world]) for c, rs in runs.items()]


def predict_rows(raw: list[dict]) -> list[dict]:
    """Rows re-predicted by the current planner from saved measurements (no runs)."""
    return [_row(Case(**r["case"]), r["runs"], r["probe"]) for r in raw]


def _steps(runs: list[dict]) -> str:
    """Each round's timed steps (rounds apart by ';'), or its median where only that was kept."""
    return "; ".join(", ".join(f"{t:.2f}" for t in x.get("steps_s", [x["step_s"]])) for x in runs)


def table(rows: list[dict]) -> str:
    lines = ["| configuration | mem pred (MiB) | mem meas (MiB) | err | tok/s pred | tok/s meas | err | timed steps (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        miss = ("" if abs(r["memory_error"]) <= 0.10 else " **"), ("" if abs(r["tokens_per_s_error"]) <= 0.20 else " **")
        lines.append(f"| {r['config']} | {r['memory_predicted'] / MiB:,.0f} | {r['memory_measured'] / MiB:,.0f} | "
                     f"{r['memory_error']:+.1%}{miss[0]} | {r['tokens_per_s_predicted']:,.0f} | {r['tokens_per_s_measured']:,.0f} | "
                     f"{r['tokens_per_s_error']:+.1%}{miss[1]} | " + _steps(r["runs"]) + " |")
    mem_ok = sum(abs(r["memory_error"]) <= 0.10 for r in rows)
    tps_ok = sum(abs(r["tokens_per_s_error"]) <= 0.20 for r in rows)
    lines.append(f"\nmemory within 10%: {mem_ok}/{len(rows)} rows; tokens/s within 20%: {tps_ok}/{len(rows)} rows (** marks a miss)")
    return "\n".join(lines)


def _measured_step(r: dict) -> float:
    return statistics.median(x["step_s"] for x in r["runs"])


def fit(rows: list[dict]) -> dict[str, Any]:
    """`[calibration.cpu]` from measured rows (as `run` gives them), eager and compiled blocks
    apart (`compiled`: the constants that apply over the eager ones), each constant from the rows
    that isolate it, in this order:

    * `mfu.<precision>`: the fraction of the probed peak a step reaches, from the single-device
      pre-training rows without checkpointing (FLOPs at the peak / measured step);
    * `time_full` / `time_selective`: the step-time multiplier of those modes, from the
      single-device rows with them, against the compute the fitted MFU gives;
    * `collective_s.<strategy>`: the fixed cost of one collective call, from the 2-rank rows:
      the measured step less the predicted compute, recompute and bytes / bandwidth, per call;
    * `rss_base_gb`: the process memory that is not tensors, the median residual of memory on
      the eager rows; `compiled.rss_compile_gb`: what the compiled runtime adds, on the others.

    A constant with no row to fit it keeps its current value. Check a fit on another run's rows
    (`--from-json OTHER` after `--write-calibration`), not on the rows it came from."""
    from shoestring.plan.catalogue import calibration
    from shoestring.plan.throughput import compute_dtype, compute_seconds, with_compiled

    cal = calibration("cpu")
    out: dict[str, Any] = {k: v for k, v in cal.items() if k not in ("how", "compiled")}
    out["compiled"] = dict(cal.get("compiled", {}))
    terms = [_terms(r) for r in rows]
    for group, compiled in ((out, False), (out["compiled"], True)):
        mine = [(r, t) for r, t in zip(rows, terms) if t["compiled"] == compiled]
        plain = [(r, t) for r, t in mine if r["case"]["strategy"] == "single" and r["case"]["mode"] != "lora"]
        fitted = {prec: round(statistics.median(t["at_peak"] / _measured_step(r) for r, t in plain
                                                if r["case"]["precision"] == prec and r["case"]["checkpointing"] == "none"), 3)
                  for prec in sorted({r["case"]["precision"] for r, _ in plain if r["case"]["checkpointing"] == "none"})}
        mfu = {**group.get("mfu", {}), **fitted}
        for prec in {r["case"]["precision"] for r, _ in mine} - set(fitted):  # no plain row: this run's figure
            same = [v for k, v in fitted.items() if compute_dtype(k) == compute_dtype(prec)]  # for its compute dtype
            if same:
                mfu[prec] = same[0]
        if mfu:
            group["mfu"] = dict(sorted(mfu.items()))
        for mode in ("full", "selective"):
            ratios = [_measured_step(r) / (t["at_peak"] / mfu[r["case"]["precision"]]) for r, t in plain
                      if r["case"]["checkpointing"] == mode and r["case"]["precision"] in mfu]
            if ratios:
                group[f"time_{mode}"] = round(statistics.median(ratios), 3)
    per_call: dict[str, list[float]] = {}
    for r, t in zip(rows, terms):
        if t["collectives"]:
            g = with_compiled(out, t["compiled"])
            prec, mode = r["case"]["precision"], r["case"]["checkpointing"]
            kind = "none" if mode == "none" else ("selective" if mode == "selective" else "full")
            compute = compute_seconds(t["at_peak"], t["full_at_peak"], g["mfu"][prec]) * (
                1 + t["share"] * (g.get(f"time_{kind}", 1.0) - 1))
            per_call.setdefault(r["case"]["strategy"], []).append((_measured_step(r) - compute - t["comm_bw"]) / t["collectives"])
    if per_call:
        out["collective_s"] = {**out.get("collective_s", {}),
                               **{k: round(max(0.0, statistics.median(v)), 4) for k, v in sorted(per_call.items())}}
    # memory: the eager rows give the process's own, the compiled rows what compiling adds to it
    residual = {c: [r["memory_measured"] - r["memory_predicted"] for r, t in zip(rows, terms) if t["compiled"] == c]
                for c in (False, True)}
    base = statistics.median(residual[False]) if residual[False] else 0.0
    out["rss_base_gb"] = round(cal.get("rss_base_gb", 0.3) + base / 1e9, 3)
    if residual[True]:
        extra = cal.get("compiled", {}).get("rss_compile_gb", 0.0) * 1e9 + statistics.median(residual[True]) - base
        out["compiled"]["rss_compile_gb"] = round(max(0.0, extra) / 1e9, 3)
    return out


def _terms(row: dict) -> dict[str, Any]:
    """A row's model terms that do not depend on the constants being fitted: FLOPs time at the
    probed peak (and the full model's, for LoRA), bytes over the bandwidth, collective calls,
    the checkpointed share of blocks."""
    from shoestring.levers.checkpointing import checkpointed_blocks
    from shoestring.plan.catalogue import cpu_device
    from shoestring.plan.memory import Levers
    from shoestring.plan.model import model_info
    from shoestring.plan.search import Request, trainable_for
    from shoestring.plan.throughput import collectives, comm_bytes, compute_dtype

    case = Case(**row["case"])
    device = cpu_device(row["probe"])
    info = model_info(case.preset)
    req = Request(case.preset, tokens=1e6, mode=case.mode, seq_len=case.seq_len, lora_rank=case.lora_rank,
                  lora_base_dtype=case.lora_base_dtype)
    trainable, flops = trainable_for(req, info, case.seq_len)
    levers = Levers(case.precision, case.checkpointing, case.strategy, micro_batch=case.batch // case.world,
                    compiled=row["predicted"]["compiled"])
    tokens, peak = levers.micro_batch * case.seq_len, device.peak_flops(compute_dtype(case.precision))
    return {"compiled": levers.compiled, "at_peak": tokens * flops / peak,
            "full_at_peak": tokens * info.flops_per_token(case.seq_len) / peak,
            "comm_bw": comm_bytes(info, trainable, levers, case.world) / (device.link_gbs(case.world) * 1e9),
            "collectives": collectives(info, trainable, levers, case.world),
            "share": len(checkpointed_blocks(info.args.n_layers, case.checkpointing)) / info.args.n_layers}


def _toml_value(v: Any) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml_value(x)}' if "-" in k else f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return repr(v) if not isinstance(v, str) else f'"{v}"'


def calibration_toml(fitted: dict[str, Any], source: str) -> str:
    """`fitted` as the `[calibration.cpu]` and `[calibration.cpu.compiled]` tables of hardware.toml."""
    flat = {k: v for k, v in fitted.items() if k != "compiled"}
    lines = ["[calibration.cpu]", f"# Fitted by `benchmarks/planner_accuracy.py --from-json RAW --fit` to {source}."]
    lines += [f"{k} = {_toml_value(v)}" for k, v in flat.items()]
    lines += ['how = "fitted: benchmarks/planner_accuracy.py --fit (docs/planner.md, Calibration)"', "",
              "[calibration.cpu.compiled]", "# Blocks under torch.compile (the compile lever): these apply over the above."]
    lines += [f"{k} = {_toml_value(v)}" for k, v in fitted.get("compiled", {}).items()]
    return "\n".join(lines) + "\n"


def write_calibration(fitted: dict[str, Any], source: str) -> None:
    """Replace the `[calibration.cpu]` tables in plan/hardware.toml with `fitted`."""
    from shoestring.plan.catalogue import CATALOGUE_PATH, calibration

    text = CATALOGUE_PATH.read_text()
    pattern = re.compile(r"^\[calibration\.cpu\]\n.*?(?=^\[calibration\.(?!cpu))", re.S | re.M)
    if not pattern.search(text):
        raise ValueError(f"no [calibration.cpu] table followed by another [calibration.*] in {CATALOGUE_PATH}")
    CATALOGUE_PATH.write_text(pattern.sub(lambda _: calibration_toml(fitted, source) + "\n", text, count=1))
    calibration.cache_clear()
