"""`precision.mode = "auto"`: the rule on injected measurements, the probe that measures them, the
trainer that resolves, records and keeps the choice, and MFU against the one measured peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from rich.console import Console

from shoestring.build import resolve_auto
from shoestring.config import build_config
from shoestring.levers.precision import DeviceFacts, resolve_precision, slow_warning
from shoestring.plan import probe
from shoestring.train.trainer import Trainer

G = 1e9
FAST_BF16_CPU = DeviceFacts("cpu", {"fp32": 140 * G, "bf16": 400 * G, "fp16": 2 * G})  # AVX-512 BF16
SLOW_BF16_CPU = DeviceFacts("cpu", {"fp32": 126 * G, "bf16": 0.9 * G, "fp16": 1 * G})  # AVX2 only: emulated bf16
NO_AVX512_CPU = DeviceFacts("cpu", {"fp32": 60 * G, "bf16": 75 * G, "fp16": 0.5 * G})  # bf16 a little faster, not enough
A100 = DeviceFacts("cuda", {"fp32": 19e12, "bf16": 290e12, "fp16": 290e12}, (8, 0))
T4 = DeviceFacts("cuda", {"fp32": 8e12, "bf16": 2e12, "fp16": 60e12}, (7, 5))


@pytest.mark.parametrize("facts, mode", [(FAST_BF16_CPU, "bf16"), (SLOW_BF16_CPU, "fp32"), (NO_AVX512_CPU, "fp32"),
                                         (A100, "bf16"), (T4, "fp16")])
def test_the_rule_on_injected_measurements(facts, mode):
    assert resolve_precision(facts).value == mode


def test_the_reason_names_the_two_measured_figures():
    assert resolve_precision(SLOW_BF16_CPU).reason == "bf16 matmul 0.9 GFLOP/s vs fp32 126 here"
    assert "7.5" in resolve_precision(T4).reason and "loss scaling" in resolve_precision(T4).reason


def test_a_forced_precision_far_slower_than_fp32_gets_one_warning_line():
    line = slow_warning("bf16", SLOW_BF16_CPU)
    assert "140x slower than fp32" in line and "0.9 GFLOP/s" in line and "\n" not in line
    assert slow_warning("bf16-pure", SLOW_BF16_CPU) and slow_warning("fp16", FAST_BF16_CPU)
    assert slow_warning("bf16", FAST_BF16_CPU) is None and slow_warning("fp32", SLOW_BF16_CPU) is None
    assert slow_warning("fp16", T4) is None


def test_resolve_auto_keeps_a_resumed_runs_mode_unless_the_config_names_one():
    auto = build_config({"model": {"preset": "micro"}, "data": {"seq_len": 64}, "train": {"compile": False}})
    saved = {"precision": {"mode": "bf16"}}
    assert resolve_auto(auto, SLOW_BF16_CPU).cfg.precision.mode == "fp32"
    kept = resolve_auto(auto, SLOW_BF16_CPU, saved)
    assert kept.cfg.precision.mode == "bf16" and "resumed" in kept.precision.reason and kept.warning
    forced = build_config({"model": {"preset": "micro"}, "data": {"seq_len": 64}, "precision": {"mode": "fp32"}})
    assert resolve_auto(forced, FAST_BF16_CPU, saved).cfg.precision.mode == "fp32"
    lora = build_config({"model": {"preset": "micro"}, "data": {"seq_len": 64}, "lora": {"enabled": True, "base_dtype": "bf16"}})
    assert resolve_auto(lora, SLOW_BF16_CPU).cfg.precision.mode == "bf16"  # the base's dtype needs it
    assert resolve_auto(lora, T4).cfg.precision.mode == "fp16"  # fp16 autocast meets a bf16 base too


def test_a_bad_mode_is_one_line_and_exit_2(capsys):
    from shoestring.cli import main

    assert main(["train", "configs/tiny.toml", "--set", "precision.mode=bf17"]) == 2
    err = capsys.readouterr().err.strip()
    assert "precision.mode" in err and "auto" in err and len(err.splitlines()) == 1


# ---- the probe --------------------------------------------------------------------------------

def test_probe_grows_until_saturated_and_stops_a_clearly_slow_dtype(monkeypatch):
    """Synthetic rates: fp32 saturates at 512, bf16 keeps rising to 1024, fp16 is 100x slow at
    the first size, again when timed twice more there, and is never timed at a larger size."""
    table = {256: {"fp32": 100 * G, "bf16": 150 * G, "fp16": 1 * G}, 512: {"fp32": 200 * G, "bf16": 300 * G},
             1024: {"fp32": 201 * G, "bf16": 400 * G}, 2048: {"bf16": 401 * G}}
    asked = []

    def fake(device, n, dtypes):
        asked.append((n, tuple(dtypes)))
        return {d: table[n][d] for d in dtypes}

    monkeypatch.setattr(probe, "_time_size", fake)
    peaks = probe._measure_peaks(torch.device("cpu"))
    assert peaks["fp32"] == probe.Peak(201 * G, 1024) and peaks["bf16"] == probe.Peak(401 * G, 2048)
    assert peaks["fp16"] == probe.Peak(1 * G, 256, slow=True)
    assert asked[1:] == [(256, ("fp32", "fp16"))] * probe.RECHECKS + [(512, ("fp32", "bf16")), (1024, ("fp32", "bf16")),
                                                                      (2048, ("bf16",))]


def test_probe_does_not_call_a_dtype_slow_from_one_contended_window(monkeypatch):
    """bf16 100x slow in the first window only (other work held the cores): timed again, it is
    fast, grows, and is not recorded as slow."""
    windows = iter([{"fp32": 100 * G, "bf16": 1 * G, "fp16": 1 * G}, {"fp32": 100 * G, "bf16": 150 * G, "fp16": 1 * G}])

    def fake(device, n, dtypes):
        rates = next(windows, None) or {"fp32": 100 * G, "bf16": 150 * G, "fp16": 1 * G}
        return {d: rates[d] for d in dtypes}

    monkeypatch.setattr(probe, "_time_size", fake)
    peaks = probe._measure_peaks(torch.device("cpu"))
    assert not peaks["bf16"].slow and peaks["bf16"].flops == 150 * G and peaks["fp16"].slow


def test_probe_caches_per_instruction_set(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # unset first, also where the suite runs limited
    calls = []
    monkeypatch.setattr(probe, "_measure_peaks", lambda d: calls.append(1) or {k: probe.Peak(G, 256) for k in probe.DTYPES})
    probe.matmul_peaks(torch.device("cpu"), 1)
    probe.matmul_peaks(torch.device("cpu"), 1)
    assert len(calls) == 1
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # other kernels run: another measurement
    probe.matmul_peaks(torch.device("cpu"), 1)
    assert len(calls) == 2
    assert all("|isa=" in key for key in json.loads(probe.cache_path().read_text()))


def test_a_contended_many_thread_probe_falls_back_to_one_threads_and_is_not_cached(tmp_path, monkeypatch):
    """Other work on the cores makes a 2-thread matmul wait for a descheduled thread: it comes out
    below one thread's peak, which an idle machine never does."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    one = {"fp32": probe.Peak(100 * G, 512), "bf16": probe.Peak(200 * G, 512), "fp16": probe.Peak(G, 256, True)}
    runs = {1: [one], 2: [{d: probe.Peak(0.7 * G, 256) for d in probe.DTYPES},  # contended
                          {"fp32": probe.Peak(190 * G, 1024), "bf16": probe.Peak(390 * G, 1024), "fp16": probe.Peak(G, 256, True)}]}
    monkeypatch.setattr(probe, "_measure_peaks", lambda device: runs[torch.get_num_threads()].pop(0))
    assert probe.matmul_peaks(torch.device("cpu"), 2) == one  # the floor, for this run only
    assert probe.matmul_peaks(torch.device("cpu"), 2)["bf16"] == probe.Peak(390 * G, 1024)  # measured again
    assert probe.matmul_peaks(torch.device("cpu"), 2)["fp32"] == probe.Peak(190 * G, 1024)  # now cached
    assert probe.device_facts(torch.device("cpu"), 1).matmul_flops["bf16"] == 200 * G


