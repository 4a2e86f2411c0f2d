"""benchmarks/gpu_check.py without a GPU: the CPU-only answer, every case's config is valid, the
checks read a run's files right, and the case table survives failing, raising and hanging cases."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from shoestring.config import load_config
from shoestring.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gc = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gc  # dataclasses look their module up
_spec.loader.exec_module(gc)

MACHINE = gc.Machine(Path("/tmp/gpu-check-test"), 80 * 2**30, "bf16")


def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main(["--out", str(tmp_path / "gpu.md"), "--wheels", str(tmp_path / "nowhere")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("gpu-check: no CUDA device here")
    assert not list(tmp_path.iterdir())  # nothing installed, nothing written


def test_every_train_case_is_a_valid_config():
    """A typo in an override would otherwise be found on the GPU, in its scarce minutes."""
    train_cases = [c for c in gc.cases(MACHINE) if c.commands[0][0] == "train"]
    assert len({c.name for c in gc.cases(MACHINE)}) == len(gc.cases(MACHINE)) and len(train_cases) >= 15
    for case in train_cases:
        for args in case.commands:
            sets = [a.removeprefix("--set=") for a in args if a.startswith("--set=")]
            if args[1].endswith(".json"):  # the resumed run's config.json does not exist yet
                continue
            try:
                cfg = load_config(ROOT / args[1], sets)
            except UserError as err:  # a case for what this shoestring does not have yet
                assert case.refused_means and case.refused_means in str(err), (case.name, err)
                continue
            assert cfg.run.dir == str(MACHINE.work / "runs" / gc.slug(case.name)), case.name


def _run(losses=(8.0, 7.0, 6.0), tps=(10, 100, 100, 100, 200, 200), summary=None, config=None, log="") -> "gc.Run":
    metrics = [{"step": i, "loss": loss} for i, loss in enumerate(losses)] + [{"tokens_per_s": t} for t in tps]
    summary = {"device": "cuda:0", "steps_run": 20, "memory_bytes": {"device_peak": 300 * 2**20, "params": 16 * 2**20,
                                                                    "activations_saved": 200 * 2**20}, **(summary or {})}
    config = config or {"train": {"steps": 20, "batch_size": 16}, "data": {"seq_len": 256}, "precision": {"mode": "bf16"}}
    return gc.Run(0, log, summary, config, metrics)


def test_the_checks_read_a_runs_files():
    run = _run()
    for check in (gc.on_cuda, gc.all_steps, gc.finite_loss, gc.learned, gc.cuda_memory(MACHINE), gc.weights_on_device,
                  gc.precision_is("bf16"), gc.compiled):
        assert check(run, {}) is None, check
    assert gc.median_step_s(run) == 16 * 256 / 200  # the first 3 steps left out
    assert "cpu" in gc.on_cuda(_run(summary={"device": "cpu"}), {})
    assert "did not fall" in gc.learned(_run(losses=(6.0, 7.0)), {})
    assert "nan" in gc.finite_loss(_run(losses=(8.0, float("nan"))), {})
    assert gc.cuda_memory(MACHINE)(_run(summary={"memory_bytes": {"device_peak": 0}}), {})
    assert "fell back to eager" in gc.compiled(_run(log="UserWarning: train.compile: ...; running the blocks eagerly"), {})
    # The resolved precision: summary.json's record where there is one, else config.json's mode.
    assert gc.resolved_precision(_run(summary={"precision": {"mode": "fp32", "reason": "slow bf16"}})) == "fp32"
    assert gc.resolved_precision(_run(summary={"precision": "fp16"})) == "fp16"
    assert "expected 'fp16'" in gc.precision_is("fp16")(run, {})


def test_a_resumed_run_counts_the_steps_it_ran():
    run = _run(summary={"steps_run": 10}, log="resumed from /x/checkpoints/step_00000010 at step 10\n")
    assert gc.resumed(run, {}) is None and gc.all_steps(run, {}) is None
    assert gc.resumed(_run(), {}) == "the second run did not resume"


def test_cross_case_checks_compare_with_a_case_that_passed():
    done = {"bf16": gc.Result("bf16", "", gc.PASS, summary=_run().summary)}
    offloaded = _run(summary={"memory_bytes": {"device_peak": 1, "activations_saved": 20 * 2**20}})
    assert gc.below("bf16", "activations_saved", 0.5)(offloaded, done) is None
    assert "not below 0.5x `bf16`'s 200.0 MiB" in gc.below("bf16", "activations_saved", 0.5)(_run(), done)
    done["bf16"].status = gc.FAIL
    assert gc.below("bf16", "activations_saved", 0.5)(_run(), done) is None  # nothing to compare with


def _case(name, timeout_s=60):
    return gc.Case(name, f"what {name} does", (("train",),), timeout_s=timeout_s)


def test_the_table_survives_failing_raising_and_late_cases(tmp_path):
    """A fake runner: cases that pass, fail, raise, and one the budget leaves no time for."""
    now = [0.0]
    seen_timeouts = {}

    def runner(case, done, timeout_s):
        seen_timeouts[case.name] = timeout_s
        now[0] += 100
        if case.name == "raises":
            raise KeyError("summary.json")
        status = gc.FAIL if case.name == "fails" else gc.PASS
        return gc.Result(case.name, case.what, status, 100, step_s=0.0123, tokens_per_s=333_000, peak_bytes=300 * 2**20,
                         precision="bf16", note="exit 1: RuntimeError: boom" if status == gc.FAIL else "1.40x `bf16`'s",
                         log_tail="Traceback ...\nRuntimeError: boom")

    todo = [_case("first"), _case("fails"), _case("raises"), _case("long", timeout_s=600), _case("late")]
    results = gc.run_all(todo, runner, budget_s=350, clock=lambda: now[0])
    assert [(r.name, r.status) for r in results] == [("first", gc.PASS), ("fails", gc.FAIL), ("raises", gc.FAIL),
                                                     ("long", gc.PASS), ("late", gc.NOT_RUN)]
    assert seen_timeouts == {"first": 60, "fails": 60, "raises": 60, "long": 50}  # capped by what is left
    assert "checking it failed: KeyError" in results[2].note and "350 s budget" in results[4].note

    header = {"command": "python benchmarks/gpu_check.py", "date": "2027-01-01 00:00 UTC", "GPU": "NVIDIA H200 x 1"}
    gc.write(results, header, 412.0, tmp_path / "gpu_check.md")
    doc = (tmp_path / "gpu_check.md").read_text()
    assert "2 pass, 2 failed, 1 not run" in doc and "6.9 min" in doc
    assert "| first | what first does | pass | 12.3 | 333,000 | 300 | bf16 | 1.40x `bf16`'s |" in doc
    assert "| fails | what fails does | **FAIL** |" in doc and "## fails: exit 1: RuntimeError: boom" in doc
    assert "| late | what late does | not run | — | — | — | — |" in doc
    raw = json.loads((tmp_path / "gpu_check.json").read_text())
    assert raw["header"]["GPU"] == "NVIDIA H200 x 1" and [r["status"] for r in raw["results"]][-1] == gc.NOT_RUN


def test_a_hanging_case_is_ended_with_its_process_group(tmp_path):
    """Its children too (torchrun's ranks): none may live on into the next case."""
    pid_file = tmp_path / "grandchild"
    child = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    t0 = time.monotonic()
    with (tmp_path / "log").open("w") as log:
        rc = gc._run([sys.executable, "-c", child], log, log, 3, {})
    assert rc == gc.TIMED_OUT and time.monotonic() - t0 < 20
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # reparented and reaped once killed
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {grandchild} outlived its case")


@pytest.mark.parametrize("log, line", [
    ("Traceback (most recent call last):\n  ...\nRuntimeError: CUDA error: out of memory\n", "RuntimeError: CUDA error"),
    ("[rank 0] error: parallel.strategy = 'fsdp2' with offload needs a CUDA device\n"
     "error: rank 0 failed (exit code 2); the other ranks were stopped — see that rank's error above\n", "[rank 0] error"),
])
def test_a_failed_case_says_what_went_wrong(log, line):
    assert gc._last_error(log, 1).startswith(f"exit 1: {line}")


def test_the_wheels_are_installed_by_name_so_pip_picks_this_pythons():
    assert gc._requirement("pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl") == \
        "pydantic_core==2.50.5"
    assert gc._requirement("deepspeed-0.19.8.tar.gz") == "deepspeed==0.19.8"