def test_an_mfu_above_one_is_an_error_not_a_figure():
    assert probe.mfu(50 * G, 100 * G) == 0.5 and probe.mfu_error(50 * G, 100 * G) is None
    assert probe.mfu(242 * G, 100 * G) is None
    assert "2.42" in probe.mfu_error(242 * G, 100 * G) and "wrong" in probe.mfu_error(242 * G, 100 * G)


@pytest.mark.slow
def test_limited_to_avx2_the_probe_measures_slow_bf16_and_the_rule_picks_fp32(tmp_path):
    """ATEN_CPU_CAPABILITY=avx2 with ONEDNN_MAX_CPU_ISA=AVX2 makes bf16 matmuls take the slow path
    on any x86 CPU (as on an AVX2-only one): a first probe still takes seconds, not minutes."""
    script = textwrap.dedent("""
        import json, time, torch
        from shoestring.levers.precision import resolve_precision
        from shoestring.plan import probe
        t0 = time.perf_counter()
        facts = probe.device_facts(torch.device("cpu"), threads=1)  # one thread: other jobs on the cores hurt it least
        print(json.dumps({"seconds": time.perf_counter() - t0, "mode": resolve_precision(facts).value,
                          "isa": probe.instruction_set(torch.device("cpu")), "rates": dict(facts.matmul_flops)}))
    """)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "XDG_CACHE_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mode"] == "fp32" and out["isa"].startswith("AVX2"), out
    assert out["rates"]["bf16"] * 4 < out["rates"]["fp32"], out
    assert out["seconds"] < 10, out


# ---- the trainer ------------------------------------------------------------------------------

QUIET = Console(quiet=True)


def _facts(monkeypatch, facts: DeviceFacts) -> None:
    monkeypatch.setattr(probe, "device_facts", lambda device, threads=None: facts)


def test_auto_is_resolved_recorded_and_said(make_config, tmp_path, monkeypatch):
    _facts(monkeypatch, SLOW_BF16_CPU)
    console = Console(record=True, width=200)
    summary = Trainer(make_config(precision__mode="auto", train__steps=2, train__eval_every=2), console=console).run()
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["precision"]["mode"] == "fp32"
    saved = json.loads((run / "summary.json").read_text())
    assert saved["precision"]["mode"] == "fp32" and saved["precision"]["reason"] == "bf16 matmul 0.9 GFLOP/s vs fp32 126 here"
    assert saved["precision"]["matmul_flops"]["bf16"] == 0.9 * G and saved["peak_flops"] == 126 * G
    assert summary["compile"] == {"on": False, "reason": "SHOESTRING_COMPILE=off"}
    assert "precision: fp32 (bf16 matmul 0.9 GFLOP/s vs fp32 126 here)" in console.export_text()


def test_resume_keeps_the_mode_it_started_with(make_config, tmp_path, monkeypatch):
    _facts(monkeypatch, SLOW_BF16_CPU)
    Trainer(make_config(precision__mode="auto", train__steps=2, run__save_every=1), console=QUIET).run()
    _facts(monkeypatch, FAST_BF16_CPU)  # the same run continued where auto would choose bf16
    longer = dict(precision__mode="auto", train__steps=3, run__save_every=1)
    summary = Trainer(make_config(**longer), console=QUIET).run(resume="auto")
    assert summary["precision"]["mode"] == "fp32" and "resumed" in summary["precision"]["reason"]
    console = Console(record=True, width=200)
    forced = Trainer(make_config(**{**longer, "precision__mode": "bf16", "train__steps": 4}), console=console)
    assert forced.run(resume="auto")["precision"]["mode"] == "bf16"  # an explicit mode wins
    assert "precision.mode: 'fp32' -> 'bf16'" in console.export_text()


def test_a_forced_slow_precision_warns_and_runs(make_config, monkeypatch):
    _facts(monkeypatch, SLOW_BF16_CPU)
    console = Console(record=True, width=300)
    summary = Trainer(make_config(precision__mode="bf16", train__steps=1, train__eval_every=1), console=console).run()
    assert summary["steps_run"] == 1 and "140x slower than fp32" in summary["precision"]["warning"]
    assert "warning: precision.mode = 'bf16' is 140x slower than fp32" in console.export_text()


def test_an_impossible_mfu_is_reported_never_printed(make_config, tmp_path, monkeypatch):
    _facts(monkeypatch, DeviceFacts("cpu", {"fp32": 1e3, "bf16": 1e3, "fp16": 1e3}))  # a peak no CPU is that slow at
    console = Console(record=True, width=300)
    summary = Trainer(make_config(train__steps=2, train__eval_every=2), console=console).run()
    assert summary["mfu"] is None and "is wrong" in summary["mfu_error"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mfu"] is None and r["peak_flops"] == 1e3 for r in records if "loss" in r)
    assert console.export_text().count("is wrong") == 1


# ---- the planner picks by the same rule -------------------------------------------------------

def _local_cpu(monkeypatch, facts: DeviceFacts) -> None:
    """The local CPU as the planner probes it, with `facts`' rates."""
    peaks = {d: probe.Peak(facts.matmul_flops[d], 512) for d in probe.DTYPES}
    monkeypatch.setattr(probe, "matmul_peaks", lambda device, threads=None: peaks)


@pytest.mark.parametrize("hardware, precisions", [("t4:1", {"fp16"}), ("a100-80gb:1", {"bf16", "bf16-pure"})])
def test_the_planner_offers_what_a_catalogue_gpu_runs_fast(hardware, precisions):
    from shoestring.plan.search import Request, search

    plans = search(Request("tiny", 1e6, hardware=(hardware,), seq_len=256)).plans
    assert {p.levers.precision for p in plans} == precisions


@pytest.mark.parametrize("facts, mode", [(FAST_BF16_CPU, "bf16"), (SLOW_BF16_CPU, "fp32")])
def test_the_planner_picks_the_local_cpus_precision_by_the_trainers_rule(monkeypatch, facts, mode):
    from shoestring.plan.search import Request, search

    _local_cpu(monkeypatch, facts)
    plans = search(Request("micro", 1e5, hardware=("local:1",), seq_len=64)).plans
    assert {p.levers.precision.removesuffix("-pure") for p in plans} == {mode}
    lora = search(Request("micro", 1e5, hardware=("local:1",), seq_len=64, mode="lora", lora_base_dtype="bf16")).plans
    assert {p.levers.precision for p in lora} == {"bf16"}  # a bf16-held base needs bf16 compute


def test_train_auto_treats_an_auto_precision_as_unset(monkeypatch):
    from shoestring.plan.auto import auto_overrides

    _local_cpu(monkeypatch, SLOW_BF16_CPU)
    cfg = build_config({"model": {"preset": "micro"}, "data": {"seq_len": 64}, "precision": {"mode": "auto"},
                        "train": {"batch_size": 8}})
    chosen, plan = auto_overrides(cfg, 1)
    assert "precision.mode=fp32" in chosen and plan.levers.precision == "fp32"


def test_allreduce_probe_ranks_agree_on_their_count(tmp_path, monkeypatch, capfd):
    """The gloo bandwidth probe's ranks reduce the same number of times (a rank that stopped
    early closed its connection under one still reducing: a traceback, or no figure at all)."""
    from shoestring.plan import probe

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert probe.allreduce_bandwidth(2, nbytes=1 << 20) > 0
    assert "Traceback" not in capfd.readouterr().err
